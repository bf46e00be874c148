"""The course's notebooks timed as a learner runs them: each solutions notebook under nbval in one profile, with
its wall time, its peak memory (the kernel's resident set, and the GPU's memory in use when there is one) and
pass / fail, written to one results file (benchmarks/readme.py renders them into the README).

    python benchmarks/notebooks.py --profile smoke                  # -> results/notebooks_smoke.json
    python benchmarks/notebooks.py --profile cpu --notebooks 06 07  # only these (merged into the results file)
    python benchmarks/notebooks.py --profile gpu --dry-run          # gpu shapes, smoke amounts of work, any device

tools/gpu_validate.sh runs it on a GPU machine (profile gpu, results/gpu_validate.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Seconds one notebook's dry run may take, here and in tests/test_gpu_profile.py (tools/gpu_validate.sh --dry-run
# runs this file). A dry run proves shapes and released files, not amounts of work: each notebook's takes well under
# a minute on 2 CPU cores (the longest, 06 and 07, about 30 s in the test suite on 2026-12-05), about 2 minutes is
# the design limit, and the rest is room for a slow hour on a shared machine.
DRY_RUN_TIMEOUT = 180
TIMEOUT = 1800  # seconds per notebook in a profile's full run (the cpu profile's training notebooks take minutes)


def _gpu_memory_mib() -> float | None:
    """Memory in use on GPU 0 (all processes), from nvidia-smi; None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _tree_rss_mib(proc: psutil.Process) -> dict[int, float]:
    """Resident memory of each process under `proc` (the pytest run and the kernel it starts)."""
    rss = {}
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                rss[p.pid] = p.memory_info().rss / 2**20
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return rss


def reference_s(threads: int) -> float:
    """This machine's speed this minute, to set beside a wall time on a shared machine: the seconds that twenty
    2000x2000 fp32 matrix products take on the CPU with `threads` threads (after one to warm up)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(2000, 2000)
        a @ a
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        return round(time.perf_counter() - start, 2)
    finally:
        torch.set_num_threads(before)


def run_one(path: Path, profile: str, dry_run: bool = False, device: str | None = None,
            timeout: int | None = None) -> dict:
    """Run one notebook under `pytest --nbval-lax` in `profile`; its record (passed, wall_s, peak memory, the date,
    and but for a dry run the machine's reference_s just before it).
    timeout: seconds (default DRY_RUN_TIMEOUT for a dry run, else TIMEOUT)."""
    timeout = timeout or (DRY_RUN_TIMEOUT if dry_run else TIMEOUT)
    env = dict(os.environ, SDLEARN_PROFILE=profile, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("SDLEARN_DRY_RUN", None)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # else the repository's conftest.py sets 1 (for xdist)
    if dry_run:
        env["SDLEARN_DRY_RUN"] = "1"
    if device:
        env["SDLEARN_DEVICE"] = device
    # the repository's sdlearn, installed or not (the GPU machine imports it from here)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=", "-q", "--durations=5", "--durations-min=1", f"--nbval-cell-timeout={timeout}", str(path)]
    reference = None if dry_run else reference_s(int(env["OMP_NUM_THREADS"]))   # a dry run times no work
    gpu0 = _gpu_memory_mib()
    peak = {"rss": 0.0, "gpu": gpu0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def watch():  # sample memory every 0.2 s until the run ends
        while not done.wait(0.2):
            peak["rss"] = max(peak["rss"], sum(v for pid, v in _tree_rss_mib(ps).items() if pid != proc.pid))
            gpu = _gpu_memory_mib()
            if gpu is not None:
                peak["gpu"] = max(peak["gpu"], gpu)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output = (proc.communicate()[0] or "") + f"\ntimed out after {timeout} s"
    done.set()
    watcher.join()
    wall = time.perf_counter() - start
    record = {"notebook": path.stem, "passed": proc.returncode == 0, "wall_s": round(wall, 1),
              "date": datetime.date.today().isoformat(), **({"reference_s": reference} if reference else {}),
              "peak_kernel_rss_mib": round(peak["rss"]),
              "peak_gpu_mib": None if peak["gpu"] is None else round(peak["gpu"] - (gpu0 or 0))}
    # where the time went: pytest's --durations lines, "12.34s call     solutions/06_x.ipynb::Cell 12"
    durations = re.finditer(r"^([\d.]+)s call\s+\S+::(Cell \d+)", output, re.M)
    record["slowest_cells"] = {m.group(2): float(m.group(1)) for m in durations}
    if not record["passed"]:
        record["output_tail"] = output[-4000:]
    return record


def machine() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def validate(profile: str, notebooks: list[str] | None = None, dry_run: bool = False, device: str | None = None,
             out: Path | None = None, timeout: int | None = None) -> dict:
    """Run the chosen solutions notebooks (all by default) and merge their records into `out`."""
    paths = sorted((ROOT / "solutions").glob("*.ipynb"))
    if notebooks:
        paths = [p for p in paths if any(p.stem.startswith(n) for n in notebooks)]
        if not paths:
            raise SystemExit(f"error: no solutions notebook starts with {', '.join(notebooks)}")
    name = profile + ("_dry_run" if dry_run else "")
    out = out or RESULTS / f"notebooks_{name}.json"
    result = json.loads(out.read_text()) if out.exists() and notebooks else {"notebooks": {}}
    result.update(profile=profile, dry_run=dry_run, date=datetime.date.today().isoformat(), machine=machine(),
                  command="python benchmarks/notebooks.py " + " ".join(sys.argv[1:]))
    for path in paths:
        print(f"{path.stem} ...", end=" ", flush=True)
        rec = result["notebooks"][path.stem] = run_one(path, profile, dry_run, device, timeout)
        print(("passed" if rec["passed"] else "FAILED") + f" in {rec['wall_s']} s, kernel {rec['peak_kernel_rss_mib']}"
              f" MiB" + ("" if rec["peak_gpu_mib"] is None else f", GPU {rec['peak_gpu_mib']} MiB"), flush=True)
        if not rec["passed"]:
            print(rec["output_tail"])
    recs = result["notebooks"].values()
    result["all_passed"] = all(r["passed"] for r in recs)
    result["total_s"] = round(sum(r["wall_s"] for r in recs), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{'all passed' if result['all_passed'] else 'SOME FAILED'}; {result['total_s']} s in all; wrote {out}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["smoke", "cpu", "gpu"], required=True)
    ap.add_argument("--notebooks", nargs="*", help="number prefixes (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="the profile's shapes, the smoke profile's amounts of work")
    ap.add_argument("--device", help="SDLEARN_DEVICE for the notebooks (default: cuda when available)")
    ap.add_argument("--timeout", type=int, help=f"seconds per notebook (default {TIMEOUT}; a dry run's: "
                                                 f"{DRY_RUN_TIMEOUT})")
    ap.add_argument("--out", type=Path, help="results file (default results/notebooks_<profile>[_dry_run].json)")
    args = ap.parse_args(argv)
    result = validate(args.profile, args.notebooks, args.dry_run, args.device, args.out, args.timeout)
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
