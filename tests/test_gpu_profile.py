"""The gpu profile, proven on a CPU: every solutions notebook runs under nbval with the gpu profile's shapes
(image sizes, widths, depths, DataLoader workers, the released models it loads) and the smoke profile's amounts
of work and batch sizes (SDLEARN_DRY_RUN=1), through the same runner that validates the course on a GPU
(benchmarks/notebooks.py, called by tools/gpu_validate.sh --dry-run), so a learner on Colab cannot be the first to
meet a wrong shape or a missing file. One class per notebook lets them spread over the xdist workers.
"""
import importlib.util
from pathlib import Path

from sdlearn import course

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner, readme = _benchmark("notebooks"), _benchmark("readme")


def test_a_dry_run_keeps_the_shapes_and_cuts_the_work(monkeypatch):
    monkeypatch.setenv("SDLEARN_PROFILE", "gpu")
    monkeypatch.setenv("SDLEARN_DRY_RUN", "1")
    dry, gpu, smoke = course.profile(), course.Profile.named("gpu"), course.Profile.named("smoke")
    assert dry.name == "gpu (dry run)"
    for f in course.fields(course.Profile):
        if f.name != "name":
            want = smoke if f.metadata.get("dry_run_smoke") else gpu
            assert getattr(dry, f.name) == getattr(want, f.name), f.name
    assert dry.image_size == 64 and dry.pixel_width == gpu.pixel_width and dry.ldm_steps == smoke.ldm_steps
    assert dry.ldm_batch == smoke.ldm_batch


def _dry_run_test(path: Path):
    def test_the_solutions_notebook_runs_in_a_dry_run_of_the_gpu_profile(self):
        record = runner.run_one(path, "gpu", dry_run=True, device="cpu", timeout=runner.DRY_RUN_TIMEOUT)
        assert record["passed"], f"{path.name} failed in a dry run of the gpu profile:\n{record.get('output_tail')}"
        assert record["peak_kernel_rss_mib"] > 50  # the memory watcher saw the kernel

    test = test_the_solutions_notebook_runs_in_a_dry_run_of_the_gpu_profile
    return type(f"TestDryRun_{path.stem}", (), {test.__name__: test})


# One class per notebook: `--dist loadscope` (pyproject.toml) keeps a module's tests and a notebook's cells on one
# worker, and a class is a scope of its own, so these runs, up to minutes each, spread over the workers.
for _path in SOLUTIONS:
    _cls = _dry_run_test(_path)
    globals()[_cls.__name__] = _cls


def test_the_readmes_measured_tables_are_rendered_from_the_results_files():
    assert readme.render(check=True), (
        "README.md's notebook-times or speed table differs from what benchmarks/results/ holds: run "
        "`python benchmarks/readme.py`"
    )
