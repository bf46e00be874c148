"""An instructor's path, with nbgrader itself and the configuration in grading/: make the course folder, release
every notebook, collect three submissions, autograde, read the gradebook, hand back feedback.

    solved    every exercise filled in with the solution: full marks on every notebook, and no cell fails
              (this is the solutions notebook run in the smoke profile: nbval's proof, see below)
    unsolved  the released notebooks as they are: zero on every graded cell, and the grading still finishes;
              they are the student notebooks of notebooks/, and each runs clean up to its first exercise
    partly    one known mistake per notebook: the marks of the other exercises, and feedback naming the mistake

Each submission is one full run of its notebook in the smoke profile, so the grading round also proves what a
separate run would: the solved submission is the solutions notebook (solution markers aside), so every solutions
notebook running under nbval (`pytest --nbval-lax solutions/`, no longer in the default run) is the same proof as
`test_a_solved_submission_runs_every_cell_without_an_error`; the unsolved submission is the student notebook, so
`test_the_student_notebooks_run_to_their_first_exercise` is what running notebooks/ to its first exercise proved.

The notebooks are graded in ROUNDS course folders of their own (notebook i in round i % ROUNDS), one test class
each: `--dist loadscope` keeps a class on one worker, so the rounds spread over the xdist workers.
"""
import copy
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sdlearn.course import points

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
ASSIGNMENTS = [p.stem for p in SOLUTIONS]
ROUNDS = 2  # one per xdist worker on 2 cores: each round costs four start-ups (make-course and three nbgrader apps)

# notebook: (its exercise with a mistake, the code replaced, the mistake, what the checker's message says)
MISTAKES = {
    "00_overview": (1, "return o.color, o.shape, o.position", "return o.color, o.shape",
                    "a wrong position should be False: compare .position"),
    "01_self_attention": (1, " / math.sqrt(d)", "", "missing the 1/sqrt(d) scaling"),
    "02_cross_attention": (2, ".tril()", ".triu()", "token i may attend to the *later* tokens"),
    "03_vae": (1, "torch.exp(0.5 * logvar)", "torch.exp(logvar)",
               "you used exp(logvar), the variance, as the standard deviation"),
    "04_ddpm_noising": (1, "(1 - abar).sqrt() * noise", "(1 - abar) * noise",
                        "the noise coefficient needs a square root: sqrt(1 - abar_t)"),
    "05_unet": (1, "[torch.cos(args), torch.sin(args)]", "[torch.sin(args), torch.cos(args)]",
                "the halves are swapped"),
    "06_latent_diffusion": (1, "< p_uncond", "> p_uncond", "is the comparison the wrong way round?"),
    "06b_samplers": (1, "x / (sigma**2 + 1) ** 0.5", "x", "forgot the input scaling"),
    "07_sdxl_refiner": (3, "t >= cutoff", "t > cutoff", "expected the base to get 40 timesteps"),
    "08_mmdit": (3, "x * (1 + scale[:, None])", "x * scale[:, None]", "the scale is 1 + scale"),
    "09_controlnet": (2, "r * scale for s, r", "r for s, r", "the mid block gets residual * scale but the skips'"),
    "10_image_prompts_inpainting": (1, "text + scale * image", "scale * text + image",
                                    "the scale is on the text's term"),
}
STUDENTS = ("solved", "unsolved", "partly")
MARKERS = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n", re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _nbgrader(course: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, capture_output=True, text=True,
                       timeout=1500)
    if r.returncode != 0:
        log = r.stdout + r.stderr
        first = next((i for i in (log.find("Traceback"), log.find("| ERROR]")) if i >= 0), -1)   # the first error's
        # own lines, which a long log's tail leaves out
        cause = f"{log[max(0, first - 1500):first + 6000]}\n[...]\n" if first >= 0 else ""
        raise AssertionError(f"nbgrader {' '.join(args)} failed:\n{cause}{log[-3000:]}")
    return r.stdout + r.stderr


