"""Author solutions notebooks as plain text, with nbgrader metadata added for you.

    python tools/nbsource.py to-ipynb  src.py  solutions/05_unet.ipynb
    python tools/nbsource.py to-script solutions/05_unet.ipynb  src.py

The text form is the "percent" format (as jupytext writes it):

    # %% [markdown]
    # # A title
    # %%
    x = 1
    # %% solution          <- an exercise: holds ### BEGIN SOLUTION / ### END SOLUTION
    # %% check 3           <- the checker cell that follows an exercise (graded, locked), worth 3 points
                              (1 when the number is left out)

A checker cell may end with tests the learner does not see (nbgrader restores them when grading):

    ### BEGIN HIDDEN TESTS
    assert ...
    ### END HIDDEN TESTS

The .ipynb in solutions/ is the source of truth; this script is a convenience
for editing it in a text editor. Outputs are never written.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

HEADER = re.compile(r"^# %%(?: \[(markdown)\])?(?: (solution|check)(?: (\d+))?)?\s*$")


def to_ipynb(text: str, name: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    cells: list[tuple[str | None, str | None, str | None, list[str]]] = []
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            cells.append((m.group(1), m.group(2), m.group(3), []))
        elif cells:
            cells[-1][3].append(line)
    counts = {"solution": 0, "check": 0}
    for md, role, points, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        if md:
            src = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines)
            nb.cells.append(nbformat.v4.new_markdown_cell(src))
            continue
        cell = nbformat.v4.new_code_cell("\n".join(lines))
        if role:
            counts[role] += 1
            solution = role == "solution"
            cell.metadata["nbgrader"] = {
                "grade": not solution, "solution": solution, "locked": not solution,
                "grade_id": f"{name}-{role}-{counts[role]}", "schema_version": 3,
                **({} if solution else {"points": int(points or 1)}),
            }
        nb.cells.append(cell)
    for i, c in enumerate(nb.cells):
        c.id = f"{name[:40]}-{i}"  # stable ids keep diffs small
    return nb


def to_script(nb) -> str:
    out = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            out.append("# %% [markdown]")
            out += [("# " + line) if line else "#" for line in cell.source.splitlines()]
        else:
            meta = cell.metadata.get("nbgrader", {})
            role = " solution" if meta.get("solution") else f" check {meta['points']}" if meta.get("grade") else ""
            if "colab-setup" in cell.metadata.get("tags", []):
                continue  # written by build-notebooks
            out.append("# %%" + role)
            out += cell.source.splitlines()
        out.append("")
    return "\n".join(out)


def main(argv):
    cmd, src, dst = argv
    if cmd == "to-ipynb":
        nb = to_ipynb(Path(src).read_text(), Path(dst).stem)
        nbformat.write(nb, dst)
    elif cmd == "to-script":
        Path(dst).write_text(to_script(nbformat.read(src, as_version=4)))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
