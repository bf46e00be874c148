"""The overview checker accepts the right answer and names the mistake in wrong ones."""
import pytest

from sdlearn.checks import CheckFailed
from sdlearn.checks import overview as check


def right(detected, wanted):
    def key(o):
        return o.color, o.shape, o.position

    return sorted(map(key, detected)) == sorted(map(key, wanted))


WRONG = {
    "ignores colour": (lambda d, w: sorted((o.shape, o.position) for o in d)
                       == sorted((o.shape, o.position) for o in w),
                       "compare .color"),
    "ignores count": (lambda d, w: all(any((x.color, x.shape, x.position) == (o.color, o.shape, o.position)
                                           for x in d) for o in w),
                      "count must match"),
    "order matters": (lambda d, w: [(o.color, o.shape, o.position) for o in d]
                      == [(o.color, o.shape, o.position) for o in w],
                      "order of the objects should not matter"),
    "returns a number": (lambda d, w: int(right(d, w)), "should return a bool"),
}


def test_right_answer_passes(capsys):
    check.exact_match(right)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", WRONG)
def test_wrong_answers_get_a_hint(name):
    fn, hint = WRONG[name]
    with pytest.raises(CheckFailed, match=hint):
        check.exact_match(fn)
