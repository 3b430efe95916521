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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftscale.errors import PeftscaleError
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
    "judge_scores",
    "judgement",
    "search_settings",
    "parse_step",
    "solutions",
    "step_labels",
    "training_rows",
    "verifier_rows",
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


def _plain(found: list[tuple[list[Step], str]]) -> list[tuple[list[Step], str]]:
    """The solutions through whole, non-negative numbers only, where there are any: the steps a
    person would write, and easier for a small model to imitate."""
    return [f for f in found if all(s.result >= 0 and s.result.denominator == 1 for s in f[0])] or found


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
        return _redone(last, steps[-2].remaining)
    pool = list(last.remaining)
    if last.result in pool:
        pool.remove(last.result)
    return _redone(last, (*pool, last.left, last.right))


def _redone(step: Step, before: Sequence[Fraction]) -> Step | str:
    """``step`` worked out again from the numbers ``before`` it, or why it cannot be."""
    pool = list(before)
    for n in (step.left, step.right):
        if n not in pool:
            return f"{format_number(n)} is not left"
        pool.remove(n)
    if step.op == "/" and step.right == 0:
        return "no division by 0"
    value = _OPS[step.op](step.left, step.right)
    return Step(step.left, step.op, step.right, value, tuple(sorted([*pool, value])))


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


_Item = tuple[Fraction, str]
"""A number left and the expression that made it from the puzzle's numbers."""


def _combine(items: list[_Item], i: int, j: int, op: str, value: Fraction) -> tuple[Step, list[_Item]]:
    rest = [items[k] for k in range(len(items)) if k not in (i, j)]
    expr = f"{items[i][1]} {op} {items[j][1]}"
    merged = [*rest, (value, f"({expr})" if rest else expr)]
    return Step(items[i][0], op, items[j][0], value, tuple(sorted(v for v, _ in merged))), merged


def _replay(puzzle: str, steps: Sequence[Step]) -> list[_Item]:
    """The numbers left after the exact ``steps``, with their expressions."""
    items: list[_Item] = [(Fraction(int(n)), n) for n in puzzle.split()]
    for s in steps:
        i = next(k for k, (v, _) in enumerate(items) if v == s.left)
        j = next(k for k, (v, _) in enumerate(items) if v == s.right and k != i)
        _, items = _combine(items, i, j, s.op, s.result)
    return items


def _false_finish(puzzle: str, rng: random.Random) -> tuple[list[Step], str] | None:
    """Three exact steps that do not make 24 but whose last one claims it, and the answer they
    compose (which the checker rejects); ``None`` when the random path happens to be right."""
    items = _replay(puzzle, [])
    steps: list[Step] = []
    while len(items) > 1:
        i, j, op, value = rng.choice(list(_moves(tuple(v for v, _ in items))))
        if len(items) == 2:
            if value == 24:
                return None
            value = Fraction(24)
        step, items = _combine(items, i, j, op, value)
        steps.append(step)
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
            pool = _plain(found)
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


def parse_step(line: str) -> Step | None:
    """A line in the propose format (``"4 + 8 = 12 (left: 6 12)"``) as a :class:`Step`, or None."""
    head, sep, tail = line.strip().partition(" (left: ")
    if not sep or not tail.endswith(")"):
        return None
    parts = head.split()
    if len(parts) != 5 or parts[1] not in _OPS or parts[3] != "=":
        return None
    try:
        left, right, result = (Fraction(parts[k]) for k in (0, 2, 4))
        remaining = tuple(sorted(Fraction(n) for n in tail[:-1].split()))
    except (ValueError, ZeroDivisionError):
        return None
    return Step(left, parts[1], right, result, remaining)


def step_labels(puzzle: str, lines: Sequence[str]) -> list[float]:
    """Exact labels of a reply's lines, one per line: 1.0 while every step so far is sound (parsed,
    its arithmetic right, its numbers left those the step before left less the two used plus the
    result) and 24 can still be made from what it leaves; an ``Answer:`` line is 1.0 when every step
    before it is sound and its expression is right. From the first line that fails, every line is
    0.0: a search must not keep a state built on a slip, even one that later happens to make 24."""
    labels: list[float] = []
    left, sound = _start(puzzle), True
    for line in lines:
        if sound and line.strip().lower().startswith("answer"):
            sound = check_game24(line.split(":", 1)[-1], puzzle)
        elif sound:
            step = parse_step(line)
            # Sound: it combines two of the numbers left, computes right, and leaves the rest plus its result.
            sound = step is not None and _redone(step, left) == step and _reachable(step.remaining)
            left = step.remaining if step is not None else left
        labels.append(1.0 if sound else 0.0)
    return labels


