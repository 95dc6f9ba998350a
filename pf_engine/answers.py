"""Final answers: the last ``\\boxed{...}`` of a text, and equivalence through math-verify."""

import functools
import re

_BOXED = re.compile(r"\\boxed\{")


def boxed_answer(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces allowed), or None."""
    answer = None
    for match in _BOXED.finditer(text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += (text[i] == "{") - (text[i] == "}")
            if depth == 0:
                answer = text[match.end():i]
                break
    return answer


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str):
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}")


@functools.lru_cache(maxsize=65536)  # a vote compares the same answers again as particles finish
def equivalent(a: str, b: str) -> bool:
    """Whether two answers are the same mathematical object (1/2 and 0.5 are)."""
    if a.strip() == b.strip():
        return True
    from math_verify import verify

    pa, pb = _parsed(a), _parsed(b)
    return bool(pa and pb and verify(pa, pb))


def answer_classes(answers: list[str | None], weights: list[float]) -> list[tuple[str, float, list[int]]]:
    """The equivalence classes of the answers (None is in none), in order of first appearance: each
    one's first answer, its total weight and its members' indices."""
    classes: list[tuple[str, float, list[int]]] = []
    for i, (answer, weight) in enumerate(zip(answers, weights, strict=True)):
        if answer is None:
            continue
        for c, (representative, total, members) in enumerate(classes):
            if equivalent(representative, answer):
                classes[c] = (representative, total + weight, [*members, i])
                break
        else:
            classes.append((answer, weight, [i]))
    return classes


def weighted_vote(answers: list[str | None], weights: list[float]) -> str | None:
    """The answer whose equivalence class holds the most weight (the first such on a tie); None when
    no particle answered."""
    classes = answer_classes(answers, weights)
    return max(classes, key=lambda c: c[1])[0] if classes else None


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The last ``\\boxed{...}``, else the last number in the text (commas dropped), else None."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def is_correct(answer: str | None, gold) -> bool:
    return answer is not None and equivalent(answer, str(gold))
