"""Checkers for the notebooks' exercises, one submodule per notebook.

    from sdlearn.checks import overview as check
    check.exact_match(exact_match)     # prints a tick, or raises CheckFailed saying what is wrong

A checker runs the learner's function on small inputs, compares it with the
reference in sdlearn, and on a mismatch names the likely mistake (wrong shape,
wrong scale, softmax over the wrong axis, ...) rather than failing a bare assert.
"""
from __future__ import annotations

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
    return got.shape == expected.shape and torch.allclose(got.detach().double(), expected.detach().double(), atol=atol, rtol=rtol)
