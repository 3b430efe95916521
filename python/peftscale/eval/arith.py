"""Synthetic multi-step arithmetic word problems with exact step-by-step solutions, and step-labelled
rows for training verifiers (process reward models) on them (Game of 24's are
:func:`peftscale.eval.game24.verifier_rows`).

The packaged model solves ~1-4% of GSM8K, so labels from its own rollouts there are nearly all 0.
These problems are built to sit where a small model after fine-tuning solves some but not all: one
to five steps of + - * / on whole numbers, every intermediate result a whole number from 0 to 999,
each step one sentence of a story about one quantity. Everything is seeded: the same seed gives the
same problems on every machine.

Step-labelled rows use the stepwise-supervised fields TRL uses, with float labels in [0, 1]:
``{"prompt": str, "completions": [str, ...], "labels": [float, ...]}``, one label per step. Labels
here are exact (the arithmetic is the oracle): a step is 1 while the
correct answer can still be reached from it and 0 from the first wrong step on.

Write a held-out evaluation set (``peftscale eval --dataset arith-test.jsonl`` reads its
``question`` and ``answer``; ``solution`` holds the worked steps) and verifier rows::

    python -m peftscale.eval.arith problems --count 300 --seed 1000 --out arith-test.jsonl
    python -m peftscale.eval.arith rows --count 2000 --seed 1 --out arith-steps.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_VALUE",
    "Problem",
    "generate",
    "stepwise_rows",
]

MAX_VALUE = 999
"""The largest quantity a problem ever holds (every intermediate result lies in 0..MAX_VALUE)."""

_THINGS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards", "stamps", "beads")
_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Kai")

# One sentence per operation; {n} is the step's number, {t} the thing.
_SENTENCES = {
    "+": ("Then {p} gets {n} more {t}.", "Then {p} finds {n} more {t}.", "A friend gives {p} {n} more {t}."),
    "-": ("Then {p} gives away {n} {t}.", "Then {p} loses {n} {t}.", "Then {p} uses {n} of the {t}."),
    "*": ("Then the number of {t} becomes {n} times as large.", "Then {p} ends up with {n} times as many {t}."),
    "/": (
        "Then {p} shares the {t} equally among {n} boxes and keeps one box.",
        "Then {p} splits the {t} into {n} equal groups and keeps one group.",
    ),
}


@dataclass(frozen=True)
class Problem:
    """A word problem: its text, the steps of its solution (``"12 + 5 = 17"``, one per operation), and
    the answer."""

    question: str
    steps: tuple[str, ...]
    answer: int

    def solution(self) -> str:
        """The worked solution: one step per line, then ``The answer is N.``"""
        return "\n".join([*self.steps, f"The answer is {self.answer}."])


def _operation(rng: random.Random, value: int) -> tuple[str, int] | None:
    """A random operation on ``value`` whose result is a whole number in 0..MAX_VALUE, or None."""
    ops = ["+", "-", "*", "/"]
    rng.shuffle(ops)
    for op in ops:
        # At least 2 added or taken: the sentences speak of things in the plural.
        if op == "+" and value <= MAX_VALUE - 2:
            return op, rng.randint(2, min(50, MAX_VALUE - value))
        if op == "-" and value > 2:
            return op, rng.randint(2, min(50, value - 1))
        if op == "*" and 0 < value <= MAX_VALUE // 2:
            return op, rng.randint(2, min(9, MAX_VALUE // value))
        if op == "/":
            divisors = [d for d in range(2, 10) if value % d == 0 and value // d > 0]
            if divisors:
                return op, rng.choice(divisors)
    return None


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def generate(count: int, seed: int, min_steps: int = 1, max_steps: int = 5) -> list[Problem]:
    """``count`` problems from ``seed``, each with ``min_steps`` to ``max_steps`` operations (drawn
    evenly). The same arguments always give the same problems."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(f"peftscale-arith-{seed}")
    problems = []
    while len(problems) < count:
        problems.append(_one(rng, rng.randint(min_steps, max_steps)))
    return problems


