"""The synthetic arithmetic problems and the step-labelled verifier rows, against exact arithmetic
and an independent Game of 24 solver."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from peftscale.eval import arith
from peftscale.eval.datasets import load_task

STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (-?\d+)$")


def _exact(a: int, op: str, b: int) -> Fraction:
    return {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]


def test_same_seed_same_problems_and_seeds_differ() -> None:
    a = arith.generate(50, seed=3)
    assert a == arith.generate(50, seed=3)
    assert [p.question for p in a] != [p.question for p in arith.generate(50, seed=4)]


def test_every_step_is_exact_whole_and_chained() -> None:
    problems = arith.generate(400, seed=11, min_steps=1, max_steps=5)
    for p in problems:
        start = int(re.search(r" has (\d+) ", p.question).group(1))  # type: ignore[union-attr]
        value = start
        assert 1 <= len(p.steps) <= 5 or value <= 1, p
        for step in p.steps:
            m = STEP.match(step)
            assert m, step
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == value, (p, step)
            assert _exact(a, op, b) == c, step
            assert 0 <= c <= arith.MAX_VALUE, step
            assert str(b) in p.question
            value = c
        assert p.answer == value
        assert p.solution().endswith(f"The answer is {value}.")
    counts = Counter(len(p.steps) for p in problems)
    # Steps are drawn evenly from 1..5 (a problem stops early only when 0 or 1 is left).
    assert all(counts[k] > 400 / 5 * 0.6 for k in range(1, 6)), counts


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="min_steps"):
        arith.generate(3, seed=0, min_steps=4, max_steps=2)
    with pytest.raises(ValueError, match="count"):
        arith.generate(-1, seed=0)
    with pytest.raises(ValueError, match="wrong_share"):
        arith.stepwise_rows(arith.generate(2, seed=0), seed=0, wrong_share=1.5)


def test_step_labels_are_one_until_the_first_wrong_step() -> None:
    problems = arith.generate(200, seed=5)
    rows = arith.stepwise_rows(problems, seed=1, wrong_share=0.5)
    gold = {p.question: p.answer for p in problems}
    slipped = 0
    for row in rows:
        steps, labels = row["completions"], row["labels"]
        assert len(steps) == len(labels) and all(x in (0.0, 1.0) for x in labels)
        # The first step whose arithmetic is wrong, by exact recomputation.
        wrong = next(
            (k for k, s in enumerate(steps[:-1]) if _exact(*_parts(s)[:3]) != _parts(s)[3]),
            None,
        )
        final = int(re.search(r"(-?\d+)\.$", steps[-1]).group(1))  # type: ignore[union-attr]
        if wrong is None:
            assert labels == [1.0] * len(steps)
            assert final == gold[row["prompt"]]
        else:
            slipped += 1
            assert labels == [1.0] * wrong + [0.0] * (len(steps) - wrong)
            assert final != gold[row["prompt"]]
    assert 60 <= slipped <= 140, slipped


def _parts(step: str) -> tuple[int, str, int, int]:
    m = STEP.match(step)
    assert m, step
    return int(m[1]), m[2], int(m[3]), int(m[4])


def test_the_written_set_is_an_eval_data_set(tmp_path: Path) -> None:
    """``problems`` writes JSONL that ``peftscale eval --dataset FILE`` reads and grades: the worked
    solution's final line is graded right, another number wrong."""
    out = tmp_path / "arith-test.jsonl"
    arith.main(["problems", "--count", "20", "--seed", "1000", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    task = load_task(str(out))
    assert [q.question for q in task.questions] == [r["question"] for r in rows]
    for q, r in zip(task.questions, rows, strict=True):
        assert task.grade(r["solution"], q.gold).correct
        assert not task.grade(f"The answer is {r['answer'] + 1}.", q.gold).correct
    steps = tmp_path / "steps.jsonl"
    arith.main(["rows", "--count", "10", "--seed", "1", "--out", str(steps)])
    assert all(set(json.loads(x)) == {"prompt", "completions", "labels"} for x in steps.read_text().splitlines())
    with pytest.raises(SystemExit):
        arith.main(["rows", "--count", "10", "--seed", "1", "--wrong-share", "2", "--out", str(steps)])
