"""Answer extraction and grading for GSM8K, MATH-500 and Game of 24.

Every grader takes the model's whole reply and the gold answer and returns a :class:`Grade`: the
answer it read from the reply (``None`` when it found none) and whether it is right. Graders never
raise on odd model output; they grade it wrong.

>>> grade_gsm8k("... so she pays $1,250 in all.", "1250").correct
True
>>> grade_math("The answer is $\\\\boxed{\\\\dfrac{1}{2}}$.", "\\\\frac12").correct
True
>>> grade_game24("Answer: (10 - 4) * (13 - 9) = 24", "4 9 10 13").correct
True
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

from peftscale.answers import extract_answer, normalize_answer

__all__ = [
    "Grade",
    "check_game24",
    "extract_boxed",
    "extract_game24",
    "extract_last_number",
    "gsm8k_gold",
    "grade_game24",
    "grade_gsm8k",
    "grade_math",
    "judge_math",
    "judge_number",
    "normalize_math",
]


@dataclass(frozen=True)
class Grade:
    """What a grader read from a reply, and whether it matches the gold answer."""

    prediction: str | None
    correct: bool


# ---------------------------------------------------------------- numbers (GSM8K and friends)
#
# The rules live in the Rust core (peftscale.answers), where self-consistency, MCTS and adaptive
# compute vote with them: a reply is graded by the rule its strategy voted with.


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, canonically spelled (``"... $1,200.50."`` -> ``"1200.5"``,
    ``"3/4"`` -> ``"0.75"``): :func:`peftscale.extract_answer` with ``"last_number"``."""
    return extract_answer(text, "last_number")


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer: what follows ``####``, commas removed."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise ValueError("a GSM8K answer ends with '#### <number>'; this one has no '####'")
    return tail.strip().replace(",", "")


def judge_number(prediction: str | None, gold: str) -> bool:
    """Whether an extracted answer is the gold number (``"18.00"`` and ``"18"`` agree, as do
    ``"0.75"`` and ``"3/4"``): both in the canonical number spelling, compared."""
    if prediction is None:
        return False
    return normalize_answer(prediction, "last_number") == normalize_answer(gold, "last_number")


def grade_gsm8k(reply: str, gold: str) -> Grade:
    """Correct when the last number in the reply equals the gold number (``"18.00"`` and
    ``"18"`` agree; ``"1,250"`` reads as 1250)."""
    pred = extract_last_number(reply)
    return Grade(pred, judge_number(pred, gold))


# ---------------------------------------------------------------- MATH


def extract_boxed(text: str) -> str | None:
    """The MATH answer of ``text``, normalised: the last ``\\boxed{...}`` (or ``\\fbox{...}``),
    else what follows "answer is", else the last number (:func:`peftscale.extract_answer` with
    ``"boxed"``)."""
    return extract_answer(text, "boxed")


def normalize_math(answer: str) -> str:
    """A canonical spelling of a MATH answer, so that ``\\dfrac{1}{2}``, ``\\frac12``, ``1/2`` and
    ``0.5`` compare equal, as do ``90^\\circ`` and ``90``, ``\\left( 3, \\pi \\right)`` and
    ``(3,\\pi)``, ``x = 5`` and ``5``, ``\\$12`` and ``12``, ``50\\%`` and ``50``."""
    return normalize_answer(answer, "boxed")


def grade_math(reply: str, gold: str) -> Grade:
    """Correct when the reply's MATH answer (:func:`extract_boxed`) equals the gold answer after
    :func:`normalize_math`."""
    pred = extract_boxed(reply)
    return Grade(pred, judge_math(pred, gold))


def judge_math(prediction: str | None, gold: str) -> bool:
    """Whether an extracted MATH answer equals the gold one after :func:`normalize_math`."""
    return prediction is not None and normalize_math(prediction) == normalize_math(gold)


# ---------------------------------------------------------------- Game of 24


class Game24Error(ValueError):
    """Why an expression is not a valid Game of 24 answer."""


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise Game24Error("divides by zero")
        return left / right
    raise Game24Error(f"only whole numbers, + - * / and parentheses are allowed, found {ast.dump(node)[:40]}")


def check_game24(expression: str, numbers: str | list[int]) -> bool:
    """Whether ``expression`` (``"(10 - 4) * (13 - 9)"``, optionally followed by ``= 24``) uses each
    of the puzzle's four numbers exactly once, only ``+ - * /`` and parentheses, and equals 24 in
    exact rational arithmetic. Unary signs, other numbers and division by zero make it wrong."""
    try:
        return _check_game24(expression, numbers)
    except Game24Error:
        return False


def _check_game24(expression: str, numbers: str | list[int]) -> bool:
    want = sorted(int(n) for n in numbers.split()) if isinstance(numbers, str) else sorted(numbers)
    lhs = expression.split("=")[0].replace("×", "*").replace("x", "*").replace("÷", "/").strip()
    if not lhs:
        raise Game24Error("empty expression")
    try:
        tree = ast.parse(lhs, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise Game24Error(f"not an arithmetic expression ({e})") from None
    used: list[int] = []
    value = _evaluate(tree, used)
    if sorted(used) != want:
        raise Game24Error(f"uses {sorted(used)}, the puzzle has {want}")
    return value == 24


_ANSWER_LINE = re.compile(r"answer\s*[:=]\s*(.+)", re.IGNORECASE)
# The arithmetic at the end of a line, up to "= 24": "So (4 + 8) * 2 = 24." -> "(4 + 8) * 2 = 24".
_EXPRESSION_TO_24 = re.compile(r"([\d\s+\-*/×÷().]*\d[\d\s+\-*/×÷().]*=\s*24)\s*\.?\s*$")


def extract_game24(reply: str) -> str | None:
    """The final expression of a Game of 24 reply: after the last ``Answer:``, else the last line
    that ends in ``= 24``; words before the arithmetic are dropped."""
    found = _ANSWER_LINE.findall(reply)
    candidates = [found[-1]] if found else reversed(reply.splitlines())
    for line in candidates:
        line = line.strip()
        m = _EXPRESSION_TO_24.search(line)
        if m:
            return m.group(1).strip()
        if found:
            return line.rstrip(".") or None
    return None


def grade_game24(reply: str, puzzle: str) -> Grade:
    """Correct when :func:`extract_game24`'s expression passes :func:`check_game24` for ``puzzle``."""
    expr = extract_game24(reply)
    return Grade(expr, expr is not None and check_game24(expr, puzzle))