def _play_out(puzzle: str, steps: list[Step], rng: random.Random, first_reachable: bool | None = None) -> list[str]:
    """``steps`` (exact) continued with random exact steps down to one number, as reply lines ending
    in the answer the steps compose (``Answer: <expression> = 24``, false when it is not 24, as a
    small model writes it); the first added step leads where 24 can (or cannot) be made when
    ``first_reachable`` says so and such a step exists."""
    items = _replay(puzzle, steps)
    steps = list(steps)
    while len(items) > 1:
        nums = tuple(v for v, _ in items)
        moves = list(_moves(nums))
        if first_reachable is not None:
            wanted = [m for m in moves if _reachable(_after(nums, *m[:2], m[3])) == first_reachable]
            moves, first_reachable = wanted or moves, None
        step, items = _combine(items, *rng.choice(moves))
        steps.append(step)
    return [*(str(s) for s in steps), f"Answer: {items[0][1]} = 24"]


def _after_slip(steps: list[Step], rng: random.Random) -> list[str]:
    """``steps`` whose last one is a slip, continued with exact steps from the numbers it claims
    are left down to one number (no answer line: the expressions no longer add up)."""
    nums, lines = steps[-1].remaining, [str(s) for s in steps]
    while len(nums) > 1:
        i, j, op, value = rng.choice(list(_moves(nums)))
        step = Step(nums[i], op, nums[j], value, _after(nums, i, j, value))
        lines.append(str(step))
        nums = step.remaining
    return lines


VERIFIER_KINDS = ("trace", "walk", "turn", "slip", "false-finish")
"""The replies :func:`verifier_rows` writes for each puzzle, in turn."""


def verifier_rows(puzzles: Sequence[str], seed: int, per_puzzle: int = 5) -> list[dict[str, Any]]:
    """Step-labelled rows for a Game of 24 verifier (``{"prompt", "completions", "labels"}``), the
    prompt being the user turn a search asks the policy (:data:`GAME24_TEMPLATE`) and each
    completion one line of the reply in the propose format, labelled by :func:`step_labels`.

    Each puzzle gets ``per_puzzle`` replies, the kinds of :data:`VERIFIER_KINDS` in turn: a solution
    (every line 1); a random walk of exact steps; a solution's first steps then a random turn that
    leaves 24 out of reach; a solution's first steps then a slip (wrong arithmetic or wrong numbers
    left) continued with exact steps; three exact steps whose last falsely claims 24, with the answer
    they compose. A puzzle without a solution gets random walks instead."""
    if per_puzzle < 1:
        raise ValueError(f"per_puzzle must be >= 1, got {per_puzzle}")
    rng = random.Random(f"peftscale-game24-verifier-{seed}")
    rows = []
    for puzzle in puzzles:
        found = _plain(solutions(puzzle))
        for n in range(per_puzzle):
            kind = VERIFIER_KINDS[n % len(VERIFIER_KINDS)] if found else "walk"
            lines = _verifier_reply(kind, puzzle, rng.choice(found) if found else None, rng)
            rows.append(
                {
                    "prompt": user_turn(GAME24_TEMPLATE, puzzle),
                    "completions": lines,
                    "labels": step_labels(puzzle, lines),
                    "kind": kind,
                }
            )
    return rows


def _verifier_reply(kind: str, puzzle: str, solution: tuple[list[Step], str] | None, rng: random.Random) -> list[str]:
    if kind == "walk" or solution is None:
        return _play_out(puzzle, [], rng)
    steps, answer = solution
    if kind == "trace":
        return [*(str(s) for s in steps), f"Answer: {answer}"]
    if kind == "turn":
        return _play_out(puzzle, steps[: rng.randrange(len(steps))], rng, first_reachable=False)
    if kind == "slip":
        slipped = None
        if rng.random() < 0.5:
            slipped = _misbooking(list(steps[: rng.randrange(1, len(steps))]), puzzle, rng)
        if slipped is None:
            slipped = _miscalculation(list(steps[: rng.randrange(len(steps))]), puzzle, rng)
        return _after_slip(slipped, rng)
    false = None
    while false is None:
        false = _false_finish(puzzle, rng)
    false_steps, false_answer = false
    return [*(str(s) for s in false_steps), f"Answer: {false_answer}"]


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
        return sum(VERDICT_SCORES[verdict(o.text or "")] for o in outs) / len(outs)

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


