"""Game of 24 at small scale (the Tree-of-Thought paper's setting): a solver, the LoRA training
data it yields, and the search settings that use the model's own proposals and value judgements.

The recipe (``examples/game24/README.md``):

1. ``python -m peftscale.eval.game24 data --out runs/game24-data`` writes chat-format training
   rows from puzzles *outside* the test range 900-999 of ``24.csv``: solution traces in the
   propose format (``4 + 8 = 12 (left: 6 12)``, one step per line, then ``Answer: ... = 24``) and
   value judgements of partial solutions: one line that works the last step out again from the
   numbers before it, lists what two numbers left can make, and ends with sure / likely /
   impossible (labelled by the solver; :func:`judgement`).
2. ``peftscale train examples/game24/lora-game24.yaml`` trains the adapter on them.
3. ``peftscale eval --dataset game24 --slice 900:1000 --adapter runs/game24-lora
   --strategies greedy,sc@1..8,tot@1:5,mcts@4 --out runs/eval-game24``: Tree-of-Thought samples
   each step from the adapter and scores the states with the adapter's own value judgements.

The solver labels the training data only; the checker grades only the final expressions; neither
runs inside a search.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftscale.eval.datasets import GAME24_TEMPLATE, default_data_dir
from peftscale.eval.grading import check_game24
from peftscale.eval.prompts import user_turn

if TYPE_CHECKING:
    from peftscale.engine import Engine

__all__ = [
    "TEST_RANGE",
    "VALUE_QUESTION",
    "ModelJudge",
    "VALUE_MAX_TOKENS",
    "Step",
    "can_reach_24",
    "format_number",
    "judgement",
    "search_settings",
    "solutions",
    "training_rows",
    "value_label",
    "verdict",
]

TEST_RANGE = range(900, 1000)
"""The puzzles the ToT paper tests on (rows of ``24.csv``); training never uses them."""

VALUE_QUESTION = (
    "Steps so far:\n{state}\nCan the numbers left still make 24? Answer with one word: sure, likely or impossible."
)
"""The value judgement's user turn; ``{state}`` is the partial solution, one step per line."""

VALUE_MAX_TOKENS = 96
"""Room for a judgement's reply (:func:`judgement`: ~20 tokens of recomputed step, 30-70 of what
two numbers make, the verdict)."""

LABELS = ("sure", "likely", "impossible")

_OPS = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "/": Fraction.__truediv__}


