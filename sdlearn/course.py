"""The course harness: run profiles, device, seeding, and the student-notebook build.

Every notebook starts with

    from sdlearn.course import profile, device, seed_everything
    P = profile()          # sizes for this machine: P.image_size, P.vae_steps, ...

and reads every size from `P`, never from a literal, so the same notebook is a
one-minute smoke test in CI, a ten-minute run on a laptop and a full run on a GPU.

    python -m sdlearn.course build-notebooks [--check]

writes notebooks/ (the student notebooks) from solutions/ with nbgrader's own
preprocessors, and keeps the Colab set-up cell and the README's notebook table
in step with the repository named in pyproject.toml (`repo()` below).

    python -m sdlearn.course make-course DIR

makes an nbgrader course folder for instructors: grading/nbgrader_config.py and
one assignment per notebook, source/<notebook>/<notebook>.ipynb.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")


def knob(smoke, cpu, gpu):
    """One profile-dependent size (a shape: image size, width, depth): its value in the smoke, cpu and gpu profiles."""
    return field(metadata=dict(smoke=smoke, cpu=cpu, gpu=gpu))


def budget(smoke, cpu, gpu):
    """One profile-dependent amount of work (steps, samples, pool sizes): a dry run takes the smoke value."""
    return field(metadata=dict(smoke=smoke, cpu=cpu, gpu=gpu, dry_run_smoke=True))


def batch(smoke, cpu, gpu):
    """One profile-dependent batch size: a shape along the batch axis only, so a dry run takes the smoke value too
    (one training step at the gpu profile's batch of 64 px images costs minutes on a CPU core)."""
    return field(metadata=dict(smoke=smoke, cpu=cpu, gpu=gpu, dry_run_smoke=True))


@dataclass(frozen=True)
class Profile:
    """The sizes notebooks use. One line per knob: (smoke, cpu, gpu).

    smoke: CI, every notebook well under a minute on 2 CPU cores (proves it runs). Its amounts of work are the least
           that runs every code path (3 training steps prove what 10 prove): CI runs each notebook four times, three
           in nbgrader's grading round and once in a dry run of the gpu profile.
    cpu:   a laptop, each training notebook about 10 minutes on 2 cores, results a person recognises.
    gpu:   Colab / a datacentre GPU, the whole course in minutes, the best results.

    A dry run (SDLEARN_DRY_RUN=1) keeps a profile's shapes (`knob`: image sizes, widths, depths) and takes the
    smoke profile's amounts of work (`budget`: steps, samples, pools) and batch sizes (`batch`): every shape but the
    batch axis and every released file of the gpu profile, exercised on a CPU in well under a minute per notebook
    (a step at the gpu profile's shapes costs up to 100x a smoke step on a CPU, so a notebook sizes every loop and
    sweep from a `budget`, never from a literal).
    """

    name: str = knob("smoke", "cpu", "gpu")
    # shared
    image_size: int = knob(32, 32, 64)            # shapes images, pixels per side
    batch_size: int = batch(16, 64, 128)          # training batch
    num_eval: int = budget(8, 200, 400)           # prompts scored by the judge
    num_workers: int = knob(0, 0, 2)              # DataLoader workers
    # 01 self-attention
    attn_max_tokens: int = budget(1024, 4096, 16384)  # largest HW in the attention cost sweep
    attn_samples: int = budget(64, 1024, 1024)    # random queries per width in the sqrt(d) experiment
    attn_repeats: int = budget(1, 3, 10)          # timing repeats per size in the cost sweep (best of)
    # 02 cross-attention / text encoder
    clip_steps: int = budget(20, 300, 1500)       # contrastive pretraining steps (the released encoder: 4000)
    clip_pool: int = budget(256, 4000, 20000)     # training images rendered once for CLIP and the probe
    probe_steps: int = budget(20, 400, 1000)      # cross-attention probe (denoiser) steps
    probe_draws: int = budget(2, 8, 16)           # noise draws averaged per attention map
    # 03 VAE
    vae_steps: int = budget(3, 600, 2000)         # the notebook's own VAE (the released one trained longer)
    vae_batch: int = batch(4, 32, 64)             # its training batch
    vae_sweep_steps: int = budget(2, 30, 200)     # fine-tuning steps per point of the KL-weight sweep
    vae_sweep_batch: int = batch(2, 16, 32)       # and their batch
    vae_scale_images: int = budget(64, 512, 512)  # training images whose latents set its scaling factor
    # 04 DDPM noising
    sample_steps: int = budget(2, 50, 50)         # reverse-process steps when sampling
    toy_steps: int = budget(100, 1000, 1000)      # most reverse steps on the 2-D toy (DDPM's run, the step sweep)
    toy_samples: int = budget(500, 2000, 10000)   # points sampled on the 2-D toy
    forward_samples: int = budget(64, 500, 2000)  # noised copies of one image: closed form vs iterating
    # 05 UNet (pixel-space DDPM)
    pixel_steps: int = budget(4, 1200, 3000)      # the pixel-space UNet's training steps
    pixel_size: int = knob(16, 16, 32)            # pixel-space images: 32 px costs 4x per step (measured)
    pixel_width: int = knob(16, 32, 64)           # channels of the UNet's first level (the second has twice)
    pixel_pool: int = budget(16, 2000, 5000)      # training images, rendered once
    pixel_batch: int = batch(4, 32, 128)          # its training batch (cpu: more, smaller steps beat fewer big ones)
    # 06 latent diffusion
    ldm_steps: int = budget(3, 1800, 6000)        # latent UNet training steps (cpu: ~9 minutes on 2 cores)
    ldm_batch: int = batch(4, 64, 128)            # its batch
    ldm_pool: int = budget(32, 10000, 30000)      # training images, rendered and encoded once
    ldm_width: int = knob(16, 64, 96)             # channels of the latent UNet's first level
    sweep_prompts: int = budget(4, 100, 200)      # judge prompts per point of the guidance / step-count sweeps
    step_repeats: int = budget(0, 3, 3)           # steps timed after a warm-up, in the cost-per-step comparison
    # 06b samplers
    sampler_prompts: int = budget(1, 6, 100)      # judge prompts per point of the adherence-against-steps curves
    sampler_max_steps: int = budget(1, 8, 50)     # the most sampling steps on those curves (the toy's go to 50)
    # 07 SDXL refiner
    sdxl_size: int = knob(32, 32, 32)             # shapes-vae-xl, SDXL's VAE, is released at 32 px only
    sdxl_steps: int = budget(3, 900, 6000)        # the base UNet's training steps (cpu: ~7.7 min; released: 4000)
    refiner_steps: int = budget(3, 300, 3000)     # the refiner's (t < 200 only; cpu: ~2.2 min; released: 2000)
    sdxl_pool: int = budget(32, 8000, 30000)      # training images, rendered and encoded once, for each
    # 08 MMDiT
    mmdit_size: int = knob(32, 32, 32)            # shapes-vae-sd3, SD3's 16-channel VAE, is released at 32 px only
    mmdit_steps: int = budget(3, 2000, 8000)      # the MMDiT's training steps (the released one: 4000)
    mmdit_width: int = knob(32, 128, 192)         # its width (heads of 32 channels)
    mmdit_depth: int = knob(2, 4, 6)              # its joint blocks
    mmdit_pool: int = budget(64, 10000, 30000)    # training images, rendered and encoded once
    qk_steps: int = budget(5, 200, 600)           # the high-learning-rate runs with and without QK RMSNorm
    # 09 ControlNet (on the released shapes-t2i, 32 px only)
    cn_size: int = knob(32, 32, 32)               # shapes-t2i is released at 32 px only
    cn_steps: int = budget(3, 800, 3000)          # ControlNet training steps (cpu: ~10 minutes on 2 cores)
    cn_batch: int = batch(4, 32, 64)              # its batch
    cn_pool: int = budget(32, 4000, 20000)        # training scenes (image, caption, map), rendered and encoded once
    cn_every: int = budget(3, 200, 250)           # steps between points of the layout-IoU curve
    cn_curve_scenes: int = budget(2, 16, 64)      # scenes judged per point of that curve
    cn_eval: int = budget(4, 48, 200)             # scenes judged per row of the tables (12 rows)
    cn_sample_steps: int = budget(2, 20, 30)      # sampling steps of every judged image
    cn_kind_steps: int = budget(3, 0, 3000)       # steps of the edge and scribble ControlNets (0: not trained)
    # 10 image prompts and inpainting (on the released shapes-t2i, 32 px only)
    img_size: int = knob(32, 32, 32)              # shapes-t2i and shapes-clip-image are released at 32 px only
    ip_steps: int = budget(3, 800, 3000)          # IP-Adapter training steps (cpu: ~3 minutes on 2 cores)
    ip_batch: int = batch(4, 32, 64)              # its batch
    ip_pool: int = budget(32, 4000, 20000)        # training images, rendered and encoded once (each its own prompt)
    ip_eval: int = budget(4, 48, 200)             # image prompts judged per row of the tables
    inp_steps: int = budget(3, 2000, 3000)        # inpainting fine-tuning steps (cpu: ~7 min; 1000 missed the goals)
    inp_batch: int = batch(4, 32, 64)             # its batch
    inp_pool: int = budget(32, 4000, 20000)       # training images, each with a mask, encoded once
    inp_cases: int = budget(4, 48, 200)           # repaint cases judged per method
    img_sample_steps: int = budget(2, 20, 30)     # sampling steps of every judged image

    @classmethod
    def named(cls, name: str, dry_run: bool = False) -> Profile:
        if name not in PROFILES:
            raise ValueError(
                f"unknown run profile {name!r}: SDLEARN_PROFILE must be one of {', '.join(PROFILES)}"
            )
        smoke_in_dry_run = lambda f: dry_run and f.metadata.get("dry_run_smoke")  # noqa: E731
        values = {f.name: f.metadata["smoke" if smoke_in_dry_run(f) else name] for f in fields(cls)}
        return cls(**{**values, "name": f"{name} (dry run)" if dry_run else name})


def profile(name: str | None = None) -> Profile:
    """The run profile: `name`, else $SDLEARN_PROFILE, else gpu when CUDA is available, else cpu; a dry run of it
    when $SDLEARN_DRY_RUN is 1."""
    name = name or os.environ.get("SDLEARN_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    return Profile.named(name.strip().lower(), dry_run=os.environ.get("SDLEARN_DRY_RUN", "0") not in ("", "0"))


def device() -> torch.device:
    """$SDLEARN_DEVICE if set, else cuda when available, else cpu."""
    if "SDLEARN_DEVICE" in os.environ:
        return torch.device(os.environ["SDLEARN_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return a torch.Generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------
# Student notebooks

ROOT = Path(__file__).resolve().parent.parent
COLAB_TAG = "colab-setup"
REPO_UNSET = "OWNER_UNSET/sdlearn"  # pyproject.toml's placeholder (no GitHub account can have that name)


def repo(root: Path = ROOT) -> str:
    """The GitHub repository the course is published at, "owner/name": pyproject.toml's [project.urls]
    Repository, the one place to set it. The Colab badges and set-up cells are written from it."""
    text = (root / "pyproject.toml").read_text()
    m = re.search(r'^Repository\s*=\s*"https://github\.com/([\w.-]+/[\w.-]+?)/?"', text, re.M)
    if not m:
        raise ValueError(f"{root / 'pyproject.toml'}: [project.urls] needs Repository = \"https://github.com/"
                         f"owner/name\", the address the Colab badges and installs use")
    return m.group(1)


def colab_cell_source(repo_name: str) -> str:
    if repo_name == REPO_UNSET:
        return ("# Colab only: install sdlearn (does nothing elsewhere)\n"
                "import sys\n"
                "\n"
                "if 'google.colab' in sys.modules:\n"
                "    raise RuntimeError('this copy of the course does not say where sdlearn is published: its '\n"
                "                       'maintainer sets [project.urls] Repository in pyproject.toml')")
    return ("# Colab only: install sdlearn (does nothing elsewhere)\n"
            "import subprocess\n"
            "import sys\n"
            "\n"
            "if 'google.colab' in sys.modules:\n"
            "    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',\n"
            f"                    'sdlearn @ git+https://github.com/{repo_name}'], check=True)")


def colab_badge(notebook: str, repo_name: str) -> str:
    url = f"https://colab.research.google.com/github/{repo_name}/blob/main/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def _with_colab_cell(nb, repo_name: str):
    """The notebook with the Colab set-up cell first (inserted, or rewritten to the current repository)."""
    import nbformat  # optional: only the notebook build needs it (a dev dependency; notebooks import this module)

    cell = nbformat.v4.new_code_cell(colab_cell_source(repo_name), metadata={"tags": [COLAB_TAG]})
    cell.id = COLAB_TAG
    first = nb.cells[0] if nb.cells else None
    if first is not None and COLAB_TAG in first.get("metadata", {}).get("tags", []):
        first.source = cell.source
    else:
        nb.cells.insert(0, cell)
    return nb


def _check_nbgrader_metadata(nb, path: Path) -> None:
    """Every solution region must sit in an nbgrader solution cell with a unique grade_id."""
    ids = set()
    for i, cell in enumerate(nb.cells):
        meta = cell.get("metadata", {}).get("nbgrader")
        if "### BEGIN SOLUTION" in cell.source and not (meta and meta.get("solution")):
            raise ValueError(f"{path.name} cell {i}: has '### BEGIN SOLUTION' but no nbgrader solution metadata")
        if meta:
            gid = meta.get("grade_id")
            if not gid or gid in ids:
                raise ValueError(f"{path.name} cell {i}: nbgrader grade_id missing or repeated ({gid!r})")
            ids.add(gid)


def student_version(nb):
    """Clear solutions and outputs with nbgrader's preprocessors: what a learner receives."""
    from nbgrader.preprocessors import ClearHiddenTests, ClearOutput, ClearSolutions  # optional: a dev dependency

    nb = copy.deepcopy(nb)
    resources = {}
    for pre in (ClearSolutions(), ClearHiddenTests(), ClearOutput()):
        nb, resources = pre.preprocess(nb, resources)
    return nb


def points(nb) -> int:
    """The nbgrader points a notebook's graded cells are worth."""
    return sum(c.metadata.get("nbgrader", {}).get("points", 0) for c in nb.cells
               if c.metadata.get("nbgrader", {}).get("grade"))


def _readme_table(notebooks: dict[str, int], repo_name: str) -> str:
    """The README's notebook map: name -> nbgrader points, with the Colab badges and the total."""
    rows = ["| notebook | points | open |", "| --- | --- | --- |"]
    rows += [f"| [{n}](notebooks/{n}) | {p} | {colab_badge(n, repo_name)} |" for n, p in notebooks.items()]
    rows.append(f"| all | {sum(notebooks.values())} | |")
    return "\n".join(rows)


README_BEGIN, README_END = "<!-- notebooks:begin -->", "<!-- notebooks:end -->"


def build_notebooks(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write notebooks/ from solutions/; return the paths that changed (or would change, with check)."""
    import nbformat  # optional: only the notebook build needs it

    sol_dir, out_dir = root / "solutions", root / "notebooks"
    sources = sorted(sol_dir.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks in {sol_dir}")
    repo_name = repo(root)
    writes: dict[Path, str] = {}
    worth: dict[str, int] = {}
    for src in sources:
        nb = nbformat.read(src, as_version=4)
        _check_nbgrader_metadata(nb, src)
        worth[src.name] = points(nb)
        nb = _with_colab_cell(nb, repo_name)
        writes[src] = nbformat.writes(nb) + "\n"
        writes[out_dir / src.name] = nbformat.writes(student_version(nb)) + "\n"
    stale = [p for p in out_dir.glob("*.ipynb") if p.name not in {s.name for s in sources}]
    readme = root / "README.md"
    if readme.exists():
        text = readme.read_text()
        if README_BEGIN in text and README_END in text:
            head, rest = text.split(README_BEGIN, 1)
            _, tail = rest.split(README_END, 1)
            table = _readme_table(worth, repo_name)
            writes[readme] = f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}"
    changed = [str(p.relative_to(root)) for p, t in writes.items() if not p.exists() or p.read_text() != t]
    changed += [str(p.relative_to(root)) for p in stale]
    if not check:
        out_dir.mkdir(exist_ok=True)
        for p, t in writes.items():
            if not p.exists() or p.read_text() != t:
                p.write_text(t)
        for p in stale:
            p.unlink()
    return changed


def make_course(dest: Path, root: Path = ROOT) -> list[str]:
    """An nbgrader course folder at `dest`, one assignment per solutions notebook; returns the assignments.

    dest/nbgrader_config.py is grading/nbgrader_config.py (kept if already there: it may hold your edits);
    dest/source/<name>/<name>.ipynb is solutions/<name>.ipynb (refreshed on every run).
    """
    dest = Path(dest)
    sources = sorted((root / "solutions").glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks in {root / 'solutions'}")
    dest.mkdir(parents=True, exist_ok=True)
    config = dest / "nbgrader_config.py"
    if not config.exists():
        shutil.copy(root / "grading" / "nbgrader_config.py", config)
    for src in sources:
        (dest / "source" / src.stem).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest / "source" / src.stem / src.name)
    return [s.stem for s in sources]


def _print_profile(p: Profile) -> None:
    """One knob per line, grouped by the notebook that reads it (the comments in Profile's body)."""
    import inspect

    comments = {}
    try:
        source = inspect.getsource(Profile).splitlines()
    except OSError:  # no source at hand (a frozen install): the knobs without their comments
        source = [f"{f.name}: knob( #" for f in fields(Profile)]
    for line in source:
        name, _, rest = line.strip().partition(":")
        if any(kind in rest for kind in ("knob(", "budget(", "batch(")):
            comments[name] = rest.split("#", 1)[1].strip() if "#" in rest else ""
        elif line.strip().startswith("# "):
            comments[line.strip()] = None  # a group heading
    print(f"run profile: {p.name} (set SDLEARN_PROFILE to one of {', '.join(PROFILES)})")
    for key, comment in comments.items():
        if comment is None:
            print(f"\n{key[2:]}")
        elif key != "name":
            print(f"  {key:<16} {getattr(p, key):>6}   {comment}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlearn.course")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-notebooks", help="write notebooks/ (student versions) from solutions/")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if notebooks/ is out of date")
    sub.add_parser("profile", help="print the active run profile, one size per line")
    m = sub.add_parser("make-course", help="make an nbgrader course folder, one assignment per notebook")
    m.add_argument("dir", type=Path, help="the course folder (created if missing)")
    args = parser.parse_args(argv)
    if args.cmd == "profile":
        try:
            _print_profile(profile())
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
        return 0
    if args.cmd == "make-course":
        names = make_course(args.dir)
        print(f"{args.dir}: nbgrader_config.py and {len(names)} assignments in source/ ({', '.join(names)});\n"
              f"next: cd {args.dir} && nbgrader generate_assignment {names[0]}   (see the README's instructor guide)")
        return 0
    changed = build_notebooks(check=args.check)
    if repo() == REPO_UNSET:
        print(f"note: pyproject.toml names no repository yet ({REPO_UNSET}): the Colab badges lead nowhere and the "
              f"Colab set-up cell says so; set [project.urls] Repository and run this again")
    if args.check and changed:
        print("out of date (run: python -m sdlearn.course build-notebooks):\n  " + "\n  ".join(changed))
        return 1
    print(("up to date" if args.check else "wrote") + f": {len(changed)} file(s) changed"
          + "".join(f"\n  {c}" for c in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
