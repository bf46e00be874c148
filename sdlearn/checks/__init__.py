"""Checkers for the notebooks' exercises, one submodule per notebook.

    from sdlearn.checks import overview as check
    check.exact_match(exact_match)     # prints a tick, or raises CheckFailed saying what is wrong

A checker runs the learner's function on small inputs, compares it with the
reference in sdlearn, and on a mismatch names the likely mistake (wrong shape,
wrong scale, softmax over the wrong axis, ...) rather than failing a bare assert.

The toolkit the checkers share:
    call(exercise, fn, *args, on=..., hints=...)          the learner's fn(*args); a crash says on which input
    diagnose(exercise, got, expected, mistakes, on=...)    pass, or name the mistake made, or the first wrong element
    diagnose_combinations(exercise, got, compute, axes, hints)   the same over every combination of mistakes
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""


def fail(exercise: str, message: str):
    raise CheckFailed(f"{exercise}: {message}")


def passed(exercise: str) -> None:
    print(f"\N{CHECK MARK} {exercise}: correct")


def expect_tensor(exercise: str, got, shape: tuple | None = None, what: str = "the result") -> torch.Tensor:
    """`got` must be a tensor (of `shape`, when given); else fail naming expected vs got."""
    if not isinstance(got, torch.Tensor):
        fail(exercise, f"{what} should be a torch.Tensor, got {type(got).__name__}")
    if shape is not None and tuple(got.shape) != tuple(shape):
        fail(exercise, f"{what} has shape {tuple(got.shape)}, expected {tuple(shape)}")
    return got


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.detach().double() - expected.detach().double()).abs().max().item()


def is_close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return got.shape == expected.shape and torch.allclose(got.detach().double(), expected.detach().double(),
                                                          atol=atol, rtol=rtol)



def _on(on: str) -> str:
    return f" on {on}" if on else ""


def call(exercise: str, fn: Callable, *args, on: str = "", hints: Mapping[str, str] | None = None, **kwargs):
    """fn(*args, **kwargs): the learner's code. Returns what it returns; a crash becomes a CheckFailed.

    The failure names the exception, its message and the input it was called `on` (a phrase, "x of shape
    [2, 3]"). hints: {regex: hint}; the hint of the first pattern found in the error message (re.search, so ""
    matches any error) is added. NotImplementedError (an exercise not done yet) and CheckFailed (raised by a
    checker's own callback) pass through unchanged.
    """
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as e:  # the learner's bug: say what it raised, and on which input
        hint = next((h for pattern, h in (hints or {}).items() if re.search(pattern, str(e))), None)
        fail(exercise, f"raised {type(e).__name__}{_on(on)}: {e}" + (f" -- {hint}" if hint else ""))


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)


def diagnose(exercise: str, got, expected, mistakes: Mapping[str, object] | Iterable[tuple[str, object]] = (),
             on: str = "", atol: float = 1e-5, rtol: float = 1e-4, what: str = "the result", advice: str = "") -> None:
    """Return if `got` is close to `expected`; else fail, naming the first known mistake that gives `got`,
    else the shape, else the first wrong element (its index, both values) and the largest error.

    mistakes: (hint, what that mistake gives) pairs in the order to try them: a dict hint -> value, a list,
    or a lazy iterable (the later ones are then only computed when needed). Values may be tensors or numbers.
    on: the input, as a phrase for the messages; advice: said last when no known mistake matches.
    """
    got, expected = expect_tensor(exercise, got, what=what), _tensor(expected)
    if is_close(got, expected, atol, rtol):
        return
    tried = False
    for hint, wrong in mistakes.items() if isinstance(mistakes, Mapping) else mistakes:
        tried = True
        if is_close(got, _tensor(wrong), atol, rtol):
            fail(exercise, f"{what} is wrong{_on(on)}: {hint}")
    expect_tensor(exercise, got, tuple(expected.shape), what=f"{what}{_on(on)}")
    g, e = got.detach().double().cpu(), expected.detach().double().cpu()
    if g.numel() == 1:
        detail = f"expected {e.item():.6g}, got {g.item():.6g}"
    else:
        index = tuple((~torch.isclose(g, e, rtol=rtol, atol=atol)).nonzero()[0].tolist())
        detail = (f"first wrong element at index ({', '.join(map(str, index))}): expected {e[index].item():.6g}, "
                  f"got {g[index].item():.6g}; max abs error {max_error(g, e):.3g}")
    fail(exercise, f"{what} differs from the reference{_on(on)}: {detail}"
                   + (", and it matches none of the usual mistakes" if tried else "")
                   + (f". {advice}" if advice else ""))


def diagnose_combinations(exercise: str, got, compute: Callable[..., torch.Tensor], axes: Sequence[tuple],
                          hints: Sequence[Mapping[object, str]], **kwargs) -> None:
    """diagnose() against every combination of the usual mistakes, fewest mistakes first.

    axes: per aspect of the answer, the right choice first, then the wrong ones; compute(*choices) -> the
    answer those choices give; hints: per aspect, {wrong choice: what it means}. A combination that gives `got`
    is named by all its mistakes ("; "-joined). kwargs: diagnose's (on, atol, rtol, what, advice).
    """
    right = tuple(a[0] for a in axes)
    ranked = sorted(itertools.product(*axes), key=lambda v: sum(a != b for a, b in zip(v, right)))
    mistakes = (("; ".join(hints[i][x] for i, (x, r) in enumerate(zip(v, right)) if x != r), compute(*v))
                for v in ranked[1:])
    diagnose(exercise, got, compute(*right), mistakes, **kwargs)