def format_number(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


@dataclass(frozen=True)
class Step:
    """``left op right = result``, and the numbers left afterwards (sorted)."""

    left: Fraction
    op: str
    right: Fraction
    result: Fraction
    remaining: tuple[Fraction, ...]

    def __str__(self) -> str:
        rest = " ".join(format_number(n) for n in self.remaining)
        return (
            f"{format_number(self.left)} {self.op} {format_number(self.right)} = "
            f"{format_number(self.result)} (left: {rest})"
        )


def _moves(nums: tuple[Fraction, ...]) -> Iterator[tuple[int, int, str, Fraction]]:
    """Every (i, j, op, value) that combines two of ``nums`` (both orders for - and /)."""
    for i in range(len(nums)):
        for j in range(len(nums)):
            if i == j:
                continue
            a, b = nums[i], nums[j]
            if i < j:
                yield i, j, "+", a + b
                yield i, j, "*", a * b
            yield i, j, "-", a - b
            if b != 0:
                yield i, j, "/", a / b


def _start(puzzle: str) -> tuple[Fraction, ...]:
    return tuple(sorted(Fraction(int(n)) for n in puzzle.split()))


def _after(nums: tuple[Fraction, ...], i: int, j: int, value: Fraction) -> tuple[Fraction, ...]:
    return tuple(sorted([n for k, n in enumerate(nums) if k not in (i, j)] + [value]))


def _left(steps: Sequence[Step], puzzle: str) -> tuple[Fraction, ...]:
    return steps[-1].remaining if steps else _start(puzzle)


@functools.cache
def _reachable(nums: tuple[Fraction, ...]) -> bool:
    if len(nums) == 1:
        return nums[0] == 24
    return any(_reachable(_after(nums, i, j, value)) for i, j, _, value in _moves(nums))


def can_reach_24(numbers: Sequence[int | Fraction]) -> bool:
    """Whether ``numbers`` can still make 24 with + - * / (each used once, exact arithmetic)."""
    return _reachable(tuple(sorted(Fraction(n) for n in numbers)))


def solutions(puzzle: str) -> list[tuple[list[Step], str]]:
    """Every way to solve ``puzzle`` (``"4 9 10 13"``) as steps and the final expression, distinct
    expressions only, in a fixed order."""
    start = [(Fraction(int(n)), n) for n in puzzle.split()]
    found: dict[str, list[Step]] = {}

    def walk(items: list[tuple[Fraction, str]], steps: list[Step]) -> None:
        if len(items) == 1:
            if items[0][0] == 24:
                found.setdefault(items[0][1], list(steps))
            return
        nums = tuple(v for v, _ in items)
        for i, j, op, value in _moves(nums):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            if not _reachable(tuple(sorted([v for v, _ in rest] + [value]))):
                continue
            left_expr, right_expr = items[i][1], items[j][1]
            expr = f"{left_expr} {op} {right_expr}"
            merged = [*rest, (value, f"({expr})" if len(rest) else expr)]
            remaining = tuple(sorted(v for v, _ in merged))
            walk(merged, [*steps, Step(nums[i], op, nums[j], value, remaining)])

    walk(start, [])
    return [(steps, f"{expr} = 24") for expr, steps in found.items()]


def value_label(steps: Sequence[Step], puzzle: str, answer: str | None = None) -> str:
    """The solver's judgement of a partial solution: ``sure`` when one step (or none) is left and
    it works, or a final answer is right; ``likely`` when 24 is still reachable in more steps;
    ``impossible`` otherwise."""
    if answer is not None:
        return "sure" if check_game24(answer, puzzle) else "impossible"
    numbers = _left(steps, puzzle)
    if not can_reach_24(numbers):
        return "impossible"
    return "sure" if len(numbers) <= 2 else "likely"


def _recomputed(steps: Sequence[Step]) -> Step | str:
    """The last of ``steps`` worked out again from the numbers the step before it left (for a
    first step, the numbers it claims to leave less its result, plus its operands: the judge
    does not see the puzzle), or why it cannot be (it uses a number that is not left)."""
    last = steps[-1]
    if len(steps) > 1:
        pool = list(steps[-2].remaining)
    else:
        pool = list(last.remaining)
        if last.result in pool:
            pool.remove(last.result)
        pool += [last.left, last.right]
    for n in (last.left, last.right):
        if n not in pool:
            return f"{format_number(n)} is not left"
        pool.remove(n)
    if last.op == "/" and last.right == 0:
        return "no division by 0"
    value = _OPS[last.op](last.left, last.right)
    return Step(last.left, last.op, last.right, value, tuple(sorted([*pool, value])))


def _pair_results(nums: tuple[Fraction, ...]) -> str:
    """What two numbers can make that might be 24: the sum, the product, the larger less the
    smaller, and the one of larger magnitude over the other."""
    x, y = nums
    small, large = sorted(nums)
    over, under = sorted(nums, key=abs, reverse=True)
    parts = [
        f"{format_number(x)} + {format_number(y)} = {format_number(x + y)}",
        f"{format_number(x)} * {format_number(y)} = {format_number(x * y)}",
        f"{format_number(large)} - {format_number(small)} = {format_number(large - small)}",
    ]
    if under != 0:
        parts.append(f"{format_number(over)} / {format_number(under)} = {format_number(over / under)}")
    return ", ".join(parts)


def judgement(steps: Sequence[Step], puzzle: str, answer: str | None = None) -> str:
    """The value judgement the search should give a partial solution, as one line the model can
    produce: the last step worked out again (a slip in its arithmetic or in the numbers it says
    are left shows as a difference, and makes the state ``impossible``), then for two numbers
    left what they make, then the label: ``sure`` / ``likely`` / ``impossible`` as in
    :func:`value_label` for the numbers truly left, or for ``answer`` whether it is right.

    ``"19 - 13 = 6 (left: 4 6); 4 + 6 = 10, 4 * 6 = 24, 6 - 4 = 2, 6 / 4 = 3/2; sure"``"""
    parts: list[str] = []
    left = _start(puzzle)
    if steps:
        redone = _recomputed(steps)
        parts.append(str(redone))
        if redone != steps[-1]:
            return "; ".join([*parts, "impossible"])
        left = steps[-1].remaining
    if answer is not None:
        label = value_label(steps, puzzle, answer)
    else:
        if len(left) == 2:
            parts.append(_pair_results(left))
        label = value_label(steps, puzzle)
    return "; ".join([*parts, label])


def verdict(reply: str) -> str | None:
    """The label a judgement's reply ends on: the last whole word among sure / likely /
    impossible (as the Tree-of-Thought search reads it), or ``None``."""
    words = [w for w in "".join(c if c.isalpha() else " " for c in reply.lower()).split() if w in LABELS]
    return words[-1] if words else None


def _turn(steps: list[Step], puzzle: str, rng: random.Random, reachable: bool) -> list[Step] | None:
    """``steps`` with one more (exact) step after which 24 can (``reachable``) or cannot be made."""
    nums = _left(steps, puzzle)
    options = [
        Step(nums[i], op, nums[j], value, rest)
        for i, j, op, value in _moves(nums)
        if _reachable(rest := _after(nums, i, j, value)) == reachable
    ]
    return [*steps, rng.choice(options)] if options else None


def _miscalculation(steps: list[Step], puzzle: str, rng: random.Random) -> list[Step]:
    """``steps`` with one more step whose result is wrong (off by one or two, or another
    operation's result; on the last step, half the time a false 24), the numbers left following
    the wrong result: the small model's usual slips."""
    nums = _left(steps, puzzle)
    i, j, op, value = rng.choice(list(_moves(nums)))
    near = {value + d for d in (-2, -1, 1, 2)} | {v for *_, v in _moves((nums[i], nums[j]))}
    if len(nums) == 2 and value != 24 and rng.random() < 0.5:
        near = {Fraction(24)}
    wrong = sorted(v for v in near if v != value)
    plain = [v for v in wrong if v >= 0 and v.denominator == 1]
    result = rng.choice(plain or wrong)
    return [*steps, Step(nums[i], op, nums[j], result, _after(nums, i, j, result))]


def _misbooking(steps: list[Step], puzzle: str, rng: random.Random) -> list[Step] | None:
    """``steps`` (at least one) with one more step whose arithmetic is right but whose numbers
    left are not: a false ``(left: 24)`` on the last step, or a number dropped, kept after use,
    or left out in favour of a used one; ``None`` when the slip happens to be right."""
    nums = _left(steps, puzzle)
    i, j, op, value = rng.choice(list(_moves(nums)))
    after = list(_after(nums, i, j, value))
    if len(after) == 1:
        claimed = [Fraction(24)]
    else:
        rest = list(after)
        rest.remove(value)
        slip = rng.choice(["drop", "keep", "swap"])
        if slip == "drop":
            rest.remove(rng.choice(rest))
        elif slip == "keep":
            rest.append(rng.choice([nums[i], nums[j]]))
        else:
            rest[rng.randrange(len(rest))] = rng.choice([nums[i], nums[j]])
        claimed = [*rest, value]
    remaining = tuple(sorted(claimed))
    if remaining == tuple(after):
        return None
    return [*steps, Step(nums[i], op, nums[j], value, remaining)]


def _false_finish(puzzle: str, rng: random.Random) -> tuple[list[Step], str] | None:
    """Three exact steps that do not make 24 but whose last one claims it, and the answer they
    compose (which the checker rejects); ``None`` when the random path happens to be right."""
    items = [(Fraction(int(n)), n) for n in puzzle.split()]
    steps: list[Step] = []
    while len(items) > 1:
        nums = tuple(v for v, _ in items)
        i, j, op, value = rng.choice(list(_moves(nums)))
        rest = [items[k] for k in range(len(items)) if k not in (i, j)]
        expr = f"{items[i][1]} {op} {items[j][1]}"
        if not rest:
            if value == 24:
                return None
            value = Fraction(24)
        merged = [*rest, (value, f"({expr})" if rest else expr)]
        steps.append(Step(nums[i], op, nums[j], value, tuple(sorted(v for v, _ in merged))))
        items = merged
    return steps, f"{items[0][1]} = 24"


def training_rows(puzzles: Sequence[str], traces_per_puzzle: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows (``{"messages": [...]}``) for ``peftscale train``: up to ``traces_per_puzzle``
    solution traces per solvable puzzle, and value judgements of partial solutions, the three
    labels equally often and each label half as often as traces (where the puzzles give enough).

    The judgements (:func:`judgement`) cover what a search meets: ``sure`` for two numbers left
    that make 24, for 24 reached and for a right answer; ``likely`` for three numbers left that
    can still make it; ``impossible`` for a turn after which 24 cannot be made, for a step with
    wrong arithmetic or wrong numbers left (whatever follows), and for an answer built on a step
    that falsely claims 24."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    values: dict[str, list[dict[str, Any]]] = {label: [] for label in LABELS}

    def judged(steps: list[Step] | None, puzzle: str, answer: str | None = None) -> None:
        if steps is None:
            return
        state = [str(s) for s in steps] + ([f"Answer: {answer}"] if answer is not None else [])
        question = VALUE_QUESTION.replace("{state}", "\n".join(state))
        reply = judgement(steps, puzzle, answer)
        values[reply.rsplit("; ", 1)[-1]].append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}
        )

    for puzzle in puzzles:
        found = solutions(puzzle)
        prompt = user_turn(GAME24_TEMPLATE, puzzle)
        if found:
            # Traces through whole, non-negative numbers where the puzzle has them: the steps a
            # person would write, and easier for a small model to imitate.
            plain = [f for f in found if all(s.result >= 0 and s.result.denominator == 1 for s in f[0])]
            pool = plain or found
            for steps, answer in rng.sample(pool, min(traces_per_puzzle, len(pool))):
                reply = "\n".join([*(str(s) for s in steps), f"Answer: {answer}"])
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
                rows.append({"messages": messages})
            steps, answer = rng.choice(pool)
            for k in range(1, len(steps) + 1):
                judged(list(steps[:k]), puzzle)
            judged(steps, puzzle, answer)
            judged(_turn([], puzzle, rng, reachable=True), puzzle)
            judged(_turn(list(steps[: rng.randrange(len(steps))]), puzzle, rng, reachable=False), puzzle)
            judged(_miscalculation(list(steps[: rng.randrange(len(steps))]), puzzle, rng), puzzle)
            judged(_misbooking(list(steps[: rng.randrange(1, len(steps))]), puzzle, rng), puzzle)
        else:
            judged(_turn([], puzzle, rng, reachable=False), puzzle)
        for _ in range(4):
            if (false := _false_finish(puzzle, rng)) is not None:
                false_steps, false_answer = false
                judged(false_steps, puzzle, false_answer)
                break
    # Each label equally often, so that none is the safe guess; traces stay 40% of the rows.
    per_label = min(*(len(v) for v in values.values()), max(1, len(rows) // 2))
    for label in values:
        rows.extend(rng.sample(values[label], per_label))
    rng.shuffle(rows)
    return rows


class ModelJudge:
    """MCTS's reward from the model's own judgement: it asks ``VALUE_QUESTION`` about a finished
    rollout ``samples`` times (with ``adapter``) and scores the verdicts sure / likely / impossible
    as 1 / 0.5 / 0.

    Its generations are separate engine calls, so their compute is kept here for the caller to
    add to the search's (:meth:`take_spent`)."""

    def __init__(self, engine: Engine, adapter: str | None, samples: int = 3, seed: int = 0) -> None:
        self.engine, self.adapter, self.samples, self.seed = engine, adapter, samples, seed
        self._tokens, self._flops = 0, 0.0

    def __call__(self, prompt: str, text: str) -> float:
        from peftscale.strategies import Sampling

        question = VALUE_QUESTION.replace("{state}", text.strip())
        chat = self.engine.apply_chat_template([{"role": "user", "content": question}])
        outs = self.engine.generate(
            [chat] * self.samples,
            max_new_tokens=VALUE_MAX_TOKENS,
            strategy=Sampling(temperature=0.7, seed=self.seed),
            adapter=self.adapter,
            stop=["\n"],
        )
        assert isinstance(outs, list)
        self._tokens += outs[0].stats.tokens_forwarded
        self._flops += outs[0].stats.flops
        score = {"sure": 1.0, "likely": 0.5, "impossible": 0.0, None: 0.0}
        return sum(score[verdict(o.text or "")] for o in outs) / len(outs)

    def peftscale_fingerprint(self) -> str:
        """What its rewards depend on (for resuming an evaluation): the model's weights, the
        adapter's name, the samples and seed, and the question asked."""
        from peftscale.eval.runner import fingerprint

        return fingerprint(self.engine.path, self.adapter, self.samples, self.seed, VALUE_QUESTION, VALUE_MAX_TOKENS)

    def take_spent(self) -> tuple[int, float]:
        """Tokens and FLOPs spent since the last call, and resets them."""
        spent = (self._tokens, self._flops)
        self._tokens, self._flops = 0, 0.0
        return spent


def search_settings(engine: Engine, adapter: str | None = None) -> dict[str, dict[str, Any]]:
    """Tree-of-Thought and MCTS settings for Game of 24: one step per line (three steps, then the
    answer line), steps sampled from the model; Tree-of-Thought's states valued by the model's own
    sure / likely / impossible judgement, asked in its chat format, and MCTS's rollouts rewarded by
    the same judgement of the finished answer (:class:`ModelJudge`, with ``adapter``)."""
    value_template = engine.apply_chat_template([{"role": "user", "content": VALUE_QUESTION}])
    return {
        "tot": {
            "step_delimiter": "\n",
            "depth": 4,
            "proposals": 3,
            "generate": "sample",
            "evaluator": "self",
            "value_samples": 3,
            "value_max_tokens": VALUE_MAX_TOKENS,
            "value_template": value_template,
            "max_step_tokens": 32,
        },
        "mcts": {
            "step_delimiter": "\n",
            "max_depth": 4,
            "max_step_tokens": 32,
            "reward": ModelJudge(engine, adapter),
        },
    }


def _read_puzzles(data_dir: Path) -> list[str]:
    with open(data_dir / "game24" / "24.csv", encoding="utf-8", newline="") as f:
        return [row["Puzzles"] for row in csv.DictReader(f)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peftscale.eval.game24", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write LoRA training rows from the puzzles outside rows 900-999")
    d.add_argument("--out", required=True, help="folder for train.jsonl")
    d.add_argument(
        "--data-dir", default=None, help="where game24/24.csv lies (default: the copies shipped with peftscale)"
    )
    d.add_argument("--traces-per-puzzle", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    puzzles = _read_puzzles(data_dir)
    train = [p for i, p in enumerate(puzzles) if i not in TEST_RANGE]
    rows = training_rows(train, args.traces_per_puzzle, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    traces = sum(1 for r in rows if "Steps so far:" not in r["messages"][0]["content"])
    print(
        f"{len(rows)} rows ({traces} solution traces, {len(rows) - traces} value judgements) from "
        f"{len(train)} puzzles outside rows {TEST_RANGE.start}-{TEST_RANGE.stop - 1}: {out / 'train.jsonl'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