def _answers(name: str) -> dict[str, str]:
    """grade_id -> the solution cell's code, as a learner would type it (no solution markers)."""
    nb = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
    return {c.metadata.nbgrader["grade_id"]: MARKERS.sub("", c.source) for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def _submission(released, name: str, student: str):
    nb = copy.deepcopy(released)
    if student == "unsolved":
        return nb
    answers = _answers(name)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers and cell.metadata.nbgrader.get("solution"):
            cell.source = answers[gid]
            k, old, new, _ = MISTAKES[name]
            if student == "partly" and gid == f"{name}-solution-{k}":
                assert old in cell.source, f"{gid}: the mistake to make, {old!r}, is not in the solution"
                cell.source = cell.source.replace(old, new)
    return nb


def _autograded(course: Path, student: str, name: str):
    return nbformat.read(course / "autograded" / student / name / f"{name}.ipynb", as_version=4)


def _errors(nb) -> list[tuple[int, object]]:
    """(cell index, error output) for every cell that raised, in order."""
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.output_type == "error"]


def _first(nb, key):
    return next((i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get(key)), None)


class _GradingRound:
    """The instructor's path for the notebooks of one round (NOTEBOOKS, set by each subclass below)."""

    NOTEBOOKS: list[str] = []

    @pytest.fixture(scope="class")
    @classmethod
    def course(cls, tmp_path_factory):
        names = cls.NOTEBOOKS
        course = tmp_path_factory.mktemp("course")
        r = subprocess.run([sys.executable, "-m", "sdlearn.course", "make-course", str(course)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        # The rounds start kernels side by side, and over TCP two kernels started at once can be handed the same
        # free port (jupyter_client picks it, the kernel binds it later): a client then waits on the wrong kernel
        # ("Kernel didn't respond in 60 seconds") and a whole assignment fails. Unix sockets under an absolute
        # prefix of this round's own (a relative one resolves in the notebook's folder for the kernel and in the
        # course folder for nbgrader) have no such race.
        with open(course / "nbgrader_config.py", "a") as f:
            f.write(f'\nc.KernelManager.transport = "ipc"\nc.KernelManager.ip = {str(course / "kernel")!r}\n')
        for other in set(ASSIGNMENTS) - set(names):  # the other rounds grade these
            shutil.rmtree(course / "source" / other)
        logs = {"generate_assignment": _nbgrader(course, "generate_assignment", "*")}
        for name in names:
            released = nbformat.read(course / "release" / name / f"{name}.ipynb", as_version=4)
            for student in STUDENTS:
                folder = course / "submitted" / student / name
                folder.mkdir(parents=True)
                nbformat.write(_submission(released, name, student), folder / f"{name}.ipynb")
        logs["autograde"] = _nbgrader(course, "autograde", "*")
        logs["generate_feedback"] = _nbgrader(course, "generate_feedback", "*", "--student=partly")
        return course, logs

    def _grades(self, course: Path, student: str) -> dict[str, dict[str, tuple[float, float]]]:
        """assignment -> {grade cell: (score, max score)}, from nbgrader's gradebook."""
        from nbgrader.api import Gradebook

        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
            return {name: {g.name: (g.score, g.max_score) for nb in gb.find_submission(name, student).notebooks
                           for g in nb.grades} for name in self.NOTEBOOKS}

    def test_the_configuration_is_read_and_nothing_warns_about_a_setting(self, course):
        _, logs = course
        for app, log in logs.items():
            for bad in ("No nbgrader_config.py", "not recognized", "Config option", "deprecated"):
                assert bad not in log, f"nbgrader {app}: {bad!r} in its log:\n{log[-2000:]}"

    def test_a_solved_submission_gets_full_marks_on_every_notebook(self, course):
        for name, grades in self._grades(course[0], "solved").items():
            lost = {g: s for g, s in grades.items() if s[0] != s[1]}
            assert not lost, f"{name}: a solved submission lost marks on {lost}"
            nb = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
            assert sum(m for _, m in grades.values()) == points(nb)

    def test_a_solved_submission_runs_every_cell_without_an_error(self, course):
        """What `pytest --nbval-lax solutions/` proves: every cell of every solutions notebook runs clean in the
        smoke profile (the solved submission is that notebook, hidden tests included)."""
        for name in self.NOTEBOOKS:
            graded = _autograded(course[0], "solved", name)
            solutions = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
            assert [MARKERS.sub("", c.source) for c in graded.cells if c.cell_type == "code"] == [
                MARKERS.sub("", c.source) for c in solutions.cells if c.cell_type == "code"], (
                f"{name}: the solved submission is not the solutions notebook")
            for i, error in _errors(graded)[:1]:
                trace = ANSI.sub("", "\n".join(error.traceback))
                pytest.fail(f"solutions/{name}.ipynb, cell {i}, raised {error.ename} in the smoke profile:\n"
                            f"{graded.cells[i].source}\n{trace[-3000:]}")

    def test_an_unsolved_submission_gets_zero_on_every_graded_cell(self, course):
        for name, grades in self._grades(course[0], "unsolved").items():
            assert grades and all(s == 0 for s, _ in grades.values()), f"{name}: {grades}"

    def test_the_student_notebooks_run_to_their_first_exercise(self, course):
        """The unsolved submission is notebooks/<name>.ipynb as shipped; it runs clean until its first exercise,
        which raises NotImplementedError (a learner meets their first task, not a crash)."""
        for name in self.NOTEBOOKS:
            student = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
            released = nbformat.read(course[0] / "release" / name / f"{name}.ipynb", as_version=4)
            code = [[c.source for c in nb.cells if c.cell_type == "code"] for nb in (student, released)]
            assert code[0] == code[1], f"notebooks/{name}.ipynb differs from what nbgrader releases"
            graded = _autograded(course[0], "unsolved", name)
            assert len(graded.cells) == len(student.cells), f"{name}: autograde added or dropped cells"
            first_solution, first_check = _first(student, "solution"), _first(student, "grade")
            errors = _errors(graded)
            if first_solution is None:
                assert not errors, f"{name} has no exercise and must run clean: {errors[0][1].ename} in cell " \
                                   f"{errors[0][0]}"
                continue
            assert errors, f"{name}: no cell stopped the unsolved notebook"
            stopped_at, error = errors[0]
            assert error.ename == "NotImplementedError", f"{name} failed with {error.ename} before its exercise"
            assert first_solution <= stopped_at <= first_check, (
                f"{name}.ipynb stopped at cell {stopped_at}, expected between its first exercise ({first_solution}) "
                f"and that exercise's check ({first_check})")

    def test_a_partly_wrong_submission_gets_the_marks_of_its_right_exercises_only(self, course):
        for name, grades in self._grades(course[0], "partly").items():
            wrong = f"{name}-check-{MISTAKES[name][0]}"
            assert grades[wrong][0] == 0, f"{name}: the wrong exercise scored {grades[wrong]}"
            others = {g: s for g, s in grades.items() if g != wrong and s[0] != s[1]}
            assert not others, f"{name}: the right exercises lost marks: {others}"

    def test_the_feedback_names_the_mistake(self, course):
        course, _ = course
        for name in self.NOTEBOOKS:
            page = course / "feedback" / "partly" / name / f"{name}.html"
            text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))
            assert "CheckFailed" in text and MISTAKES[name][3] in text, f"{page.name}: the checker's message is missing"

    def test_every_notebook_has_hidden_tests_that_the_release_does_not_show(self, course):
        course, _ = course
        for name in self.NOTEBOOKS:
            source = (ROOT / "solutions" / f"{name}.ipynb").read_text()
            released = (course / "release" / name / f"{name}.ipynb").read_text()
            assert "### BEGIN HIDDEN TESTS" in source, f"{name}: no graded cell has hidden tests"
            assert "HIDDEN TESTS" not in released and "HIDDEN TESTS" not in (ROOT / "notebooks" / f"{name}.ipynb"
                                                                           ).read_text()
            graded = (course / "autograded" / "solved" / name / f"{name}.ipynb").read_text()
            assert "### BEGIN HIDDEN TESTS" in graded, f"{name}: autograde did not restore the hidden tests"


def test_every_notebook_is_graded_in_one_round():
    rounds = [ASSIGNMENTS[i::ROUNDS] for i in range(ROUNDS)]
    assert sorted(n for r in rounds for n in r) == ASSIGNMENTS
    assert set(MISTAKES) == set(ASSIGNMENTS), "each notebook needs its known mistake for the partly submission"


for _i in range(ROUNDS):
    _names = ASSIGNMENTS[_i::ROUNDS]
    if _names:
        _cls = type(f"TestGrading_{'_'.join(n[:2] for n in _names)}", (_GradingRound,), {"NOTEBOOKS": _names})
        globals()[_cls.__name__] = _cls
