import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlearn import course

ROOT = Path(__file__).resolve().parent.parent


def test_profiles_are_frozen_and_complete():
    for name in course.PROFILES:
        p = course.profile(name)
        assert p.name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.batch_size = 1
    smoke, cpu, gpu = (course.profile(n) for n in course.PROFILES)
    # smoke is the cheapest on every training budget, gpu the largest
    for f in ("clip_steps", "vae_steps", "pixel_steps", "ldm_steps"):
        assert getattr(smoke, f) < getattr(cpu, f) <= getattr(gpu, f), f


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("SDLEARN_PROFILE", "cpu")
    assert course.profile().name == "cpu"
    monkeypatch.setenv("SDLEARN_PROFILE", " GPU ")
    assert course.profile().name == "gpu"
    monkeypatch.delenv("SDLEARN_PROFILE")
    assert course.profile().name == ("gpu" if torch.cuda.is_available() else "cpu")


def test_unknown_profile_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("SDLEARN_PROFILE", "laptop")
    with pytest.raises(ValueError, match="'laptop'.*smoke, cpu, gpu"):
        course.profile()


def test_seed_everything_repeats():
    course.seed_everything(3)
    a = torch.randn(4)
    g = course.seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(3)))


def test_device_override(monkeypatch):
    monkeypatch.setenv("SDLEARN_DEVICE", "cpu")
    assert course.device() == torch.device("cpu")


def test_notebooks_are_up_to_date():
    r = subprocess.run([sys.executable, "-m", "sdlearn.course", "build-notebooks", "--check"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_detects_a_stale_student_notebook(tmp_path):
    import shutil

    for d in ("solutions", "notebooks"):
        shutil.copytree(ROOT / d, tmp_path / d)
    assert course.build_notebooks(tmp_path, check=True) == []
    nb = tmp_path / "notebooks" / "00_overview.ipynb"
    nb.write_text(nb.read_text().replace("Overview", "Overveiw"))
    assert course.build_notebooks(tmp_path, check=True) == [f"notebooks/{nb.name}"]
    course.build_notebooks(tmp_path)
    assert course.build_notebooks(tmp_path, check=True) == []


def test_build_refuses_a_solution_outside_a_solution_cell(tmp_path):
    import nbformat

    (tmp_path / "solutions").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("x = 1\n### BEGIN SOLUTION\nx = 2\n### END SOLUTION"))
    nbformat.write(nb, tmp_path / "solutions" / "bad.ipynb")
    with pytest.raises(ValueError, match="bad.ipynb cell 0: has '### BEGIN SOLUTION' but no nbgrader"):
        course.build_notebooks(tmp_path)


def test_student_version_clears_solutions_and_outputs():
    import nbformat

    nb = nbformat.read(ROOT / "solutions" / "00_overview.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "### BEGIN SOLUTION" in c.source)
    cell.outputs = [nbformat.v4.new_output("stream", text="hi")]
    student = course.student_version(nb)
    cleared = next(c for c in student.cells if c.id == cell.id)
    assert "### BEGIN SOLUTION" not in cleared.source and "raise NotImplementedError()" in cleared.source
    assert all(not c.get("outputs") for c in student.cells if c.cell_type == "code")
    assert "### BEGIN SOLUTION" in cell.source  # the source is untouched


def test_colab_cell_and_readme_name_one_repository():
    import nbformat

    for d in ("solutions", "notebooks"):
        for path in (ROOT / d).glob("*.ipynb"):
            first = nbformat.read(path, as_version=4).cells[0]
            assert course.COLAB_TAG in first.metadata.get("tags", []), path
            assert f"git+https://github.com/{course.REPO}" in first.source
    readme = (ROOT / "README.md").read_text()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        assert course.colab_badge(path.name) in readme


def test_colab_cell_does_nothing_outside_colab():
    exec(course.colab_cell_source(), {})  # no pip install runs: google.colab is not imported here
    assert "google.colab" not in sys.modules
