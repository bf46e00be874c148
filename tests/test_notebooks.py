"""The student notebooks run, and stop at their first exercise; nbgrader accepts the solutions.

(The solutions notebooks themselves run under nbval: pytest collects solutions/ with --nbval-lax.)
"""
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
STUDENT = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _first(nb, key):
    return next((i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get(key)), None)


@pytest.mark.parametrize("path", STUDENT, ids=[p.stem for p in STUDENT])
def test_student_notebook_runs_to_its_first_exercise(path, monkeypatch):
    monkeypatch.setenv("SDLEARN_PROFILE", "smoke")
    nb = nbformat.read(path, as_version=4)
    first_solution, first_check = _first(nb, "solution"), _first(nb, "grade")
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    if first_solution is None:
        client.execute()  # no exercise: must run clean
        return
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    assert err.value.ename == "NotImplementedError", f"{path.name} failed with {err.value.ename} before its exercise"
    ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count")]
    stopped_at = max(ran)
    assert first_solution <= stopped_at <= first_check, (
        f"{path.name} stopped at cell {stopped_at}, expected between its first exercise ({first_solution}) "
        f"and that exercise's check ({first_check})")


def test_nbgrader_generate_assignment_accepts_the_solutions(tmp_path):
    source = tmp_path / "source" / "sdlearn"
    source.mkdir(parents=True)
    for p in (ROOT / "solutions").glob("*.ipynb"):
        shutil.copy(p, source)
    r = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", "sdlearn", "--force",
                        f"--CourseDirectory.root={tmp_path}",
                        "--CourseDirectory.db_url=sqlite:///" + str(tmp_path / "gb.db")],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    released = sorted(p.name for p in (tmp_path / "release" / "sdlearn").glob("*.ipynb"))
    assert released == sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))
