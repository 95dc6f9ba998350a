"""Rule-based step verifiers: ``f(question, steps) -> reward in [0, 1]`` for the engine's PRM slot."""

import re

_NUMBER = r"-?\d+(?:\.\d+)?"
_CLAIM = re.compile(rf"({_NUMBER})\s*([+\-*/×x÷])\s*({_NUMBER})\s*=\s*({_NUMBER})")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b,
        "x": lambda a, b: a * b, "/": lambda a, b: a / b if b else None, "÷": lambda a, b: a / b if b else None}


def arithmetic_claims(text: str) -> list[bool]:
    """Whether each claim ``a op b = c`` in the text is true (to 1e-6)."""
    verdicts = []
    for a, op, b, c in _CLAIM.findall(text):
        value = _OPS[op](float(a), float(b))
        verdicts.append(value is not None and abs(value - float(c)) < 1e-6)
    return verdicts


def arithmetic_verifier(question: str, steps: list[str]) -> float:
    """0.95 when every arithmetic claim of the newest step holds, 0.05 when one fails, 0.5 without claims."""
    verdicts = arithmetic_claims(steps[-1]) if steps else []
    if not verdicts:
        return 0.5
    return 0.95 if all(verdicts) else 0.05
