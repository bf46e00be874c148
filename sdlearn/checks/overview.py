"""Checkers for 00_overview."""
from __future__ import annotations

from sdlearn.checks import call, fail, passed
from sdlearn.data import ShapeObject
from sdlearn.metrics import DetectedObject


def _det(color, shape, position):
    return DetectedObject(color=color, shape=shape, position=position, area=50.0, centroid=(0.5, 0.5))


def exact_match(fn) -> None:
    """fn(detected: list[DetectedObject], wanted: list[ShapeObject]) -> bool"""
    name = "exact_match"
    red_left, blue_right = ShapeObject("red", "circle", "left"), ShapeObject("blue", "square", "right")
    cases = [  # (detected, wanted, expected answer, what a wrong answer means)
        ([_det("red", "circle", "left")], [red_left], True, "a perfect single-object match should be True"),
        ([_det("blue", "square", "right"), _det("red", "circle", "left")], [red_left, blue_right], True,
         "the order of the objects should not matter"),
        ([_det("green", "circle", "left")], [red_left], False, "a wrong colour should be False: compare .color"),
        ([_det("red", "square", "left")], [red_left], False, "a wrong shape should be False: compare .shape"),
        ([_det("red", "circle", "right")], [red_left], False, "a wrong position should be False: compare .position"),
        ([_det("red", "circle", "left"), _det("blue", "square", "right")], [red_left], False,
         "an extra object should be False: the count must match too"),
        ([_det("red", "circle", "left")], [red_left, blue_right], False,
         "a missing object should be False: the count must match too"),
        ([], [red_left], False, "nothing detected should be False"),
        ([_det("red", "circle", "left"), _det("red", "circle", "left")], [red_left, blue_right], False,
         "each wanted object needs its own detection: don't match one detection twice"),
    ]
    for detected, wanted, expected, meaning in cases:
        on = (f"detected={[(d.color, d.shape, d.position) for d in detected]}, "
              f"wanted={[(w.color, w.shape, w.position) for w in wanted]}")
        got = call(name, fn, detected, wanted, on=on)
        if not isinstance(got, bool):
            fail(name, f"should return a bool (True/False), got {type(got).__name__}")
        if got != expected:
            fail(name, f"returned {got} for {on}: {meaning}")
    passed(name)