def _one(rng: random.Random, steps: int) -> Problem:
    person, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    value = rng.randint(2, 60)
    sentences = [f"{person} has {value} {thing}."]
    lines = []
    for _ in range(steps):
        move = _operation(rng, value)
        if move is None:  # only 0 or 1 left with nothing to do: stop early, still a whole problem
            break
        op, n = move
        sentences.append(rng.choice(_SENTENCES[op]).format(p=person, n=n, t=thing))
        result = _apply(op, value, n)
        lines.append(f"{value} {op} {n} = {result}")
        value = result
    sentences.append(f"How many {thing} does {person} have now?")
    return Problem(" ".join(sentences), tuple(lines), value)


def stepwise_rows(problems: Sequence[Problem], seed: int, wrong_share: float = 0.5) -> list[dict[str, Any]]:
    """Step-labelled rows for a verifier: each problem's correct solution (every step 1.0), and for
    ``wrong_share`` of them a second solution with one arithmetic slip at a random step, carried
    exactly through the steps after it (labels 1.0 before the slip, 0.0 from it on). The final line (``The
    answer is N.``) is a step of its own."""
    if not 0.0 <= wrong_share <= 1.0:
        raise ValueError(f"wrong_share must lie in [0, 1], got {wrong_share}")
    rng = random.Random(f"peftscale-arith-rows-{seed}")
    rows = []
    for p in problems:
        steps = [*p.steps, f"The answer is {p.answer}."]
        rows.append({"prompt": p.question, "completions": steps, "labels": [1.0] * len(steps)})
        if p.steps and rng.random() < wrong_share:
            rows.append(_with_slip(p, rng))
    return rows


def _parse(step: str) -> tuple[int, str, int]:
    left, op, right, _, _ = step.split()
    return int(left), op, int(right)


def _with_slip(p: Problem, rng: random.Random) -> dict[str, Any]:
    """``p``'s solution with the result of one step too large by a small amount, the steps after it
    computed exactly from the wrong value. The slip is a multiple of every later divisor, so each
    later division still comes out whole, and every operation after it keeps the difference: the
    final answer is wrong."""
    at = rng.randrange(len(p.steps))
    later = [_parse(s) for s in p.steps[at + 1 :]]
    slip = rng.choice([1, 2, 3, 10]) * math.prod(b for _, op, b in later if op == "/")
    value: int | None = None
    lines = []
    for k, step in enumerate(p.steps):
        left, op, right = _parse(step)
        left = left if value is None else value
        value = _apply(op, left, right) + (slip if k == at else 0)
        lines.append(f"{left} {op} {right} = {value}")
    steps = [*lines, f"The answer is {value}."]
    labels = [1.0 if k < at else 0.0 for k in range(len(steps))]
    return {"prompt": p.question, "completions": steps, "labels": labels}


def _write(rows: Sequence[dict[str, Any]], out: str) -> None:
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m peftscale.eval.arith", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name, helptext in (
        ("problems", "word problems: question, answer, solution"),
        ("rows", "step-labelled verifier rows for word problems"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--seed", type=int, required=True, help="keep evaluation seeds apart from training seeds")
        p.add_argument("--min-steps", type=int, default=1)
        p.add_argument("--max-steps", type=int, default=5)
        p.add_argument("--out", required=True)
        if name == "rows":
            p.add_argument("--wrong-share", type=float, default=0.5)
    args = ap.parse_args(argv)
    try:
        problems = generate(args.count, args.seed, args.min_steps, args.max_steps)
        if args.what == "problems":
            rows = [{"question": p.question, "answer": p.answer, "solution": p.solution()} for p in problems]
        else:
            rows = stepwise_rows(problems, args.seed, args.wrong_share)
        _write(rows, args.out)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
