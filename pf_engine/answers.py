"""Final answers: the last ``\\boxed{...}`` of a text, and equivalence through math-verify."""

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


def _parsed(answer: str):
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}")


def equivalent(a: str, b: str) -> bool:
    """Whether two answers are the same mathematical object (1/2 and 0.5 are)."""
    if a.strip() == b.strip():
        return True
    from math_verify import verify

    pa, pb = _parsed(a), _parsed(b)
    return bool(pa and pb and verify(pa, pb))


def weighted_vote(answers: list[str | None], weights: list[float]) -> str | None:
    """The answer whose equivalence class holds the most weight; None when no particle answered."""
    classes: list[tuple[str, float]] = []
    for answer, weight in zip(answers, weights, strict=True):
        if answer is None:
            continue
        for i, (representative, total) in enumerate(classes):
            if equivalent(representative, answer):
                classes[i] = (representative, total + weight)
                break
        else:
            classes.append((answer, weight))
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
