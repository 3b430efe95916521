"""The answer rules that voting and grading share.

Self-consistency, MCTS and adaptive compute vote on the answers these functions read, and
:mod:`peftscale.eval` grades with them: one implementation (in the Rust core), so a strategy is
never graded by a rule other than the one it voted with. Answers come back in one spelling, so
equivalent spellings are one answer:

>>> import peftscale as ps
>>> ps.extract_answer("She pays $1,250.00 in all.")
'1250'
>>> ps.extract_answer("so x-5", "last_number")   # a minus after a letter is subtraction
'5'
>>> ps.extract_answer(r"The answer is $\\boxed{\\dfrac12}$.", "boxed")
'0.5'
>>> ps.normalize_answer(r"\\frac{1}{2}", "boxed") == ps.normalize_answer("0.5", "boxed")
True
>>> ps.vote(["it is 3/4", "0.75", "so 1"])
[('0.75', 2.0), ('1', 1.0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from peftscale import _core

AnswerKind = Literal["last_number", "boxed", "choice_letter"]

__all__ = ["AnswerKind", "extract_answer", "normalize_answer", "vote"]


def extract_answer(text: str, kind: AnswerKind = "last_number") -> str | None:
    """The answer ``kind`` reads from ``text``, canonically spelled, or ``None`` when it finds none.

    - ``"last_number"``: the last number (``1,250`` -> ``1250``, ``2.50`` -> ``2.5``, ``3/4`` ->
      ``0.75``, ``1/3`` -> ``1/3``, ``50%`` -> ``50``); a minus sign right after a letter, digit or
      closing bracket is subtraction; commas group thousands only in threes (``2,3`` ends in 3).
    - ``"boxed"``: a MATH answer: the last ``\\boxed{}`` or ``\\fbox{}``, else what follows the last
      "answer is", else the last number; normalised (``\\dfrac12``, ``1/2``, ``0.5`` -> ``0.5``;
      ``90^\\circ`` -> ``90``; ``x = 5`` -> ``5``).
    - ``"choice_letter"``: A-J: the last ``(X)``, else the letter after "answer is"/"answer:".
    """
    return _core.extract_answer(text, kind)


def normalize_answer(answer: str, kind: AnswerKind = "last_number") -> str:
    """A whole answer (a gold answer, say) in the spelling :func:`extract_answer` gives, so that
    ``extract_answer(reply, kind) == normalize_answer(gold, kind)`` is the grading rule."""
    return _core.normalize_answer(answer, kind)


def vote(
    texts: Sequence[str], kind: AnswerKind = "last_number", weights: Sequence[float] | None = None
) -> list[tuple[str, float]]:
    """Self-consistency's vote over ``texts`` (the same code the strategy runs): ``(answer, votes)``
    pairs, most votes first, ties in order of first appearance; texts without an answer abstain."""
    return _core.vote(list(texts), kind, None if weights is None else list(weights))
