"""The package's layout, checked: the growth rule (a module imports only modules of earlier notebooks and the shared
helpers, so a learner at notebook k never meets code of notebook k+1), every module placed in a notebook, and short
functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sdlearn"

# the notebook that teaches each module (the README's layout section lists them in this order)
NOTEBOOK = {
    "sdlearn.attention": 1,
    "sdlearn.text": 2, "sdlearn.clip": 2,
    "sdlearn.vae": 3,
    "sdlearn.diffusion": 4, "sdlearn.toy": 4,
    "sdlearn.unet": 5,
    "sdlearn.pipeline": 6,
    "sdlearn.sdxl": 7, "sdlearn.measure": 7,
    "sdlearn.mmdit": 8, "sdlearn.flow": 8, "sdlearn.sd3": 8, "sdlearn.t5": 8,
    "sdlearn.controlnet": 9,
    "sdlearn.adapters": 10, "sdlearn.inpaint": 10,
    # the exercise checkers and the release recipes belong to the notebook that uses them
    "sdlearn.checks.overview": 0, "sdlearn.checks.attention": 1, "sdlearn.checks.text": 2, "sdlearn.checks.vae": 3,
    "sdlearn.checks.diffusion": 4, "sdlearn.checks.unet": 5, "sdlearn.checks.pipeline": 6, "sdlearn.checks.sdxl": 7,
    "sdlearn.checks.mmdit": 8, "sdlearn.checks.samplers": 6, "sdlearn.checks.controlnet": 9,
    "sdlearn.checks.images": 10,
    "sdlearn.recipes.clip": 2, "sdlearn.recipes.vae": 3, "sdlearn.recipes.t2i": 6, "sdlearn.recipes.sdxl": 7,
    "sdlearn.recipes.vae_xl": 7,
    "sdlearn.recipes.mmdit": 8, "sdlearn.recipes.controlnet": 9, "sdlearn.recipes.ip_adapter": 10,
    "sdlearn.recipes.inpaint": 10,
}
# used by every notebook; they import one another only
SHARED = {"sdlearn", "sdlearn.course", "sdlearn.data", "sdlearn.metrics", "sdlearn.viz", "sdlearn.train",
          "sdlearn.pretrained", "sdlearn.checks", "sdlearn.recipes"}
# outside the notebook order, each for a reason: presets builds the real models of every notebook by name (its
# imports happen inside the builder asked for); convert bridges sdlearn and the published checkpoints of every
# family; __main__ is the command line over all of it
OUTSIDE = {"sdlearn.presets", "sdlearn.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """The sdlearn modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdlearn":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in _modules()} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sdlearn"}
    return found


def _placed(name: str) -> bool:
    return name in NOTEBOOK or name in SHARED or name in OUTSIDE or name.startswith("sdlearn.convert")


def test_every_module_is_placed_in_a_notebook():
    unplaced = [m for m in _modules() if not _placed(m)]
    assert not unplaced, f"say which notebook teaches {unplaced} (NOTEBOOK in tests/test_layout.py and the README)"


def _later(module: str, imports: set[str]) -> list[str]:
    """The imports of `module` that a learner at its notebook has not met (a shared helper may import none)."""
    level = NOTEBOOK.get(module, -1)
    return sorted(m for m in imports if m != module and m not in SHARED and NOTEBOOK.get(m, 99) > level)


@pytest.mark.parametrize("module", [m for m in _modules() if m in NOTEBOOK or m in SHARED])
def test_a_module_imports_no_later_notebook(module):
    later = _later(module, _imports(_modules()[module]))
    assert not later, (f"{module} (notebook {NOTEBOOK.get(module, 'shared')}) imports {later}, of later notebooks "
                       f"{[NOTEBOOK.get(m) for m in later]}: move the code to the notebook that teaches it")


def test_the_growth_rule_sees_what_it_should():
    assert {"sdlearn.attention", "sdlearn.diffusion", "sdlearn.vae"} <= _imports(_modules()["sdlearn.unet"])
    assert _later("sdlearn.unet", {"sdlearn.vae", "sdlearn.sdxl", "sdlearn.data"}) == ["sdlearn.sdxl"]
    assert _later("sdlearn.data", {"sdlearn.unet", "sdlearn.course"}) == ["sdlearn.unet"]  # shared: no notebook's
    assert _later("sdlearn.sdxl", {"sdlearn.controlnet"}) == ["sdlearn.controlnet"]       # unplaced: never earlier


def _long_functions(limit: int = 60) -> list[str]:
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit:
                long.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return long


def test_functions_are_short():
    assert not _long_functions(), "split these (or say in the README's layout section why not)"
