"""Every figure in a notebook's prose is computed or cited (COURSE_DESIGN.md, "Teaching: every claim computed").

Each markdown cell of every notebook in solutions/ is read sentence by sentence. A sentence fails when it holds a
**figure** and no **citation**. The reading of a measurement belongs in the cell that measures it, as an f-string
printed from the numbers, so it cannot contradict its own table; a markdown cell may only hold figures it cites.

What counts as a figure (the claim a learner would check):
  - a decimal number, "0.96", "2.8", ".5" (a digit or a point followed by digits);
  - a percentage, "99%", "10 %";
  - a ratio written with an x or "times", "8x smaller", "4 x the channels", "12 times fewer" (the course's VAE
    is 4x per side: a typed "8x" is the claim this test must catch).

What is exempt (not a claim, or a claim made somewhere else):
  - anything inside inline code (`end=0.8`, `P.pixel_size`) or a fenced code block: that is code, and what code
    prints is computed;
  - a LaTeX span ($...$ or $$...$$) that contains a symbol (a letter or a backslash command): an equation or a
    definition ("$\\gamma = 5$", "$10000^{-i/h}$"); a span holding only a number ("$0.96$") or an approximation
    ("$\\bar\\alpha_{999} \\approx 0.005$", a measured value) is scanned as prose;
  - the number of a section, table, figure or equation after its name ("sec. 2.2", "Table 3.1");
  - plain integers: counts, sizes, step numbers, years;
  - version numbers: a number with two or more dots (0.42.1), or one that follows a model or library name
    (SD 1.5, SD 2.1, SD 3.5, SDXL 1.0, T5 v1.1, CLIP v1.0, Python 3.11, torch 2.4, diffusers 0.30, transformers 4.4);
  - shapes and kernel sizes written NxM ("64x64 latents", "a 1x1 conv", "3 x 32 x 32").

What counts as a citation (on the same sentence):
  - a paper with a locator: an author and a year ("Rombach et al. 2022", "Ho & Salimans 2022", "Hang et al.,
    2023") and, in the same sentence, a table, figure, section, equation, algorithm or appendix ("Table 2",
    "table 2", "Fig. 3", "section 4.1", "sec. 3", "eq. 6", "equation 12", "algorithm 1", "appendix B");
  - a released model's configuration file, in inline code (`scheduler_config.json`, `vae/config.json`,
    `v1-inference.yaml`): the constants a checkpoint is defined by (its betas, its VAE's scaling factor);
  - a results file and the command that made it: a path under benchmarks/results/ ("benchmarks/results/sdxl.json")
    and, in the same sentence, the command that wrote it in inline code, beginning with `python `
    ("`python benchmarks/sdxl.py --steps 800`").

A sentence ends at ".", "!" or "?" followed by white space and an upper-case letter, a "(" or the end of the cell,
and at a blank line or a list item; "et al. 2022", "e.g. the", "eq. 2" and "0.96" do not end one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "solutions").glob("*.ipynb"))

FENCE = re.compile(r"```.*?```", re.S)
CODE = re.compile(r"`[^`\n]*`")
MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*#])|\n\s*\n|\n(?=\s*(?:[-*] |\d+\. |#))")

VERSION = re.compile(r"\d+(?:\.\d+){2,}|(?:\b(?:SD|SDXL|SD3|Stable Diffusion|v|version|Python|torch|diffusers|"
                     r"transformers|CLIP|T5|nbgrader)\s?)\d+(?:\.\d+)+", re.I)
SHAPE = re.compile(r"\b\d+(?:\s?[x×]\s?\d+)+\b")
FIGURE = re.compile(r"(?<![\w.])(?:\d+\.\d+|\.\d+)(?![\w.]*\d)"            # a decimal
                    r"|\b\d+(?:\.\d+)?[ \n]?%"                              # a percentage
                    r"|\b\d+(?:\.\d+)?[ \n]?(?:x|×|times)\b(?!\s?\d)")       # a ratio (not a shape, 3 x 32)

AUTHOR_YEAR = re.compile(r"[A-Z][\w'-]+(?: et al\.| (?:&|and) [A-Z][\w'-]+)?,? \(?(?:19|20)\d\d[a-z]?\b")
LOCATOR = re.compile(r"\b(?:Table|Tab\.|Figure|Fig\.|Section|Sec\.|§|Eq\.|Equation|Algorithm|Alg\.|Appendix)\s?"
                     r"[A-Z]?\d*(?:\.\d+)*", re.I)
CONFIG_FILE = re.compile(r"`[\w/.-]*(?:config\.json|\.ya?ml)`")
RESULTS_FILE = re.compile(r"benchmarks/results/[\w./-]+")
COMMAND = re.compile(r"`python [^`]+`")


def _prose(text: str) -> str:
    """The text a reader takes as prose: code removed, equations with symbols removed, bare-number math kept."""
    text = FENCE.sub(" ", text)
    text = MATH.sub(lambda m: m.group().strip("$") if re.search(r"\\approx|≈", m.group())
                    or not re.search(r"[A-Za-z\\]", m.group()) else " ", text)
    return text


def cited(sentence: str) -> bool:
    """A paper with a locator, or a results file with the `python ...` command that made it."""
    return bool((AUTHOR_YEAR.search(sentence) and LOCATOR.search(sentence))
                or CONFIG_FILE.search(sentence) or (RESULTS_FILE.search(sentence) and COMMAND.search(sentence)))


def figures(sentence: str) -> list[str]:
    """The uncited figures a sentence holds (see the module docstring), in order."""
    text = CODE.sub(" ", sentence)
    text = VERSION.sub(" ", text)
    text = SHAPE.sub(" ", text)
    text = LOCATOR.sub(" ", text)
    return [m.group().strip() for m in FIGURE.finditer(text)]


def uncited_figures(markdown: str) -> list[tuple[str, str]]:
    """(figure, its sentence) for every figure of a markdown cell with no citation in its sentence."""
    found = []
    for sentence in SENTENCE_END.split(_prose(markdown)):
        if not cited(sentence):
            found += [(" ".join(f.split()), " ".join(sentence.split())) for f in figures(sentence)]
    return found


def markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text())["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_figure_in_the_prose_is_computed_or_cited(path):
    problems = [f"  cell {i}: {figure!r} in \"{sentence[:160]}\""
                for i, text in markdown_cells(path) for figure, sentence in uncited_figures(text)]
    assert not problems, (
        f"solutions/{path.name}: {len(problems)} figure(s) typed into markdown with no citation:\n"
        + "\n".join(problems)
        + "\nFix: print the sentence from the cell that measures it (an f-string from the numbers), or cite it on the"
          " same sentence: a paper with its table/section/equation (\"(Rombach et al. 2022, Table 2)\"), or a "
          "benchmarks/results/ file with the `python ...` command that made it. See tests/test_prose.py's docstring.")


@pytest.mark.parametrize("text, wanted", [
    ("The VAE's reconstructions pass the judge 99% of the time.", ["99%"]),
    ("single-object exact 0.96 with min-SNR-5 and 0.95 with the plain mean", ["0.96", "0.95"]),
    ("(held-out colour-shape pairs: 0.93, 0.96 and 0.60).", ["0.93", "0.96", "0.60"]),
    ("batch 32 for 3200 steps reached 0.91 single-object exact, batch 64 for 1800 steps 0.96", ["0.91", "0.96"]),
    ("where the images are 8x smaller per side", ["8x"]),
    ("latents $0.96$ of the time, and $\\bar\\alpha_{999} \\approx 0.005$", ["0.96", "0.005"]),
    ("SDXL's argument (sec. 2.2): sizes vary.", []),
    ("betas from 0.00085 to 0.012 (SD 1.5's `scheduler/scheduler_config.json`).", []),
    ("48\ntimes fewer", ["48 times"]),
    ("SD 1.5 and SD 3.5 with diffusers 0.42.1, a 64x64 latent, 1000 steps, `end=0.8`, $\\gamma = 0.5$", []),
    ("Latents (Rombach et al. 2022, Table 2) give 0.96.", []),
    ("Latents (Rombach et al. 2022) give 0.96.", ["0.96"]),
    ("It reached 0.96 (benchmarks/results/x.json, `python benchmarks/x.py --steps 3`).", []),
    ("It reached 0.96 (benchmarks/results/x.json).", ["0.96"]),
    ("It reached 0.5. Rombach et al. 2022, Table 2 say 0.7.", ["0.5"]),
])
def test_the_rule_catches_typed_figures_and_lets_citations_and_code_pass(text, wanted):
    assert [f for f, _ in uncited_figures(text)] == wanted
