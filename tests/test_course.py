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


def test_notebooks_are_up_to_date(capsys):
    # `python -m sdlearn.course build-notebooks --check`, in this process (the command line itself is tested below)
    code = course.main(["build-notebooks", "--check"])
    assert code == 0, capsys.readouterr().out


def test_check_detects_a_stale_student_notebook(tmp_path):
    import shutil

    for d in ("solutions", "notebooks"):
        shutil.copytree(ROOT / d, tmp_path / d)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert course.build_notebooks(tmp_path, check=True) == []
    nb = tmp_path / "notebooks" / "00_overview.ipynb"
    nb.write_text(nb.read_text().replace("Overview", "Overveiw"))
    assert course.build_notebooks(tmp_path, check=True) == [f"notebooks/{nb.name}"]
    course.build_notebooks(tmp_path)
    assert course.build_notebooks(tmp_path, check=True) == []


def test_build_refuses_a_solution_outside_a_solution_cell(tmp_path):
    import nbformat

    (tmp_path / "solutions").mkdir()
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
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


def test_colab_cell_and_readme_name_the_repository_pyproject_names():
    import nbformat

    name = course.repo()
    for d in ("solutions", "notebooks"):
        for path in (ROOT / d).glob("*.ipynb"):
            first = nbformat.read(path, as_version=4).cells[0]
            assert course.COLAB_TAG in first.metadata.get("tags", []), path
            assert first.source == course.colab_cell_source(name), path
    readme = (ROOT / "README.md").read_text()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        assert course.colab_badge(path.name, name) in readme


def test_the_repository_is_set_in_pyproject_and_nowhere_else(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project.urls]\nRepository = "https://github.com/ada/sd-course/"\n')
    assert course.repo(tmp_path) == "ada/sd-course"
    assert "git+https://github.com/ada/sd-course'" in course.colab_cell_source("ada/sd-course")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "sdlearn"\n')
    with pytest.raises(ValueError, match=r"\[project.urls\] needs Repository"):
        course.repo(tmp_path)
    sources = [p.read_text() for p in ROOT.glob("sdlearn/**/*.py")] + [(ROOT / "README.md").read_text()]
    assert not any("sdlearn/sdlearn" in s for s in sources), "an address hard-coded outside pyproject.toml"


def test_an_unset_repository_stops_the_colab_cell_with_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", object())
    with pytest.raises(RuntimeError, match="does not say where sdlearn is published"):
        exec(course.colab_cell_source(course.REPO_UNSET), {})


def test_colab_cell_does_nothing_outside_colab():
    exec(course.colab_cell_source("ada/sd-course"), {})  # no pip install runs: google.colab is not imported here
    assert "google.colab" not in sys.modules


def test_profile_prints_one_knob_per_line_grouped_by_notebook():
    r = subprocess.run([sys.executable, "-m", "sdlearn.course", "profile"], capture_output=True, text=True,
                       env={**__import__("os").environ, "SDLEARN_PROFILE": "cpu"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("run profile: cpu")
    for f in dataclasses.fields(course.Profile):
        if f.name != "name":
            row = next((ln for ln in lines if ln.split()[:1] == [f.name]), None)
            assert row is not None and row.split()[1] == str(f.metadata["cpu"]), f.name
    assert "08 MMDiT" in lines and lines.index("06 latent diffusion") < lines.index("07 SDXL refiner")


def test_an_unknown_profile_is_a_one_line_error_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "sdlearn.course", "profile"], capture_output=True, text=True,
                       env={**__import__("os").environ, "SDLEARN_PROFILE": "bogus"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: unknown run profile 'bogus': SDLEARN_PROFILE must be one of "
                                             "smoke, cpu, gpu"]


def test_make_course_lays_out_one_assignment_per_notebook_and_keeps_an_edited_config(tmp_path):
    names = course.make_course(tmp_path)
    assert names == [p.stem for p in sorted((ROOT / "solutions").glob("*.ipynb"))]
    for n in names:
        assert (tmp_path / "source" / n / f"{n}.ipynb").read_bytes() == (ROOT / "solutions" / f"{n}.ipynb").read_bytes()
    config = tmp_path / "nbgrader_config.py"
    assert config.read_text() == (ROOT / "grading" / "nbgrader_config.py").read_text()
    config.write_text(config.read_text() + "c.Execute.timeout = 900\n")
    course.make_course(tmp_path)
    assert config.read_text().endswith("c.Execute.timeout = 900\n")


def test_nbsource_round_trips_every_solutions_notebook():
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("nbsource", ROOT / "tools" / "nbsource.py")
    nbsource = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nbsource)
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        back = nbsource.to_ipynb(nbsource.to_script(nb), path.stem)
        cells = [c for c in nb.cells if course.COLAB_TAG not in c.metadata.get("tags", [])]
        assert [c.source for c in back.cells] == [c.source for c in cells], path.name
        assert [c.metadata.get("nbgrader") for c in back.cells] == [c.metadata.get("nbgrader") for c in cells]


def test_generate_default_output_is_ignored_by_git():
    r = subprocess.run(["git", "check-ignore", "-q", "out.png"], cwd=ROOT)
    assert r.returncode == 0, "python -m sdlearn generate writes out.png by default: .gitignore should name it"


def test_environment_yml_uses_conda_forge_and_names_every_dependency():
    import re

    text = (ROOT / "environment.yml").read_text()
    channels = re.search(r"^channels:\n((?:  - .*\n)+)", text, re.M).group(1).split()[1::2]
    assert channels == ["conda-forge", "nodefaults"], f"channels {channels}: conda-forge only (pytorch's is frozen)"
    conda = {line.split()[1].split("=")[0].split(">")[0] for line in text.splitlines() if re.match(r"  - \w", line)}
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    needed = {re.split(r"[<>=\[ ]", d.strip().strip('"'))[0] for d in deps.split(",") if d.strip()}
    conda_name = {"torch": "pytorch"}  # the few packages conda-forge names differently from PyPI
    missing = sorted(n for n in needed if conda_name.get(n, n) not in conda)
    assert not missing, f"environment.yml lacks {missing}, which pyproject.toml needs"
    assert '-e ".[dev]"' in text  # and the dev extras (nbgrader, nbval, diffusers, ...) come through pip
