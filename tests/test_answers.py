"""Final answers: the last complete \\boxed{...}, else the last number; votes over equivalent answers."""

import pytest

from pf_engine.answers import boxed_answer, equivalent, extract_answer, is_correct, weighted_vote


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\sqrt{\\frac{1}{\\{2\\}}}} and then", "\\sqrt{\\frac{1}{\\{2\\}}}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last of several
        ("\\boxed{1} then \\boxed{2", "1"),  # the last *complete* one
        ("\\boxed{}", ""),
        ("no box: 41 and 42", None),
        ("\\boxed{4", None),
        ("boxed{4}", None),
    ],
)
def test_boxed_answer(text, answer):
    assert boxed_answer(text) == answer


@pytest.mark.parametrize(
    "text,answer",
    [
        ("she has 3 apples, then 12.", "12"),  # no boxed: the last number
        ("\\boxed{7}, checked with 8 and 9", "7"),  # a boxed answer wins over later numbers
        ("about 1,234,567 grains", "1234567"),  # thousands separators dropped
        ("it falls to -3.25 degrees", "-3.25"),
        ("x = 2.5.", "2.5"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_equivalent_answers():
    assert equivalent("1/2", "0.5") and equivalent("\\frac{1}{2}", "0.5") and equivalent(" 7 ", "7")
    assert not equivalent("1/2", "2") and not equivalent("3", "0.5")


def test_weighted_vote_groups_equivalent_answers():
    # "3" is the heaviest single string; the three spellings of one half weigh more together
    answers = ["3", "1/2", "0.5", "\\frac{1}{2}"]
    weights = [0.4, 0.2, 0.2, 0.2]
    assert weighted_vote(answers, weights) == "1/2"  # the class's first answer stands for it
    assert weighted_vote(answers, [0.7, 0.1, 0.1, 0.1]) == "3"  # weights, not counts, decide
    assert weighted_vote(["0.5", "3", "1/2"], [0.3, 0.4, 0.3]) == "0.5"


def test_weighted_vote_skips_particles_without_an_answer():
    assert weighted_vote([None, "5", None], [0.8, 0.1, 0.1]) == "5"
    assert weighted_vote([None, None], [0.5, 0.5]) is None
    assert weighted_vote([], []) is None


def test_is_correct():
    assert is_correct("0.5", "1/2") and is_correct("4", 4) and is_correct("\\frac{6}{3}", "2")
    assert not is_correct("5", 4)
    assert not is_correct(None, "None") and not is_correct(None, 0)
