"""The toolkit the checkers share (sdlearn.checks): call, diagnose, diagnose_combinations."""
import pytest
import torch

from sdlearn.checks import CheckFailed, call, diagnose, diagnose_combinations, fail

# -----------------------------------------------------------------------------
# call


def add(a, b, scale=1):
    return (a + b) * scale


def todo(*args):
    raise NotImplementedError("write this")


def crash(x):
    raise ValueError(f"bad x {x}")


def mismatch(x):
    return torch.ones(3) + torch.ones(4)  # RuntimeError: The size of tensor a (3) must match ...


def test_call_returns_what_the_function_returns():
    assert call("ex", add, 2, 3, on="two numbers", scale=10) == 50


def test_call_lets_not_implemented_through_unchanged():
    with pytest.raises(NotImplementedError, match="write this") as err:
        call("ex", todo, 1, on="one")
    assert not isinstance(err.value, CheckFailed)


def test_call_lets_a_checkers_own_failure_through_unchanged():
    def learner(callback):
        return callback()
    with pytest.raises(CheckFailed) as err:
        call("ex", learner, lambda: fail("inner", "the model was called wrong"), on="a callback")
    assert str(err.value) == "inner: the model was called wrong"


def test_call_turns_a_crash_into_a_failure_naming_the_exception_message_and_input():
    with pytest.raises(CheckFailed) as err:
        call("ex", crash, 7, on="x = 7 of shape []")
    assert str(err.value) == "ex: raised ValueError on x = 7 of shape []: bad x 7"
    assert isinstance(err.value.__context__, ValueError)  # the learner's traceback stays reachable


def test_call_adds_the_hint_of_the_first_pattern_found_in_the_error():
    hints = {"no such thing": "never this one", "size of tensor|broadcast": "reshape to [B, 1, 1]", "": "the catch-all"}
    with pytest.raises(CheckFailed, match=r"raised RuntimeError on x \[3\]: The size of tensor a \(3\) .* -- "
                                          r"reshape to \[B, 1, 1\]$"):
        call("ex", mismatch, torch.ones(3), on="x [3]", hints=hints)


def test_call_adds_no_hint_when_no_pattern_is_found():
    with pytest.raises(CheckFailed) as err:
        call("ex", crash, 1, on="x = 1", hints={"size of tensor": "reshape"})
    assert str(err.value) == "ex: raised ValueError on x = 1: bad x 1"


# -----------------------------------------------------------------------------
# diagnose

EXPECTED = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=torch.float64)


def test_diagnose_passes_silently_within_the_tolerance():
    assert diagnose("ex", EXPECTED + 5e-6, EXPECTED, {"a mistake": EXPECTED + 5e-6}) is None
    assert diagnose("ex", EXPECTED + 5e-3, EXPECTED, atol=1e-2, rtol=0) is None
    with pytest.raises(CheckFailed):  # the same answer, out of a tighter tolerance
        diagnose("ex", EXPECTED + 5e-3, EXPECTED, atol=1e-4, rtol=0)


@pytest.mark.parametrize("as_dict", [False, True])
def test_diagnose_names_the_first_known_mistake_the_answer_equals(as_dict):
    mistakes = [("forgot the square root", EXPECTED**2), ("transposed", EXPECTED.T),
                ("doubled", EXPECTED * 2), ("doubled, said again", EXPECTED * 2)]
    mistakes = dict(mistakes) if as_dict else mistakes
    with pytest.raises(CheckFailed) as err:
        diagnose("ex", EXPECTED * 2, EXPECTED, mistakes, on="x [2, 3]", what="y")
    assert str(err.value) == "ex: y is wrong on x [2, 3]: doubled"
    with pytest.raises(CheckFailed, match="transposed$"):  # a mistake of another shape is named too
        diagnose("ex", EXPECTED.T, EXPECTED, mistakes)


def test_diagnose_tries_lazy_mistakes_only_until_one_matches():
    tried = []

    def mistakes():
        for hint, factor in [("doubled", 2.0), ("tripled", 3.0)]:
            tried.append(hint)
            yield hint, EXPECTED * factor
    with pytest.raises(CheckFailed, match="doubled"):
        diagnose("ex", EXPECTED * 2, EXPECTED, mistakes())
    assert tried == ["doubled"]