VERDICT_SCORES = {"sure": 1.0, "likely": 0.5, "impossible": 0.0, None: 0.0}
"""A judgement's verdict as a value (no verdict counts as impossible)."""


def judge_scores(
    engine: Engine,
    rows: Sequence[dict[str, Any]],
    adapter: str | None,
    batch_size: int = 32,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> list[list[float]]:
    """The policy's own text judgement of every state of stepwise ``rows`` (a state: a reply's lines
    up to a step): :data:`VALUE_QUESTION` in the chat template, one greedy reply of at most
    :data:`VALUE_MAX_TOKENS` tokens and one line, its verdict scored by :data:`VERDICT_SCORES`; the
    same states a verifier is scored on (:mod:`peftscale.eval.step_quality`), ``batch_size`` per call."""
    from peftscale.strategies import Greedy

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    states = [(n, "\n".join(r["completions"][:k])) for n, r in enumerate(rows) for k in range(1, len(r["labels"]) + 1)]
    scores: list[list[float]] = [[] for _ in rows]
    starts: Iterable[int] = range(0, len(states), batch_size)
    for start in progress(starts) if progress else starts:
        batch = states[start : start + batch_size]
        chats = [
            engine.apply_chat_template([{"role": "user", "content": VALUE_QUESTION.replace("{state}", state)}])
            for _, state in batch
        ]
        outs = engine.generate(chats, max_new_tokens=VALUE_MAX_TOKENS, strategy=Greedy(), adapter=adapter, stop=["\n"])
        assert isinstance(outs, list)
        for (n, _), out in zip(batch, outs, strict=True):
            scores[n].append(VERDICT_SCORES[verdict(out.text or "")])
    return scores


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


def _judge_quality(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from peftscale import models
    from peftscale.engine import Engine
    from peftscale.eval.step_quality import quality, read_rows, report

    rows = read_rows(args.rows)
    engine = Engine.load(args.model or models.smollm2_135m_instruct())
    if args.adapter:
        engine.load_adapter(args.adapter, name="policy")
    scores = judge_scores(
        engine,
        rows,
        "policy" if args.adapter else None,
        args.batch_size,
        lambda batches: tqdm(batches, desc="batches", unit="batch"),
    )
    report(quality(rows, scores), args.out, adapter=args.adapter, rows=args.rows)
    return 0


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
    v = sub.add_parser(
        "verifier-rows", help="write step-labelled rows for a verifier (method: prm), labelled by the solver"
    )
    v.add_argument("--out", required=True, help="a .jsonl file")
    v.add_argument(
        "--puzzles",
        choices=("train", "test"),
        default="train",
        help="the puzzles outside rows 900-999 (train, the default) or rows 900-999 (test: held-out states)",
    )
    v.add_argument("--per-puzzle", type=int, default=len(VERIFIER_KINDS))
    v.add_argument("--seed", type=int, default=0)
    v.add_argument(
        "--data-dir", default=None, help="where game24/24.csv lies (default: the copies shipped with peftscale)"
    )
    j = sub.add_parser(
        "judge-quality",
        help="the policy's own sure/likely/impossible judgement of stepwise rows' states: step AUC and accuracy",
    )
    j.add_argument("--rows", required=True, help="stepwise rows (verifier-rows --puzzles test)")
    j.add_argument("--adapter", default=None, help="the policy's LoRA folder (default: the base model)")
    j.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: packaged SmolLM2)")
    j.add_argument("--batch-size", type=int, default=32)
    j.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = ap.parse_args(argv)
    if args.command == "judge-quality":
        if args.batch_size < 1:
            ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
        try:
            return _judge_quality(args)
        except PeftscaleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    puzzles = _read_puzzles(data_dir)
    train = [p for i, p in enumerate(puzzles) if i not in TEST_RANGE]
    if args.command == "verifier-rows":
        chosen = train if args.puzzles == "train" else [puzzles[i] for i in TEST_RANGE]
        try:
            vrows = verifier_rows(chosen, args.seed, args.per_puzzle)
        except ValueError as e:
            ap.error(str(e))
        with open(args.out, "w", encoding="utf-8") as f:
            for row in vrows:
                f.write(json.dumps(row) + "\n")
        steps = [x for r in vrows for x in r["labels"]]
        print(
            f"{len(vrows)} rows, {len(steps)} steps ({sum(steps) / max(1, len(steps)):.0%} labelled 1) from "
            f"{len(chosen)} {args.puzzles} puzzles: {args.out}",
            file=sys.stderr,
        )
        return 0
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
