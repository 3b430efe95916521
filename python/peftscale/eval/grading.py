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
    "parse_number",
]


@dataclass(frozen=True)
class Grade:
    """What a grader read from a reply, and whether it matches the gold answer."""

    prediction: str | None
    correct: bool


# ---------------------------------------------------------------- numbers (GSM8K and friends)

# A number as people write it: optional sign, thousands separators, decimals, or a simple fraction.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (``"1,234.5"``, ``"-3"``, ``"$12"``, ``"3/4"``, ``"50%"`` -> 50),
    or ``None`` when it is not one."""
    s = text.strip().replace("$", "").replace("\\$", "").replace(",", "").rstrip(".").strip()
    s = s.removesuffix("\\%").removesuffix("%").strip()
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(Fraction(num), Fraction(den))
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed (``"... $1,200."`` -> ``"1200"``)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "")


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer: what follows ``####``, commas removed."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise ValueError("a GSM8K answer ends with '#### <number>'; this one has no '####'")
    return tail.strip().replace(",", "")


def judge_number(prediction: str | None, gold: str) -> bool:
    """Whether an extracted answer is the gold number (``"18.00"`` and ``"18"`` agree)."""
    if prediction is None:
        return False
    x, y = parse_number(prediction), parse_number(gold)
    return x is not None and y is not None and x == y


def grade_gsm8k(reply: str, gold: str) -> Grade:
    """Correct when the last number in the reply equals the gold number exactly (``"18.00"`` and
    ``"18"`` agree; ``"1,250"`` reads as 1250)."""
    pred = extract_last_number(reply)
    return Grade(pred, judge_number(pred, gold))


# ---------------------------------------------------------------- MATH


def extract_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5": the argument is the next token.
        rest = text[start + len("\\boxed") :].strip().split()
        return rest[0].rstrip("$.") if rest else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF = re.compile(r"\\frac(\d)\{")
_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")
# Unit words after an answer ("12 \text{ cm}", "5 dollars"); no single letters, which are variables.
_UNITS = re.compile(
    r"\\?(?:text\{)?\s*(?:units?|cm|km|inches|inch|feet|foot|ft|degrees?|cents?|dollars?|hours?|minutes?|"
    r"seconds?|meters?|miles?|mph|square units)\b\}?\s*$"
)


def normalize_math(answer: str) -> str:
    """A canonical spelling of a MATH answer, so that ``\\dfrac{1}{2}``, ``\\frac12`` and ``1/2``
    compare equal, as do ``90^\\circ`` and ``90``, ``\\left( 3, \\pi \\right)`` and ``(3,\\pi)``,
    ``x = 5`` and ``5``, ``\\$12`` and ``12``, ``50\\%`` and ``50``."""
    s = answer.strip().strip("$").strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _UNITS.sub("", s).strip()
    s = _TEXT.sub(r"\1", s)
    # "x = 5" -> "5" (a short left side naming the variable), not "x + y = 5".
    if s.count("=") == 1:
        left, right = s.split("=")
        if len(left.strip()) <= 2:
            s = right
    s = s.replace(" ", "")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF.sub(r"\\frac{\1}{", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    # A simple fraction written inline: "3/4" -> "\frac{3}{4}".
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    s = s.replace("{.", "{0.")
    # Trailing zeros of a decimal ("2.50" -> "2.5", "3.0" -> "3").
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def _math_value(s: str) -> Fraction | None:
    m = _FRAC.fullmatch(s.lstrip("-"))
    if m:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        if num is None or den is None or den == 0:
            return None
        v = num / den
        return -v if s.startswith("-") else v
    if re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return Fraction(s)
    return None


def grade_math(reply: str, gold: str) -> Grade:
    """Correct when the reply's last ``\\boxed{}`` (else the text after "answer is", else its last
    number) equals the gold answer after :func:`normalize_math`, or both are the same number."""
    pred = extract_boxed(reply)
    if pred is None:
        m = re.search(r"answer is[:\s]*\$?([^$\n]+?)\$?\s*(?:\.\s*)?$", reply.strip(), re.IGNORECASE)
        pred = m.group(1) if m else extract_last_number(reply)
    return Grade(pred, judge_math(pred, gold))


def judge_math(prediction: str | None, gold: str) -> bool:
    """Whether an extracted MATH answer equals the gold one after :func:`normalize_math`, or both
    are the same number."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(gold)
    if a == b:
        return True
    x, y = _math_value(a), _math_value(b)
    return x is not None and y is not None and x == y


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
