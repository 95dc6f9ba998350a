"""Where a step ends, decided per token for a whole batch with array operations.

A step ends at the delimiter (found in the text of the step's tokens, also when
it is split across tokens or sits inside one with more text), at EOS, or at a
complete ``\\boxed{...}``. The text is never decoded per token: each token's
text is looked up once, when the tables are built, and the delimiter is matched
by a small automaton (Knuth-Morris-Pratt over the delimiter's characters) whose
transitions are a per-token table::

    delimiter "\\n\\n", states 0 (nothing matched) and 1 (one "\\n" matched)
    token        next state from 0 / 1     delimiter ends in it, from 0 / 1
    "a"          0 / 0                     no  / no
    "\\n"        1 / 0                     no  / yes
    ".\\n\\nThe" 0 / 0                     yes / yes

A ``\\boxed{`` answer needs brace counting, which no fixed table holds; tokens
that could start or continue one (a backslash, or any token while one is being
written) are few, and only those rows go through :func:`advance_boxed`.
"""

import numpy as np

BOXED = "\\boxed{"


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text of every token id alone (special tokens and ids past the tokenizer: "")."""
    known = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    return texts + [""] * (vocab_size - known)


def _kmp_step(pattern: str, state: int, char: str) -> int:
    """The delimiter automaton's transition: the longest prefix of ``pattern`` that ends here."""
    while True:
        if char == pattern[state]:
            return state + 1
        if state == 0:
            return 0
        # fall back to the longest proper border of pattern[:state]
        state = max((k for k in range(state) if pattern[:k] == pattern[state - k:state]), default=0)


class StepEndTables:
    """Per-token tables of one tokenizer, delimiter and set of EOS ids.

    ``next_state[t, s]`` / ``matched[t, s]``: the delimiter automaton's state after
    token ``t`` from state ``s``, and whether the delimiter ended within ``t``.
    ``eos[t]``: token ``t`` ends the answer. ``backslash[t]``: its text holds a
    backslash (may start ``\\boxed{``). All numpy, indexed by token id arrays.
    """

    def __init__(self, texts: list[str], delimiter: str, eos_ids):
        if not delimiter:
            raise ValueError("the step delimiter must be a non-empty string")
        vocab = len(texts)
        width = len(delimiter)
        self.texts = texts
        self.delimiter = delimiter
        self.next_state = np.zeros((vocab, width), dtype=np.int16)
        self.matched = np.zeros((vocab, width), dtype=bool)
        chars = set(delimiter)
        for token, text in enumerate(texts):
            if not text:  # a special token: the text, and so the state, stays as it was
                self.next_state[token] = np.arange(width)
                continue
            if chars.isdisjoint(text):
                continue  # every state falls back to 0, nothing matches
            for start in range(width):
                state = start
                for char in text:
                    state = _kmp_step(delimiter, state, char)
                    if state == width:  # the step ends here; the next one starts from state 0
                        self.matched[token, start], state = True, 0
                        break
                self.next_state[token, start] = state
        self.eos = np.zeros(vocab, dtype=bool)
        self.eos[[i for i in eos_ids if 0 <= i < vocab]] = True
        self.backslash = np.array(["\\" in text for text in texts], dtype=bool)


def advance_boxed(texts, tokens, progress: np.ndarray, depth: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Moves the ``\\boxed{`` trackers of ``rows`` over their new ``tokens``; returns which completed one.

    ``progress[row]``: characters of ``\\boxed{`` matched so far (0 to 6);
    ``depth[row]``: open braces since the newest ``\\boxed{`` (0: none open).
    The newest open answer is the innermost, so it closes first: an answer is
    complete as soon as its depth returns to 0.
    """
    done = np.zeros(len(rows), dtype=bool)
    for i, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist(), strict=True)):
        p, d = int(progress[row]), int(depth[row])
        for char in texts[token]:
            if d and char in "{}":
                d += 1 if char == "{" else -1
                if d == 0:
                    done[i] = True
                    break
            p = p + 1 if char == BOXED[p] else int(char == "\\")
            if p == len(BOXED):
                p, d = 0, 1
        progress[row], depth[row] = p, d
    return done