def test_diagnose_names_the_first_wrong_element_and_both_values_otherwise():
    got = EXPECTED.clone()
    got[0, 1], got[1, 2] = 0.25, 1.5  # (0, 1) is the first wrong element in reading order, (1, 2) the worst
    with pytest.raises(CheckFailed) as err:
        diagnose("ex", got, EXPECTED, [("doubled", EXPECTED * 2)], on="x [2, 3]", what="y",
                 advice="y = x @ w, then the bias")
    assert str(err.value) == ("ex: y differs from the reference on x [2, 3]: first wrong element at index (0, 1): "
                              "expected 0.2, got 0.25; max abs error 0.9, and it matches none of the usual mistakes. "
                              "y = x @ w, then the bias")


def test_diagnose_names_the_wrong_element_of_a_number_and_accepts_plain_numbers():
    with pytest.raises(CheckFailed) as err:
        diagnose("ex", torch.tensor(0.25, dtype=torch.float64), 0.5, [("squared", 0.5**2 + 1)], what="the variance")
    assert str(err.value) == ("ex: the variance differs from the reference: expected 0.5, got 0.25, "
                              "and it matches none of the usual mistakes")
    with pytest.raises(CheckFailed, match="the variance is wrong: squared$"):
        diagnose("ex", torch.tensor(0.25, dtype=torch.float64), 0.5, [("squared", 0.5**2)], what="the variance")


def test_diagnose_names_a_wrong_shape_and_a_non_tensor():
    with pytest.raises(CheckFailed, match=r"^ex: y on x \[2, 3\] has shape \(3,\), expected \(2, 3\)$"):
        diagnose("ex", EXPECTED[0], EXPECTED, on="x [2, 3]", what="y")
    with pytest.raises(CheckFailed, match="^ex: y should be a torch.Tensor, got list$"):
        diagnose("ex", EXPECTED.tolist(), EXPECTED, what="y")


# -----------------------------------------------------------------------------
# diagnose_combinations

AXES = [("add", "sub"), ("x1", "x2", "x3")]
HINTS = [{"sub": "subtracted instead of added"}, {"x2": "doubled the scale", "x3": "tripled the scale"}]


def compute(op, scale):
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 4.0])
    return (a + b if op == "add" else a - b) * {"x1": 1, "x2": 2, "x3": 3}[scale]


@pytest.mark.parametrize("choices,named", [(("sub", "x1"), "^ex: the output is wrong: subtracted instead of added$"),
                                           (("add", "x3"), "^ex: the output is wrong: tripled the scale$"),
                                           (("sub", "x2"), "^ex: the output is wrong: subtracted instead of added; "
                                                           "doubled the scale$")])
def test_diagnose_combinations_names_every_mistake_of_the_combination(choices, named):
    with pytest.raises(CheckFailed, match=named):
        diagnose_combinations("ex", compute(*choices), compute, AXES, HINTS, what="the output")


def test_diagnose_combinations_passes_the_right_answer_and_prefers_fewer_mistakes():
    assert diagnose_combinations("ex", compute("add", "x1"), compute, AXES, HINTS) is None
    axes = [("a", "b"), ("c", "d"), ("e", "f")]
    hints = [{"b": "mistake b"}, {"d": "mistake d"}, {"f": "mistake f"}]
    # d + f (listed first by itertools.product) and b alone give the same answer: the single mistake is named
    values = {("a", "d", "f"): 1.0, ("b", "c", "e"): 1.0, ("a", "c", "e"): 0.0}
    with pytest.raises(CheckFailed, match="^ex: the result is wrong: mistake b$"):
        diagnose_combinations("ex", torch.tensor(1.0), lambda *v: torch.tensor(values.get(v, 9.0)), axes, hints)


def test_diagnose_combinations_reports_the_first_wrong_element_when_nothing_matches():
    with pytest.raises(CheckFailed, match=r"^ex: the result differs from the reference on ab: first wrong element at "
                                          r"index \(1\): expected 6, got 7; max abs error 1, and it matches none"):
        diagnose_combinations("ex", torch.tensor([1.5, 7.0]), compute, AXES, HINTS, on="ab")
