"""The per-token step-end tables and the boxed-answer tracker against decoding the text."""

import numpy as np
import pytest

from pf_engine.answers import boxed_answer
from pf_engine.step_end import StepEndTables, advance_boxed, token_texts
from tiny import CHARS, char_tokenizer

# multi-character tokens: a delimiter inside one with text around it, halves of it, pieces of \boxed{
EXTRA = ["\n\nThe", ".\n", "\n\n\n", "ab\n", "\\box", "ed{", "}}", "{1}", "\\boxed{", "x\\"]
DELIMITERS = ["\n\n", "e", "ab", "\n\nThe", "aba"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(CHARS + EXTRA)


def first_end(texts, tokens, delimiter):
    """Index of the first token after which the decoded text holds the delimiter, or None."""
    text = ""
    for i, t in enumerate(tokens):
        text += texts[t]
        if delimiter in text:
            return i
    return None


@pytest.mark.parametrize("delimiter", DELIMITERS)
def test_the_automaton_ends_a_step_where_the_decoded_text_first_holds_the_delimiter(tokenizer, delimiter):
    texts = token_texts(tokenizer, len(tokenizer) + 2)  # two ids past the tokenizer, as a padded vocab has
    assert texts[-2:] == ["", ""] and "".join(texts[t] for t in tokenizer.encode("ab", add_special_tokens=False))
    tables = StepEndTables(texts, delimiter, [tokenizer.eos_token_id])
    rng = np.random.default_rng(len(delimiter))
    # tokens drawn mostly from the delimiter's own characters, so that it shows up often, split or whole
    favoured = [i for i, t in enumerate(texts) if t and set(t) <= set(delimiter)]
    often = min(0.25 * len(delimiter), 0.8)
    ends = 0
    for _ in range(300):
        tokens = np.where(rng.random(12) < often, rng.choice(favoured, 12), rng.integers(0, len(texts), 12))
        state, found = 0, None
        for i, t in enumerate(tokens):
            if tables.matched[t, state]:
                found = i
                break
            state = tables.next_state[t, state]
        assert found == first_end(texts, tokens, delimiter), [texts[t] for t in tokens]
        ends += found is not None
    assert 30 < ends < 300, "too few or too many steps ended for the check to mean much"


def test_eos_and_backslash_tables(tokenizer):
    texts = token_texts(tokenizer, len(tokenizer))
    tables = StepEndTables(texts, "\n\n", [tokenizer.eos_token_id, 10_000])
    assert np.flatnonzero(tables.eos).tolist() == [tokenizer.eos_token_id]
    assert {texts[t] for t in np.flatnonzero(tables.backslash)} == {"\\", "\\box", "\\boxed{", "x\\"}
    with pytest.raises(ValueError, match="non-empty"):
        StepEndTables(texts, "", [])


def test_the_boxed_tracker_completes_where_boxed_answer_first_finds_an_answer(tokenizer):
    texts = token_texts(tokenizer, len(tokenizer))
    rng = np.random.default_rng(0)
    favoured = [i for i, t in enumerate(texts) if t and set(t) <= set("\\boxed{}12 ")]
    completed = 0
    for _ in range(400):
        tokens = np.where(rng.random(16) < 0.85, rng.choice(favoured, 16), rng.integers(0, len(texts), 16))
        progress, depth = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        text, expected, found = "", None, None
        for i, t in enumerate(tokens):
            text += texts[t]
            if expected is None and boxed_answer(text) is not None:
                expected = i
            if found is None and advance_boxed(texts, np.array([t]), progress, depth, np.array([0]))[0]:
                found = i
        assert found == expected, text
        completed += found is not None
    assert completed > 40
