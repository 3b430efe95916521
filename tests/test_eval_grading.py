"""Grading, statistics and strategy specs of peftscale.eval (no model needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from peftscale import InvalidArgument, strategies
from peftscale.eval import grading, specs, stats
from peftscale.eval.datasets import PACKAGED_DATA as DATA
from peftscale.eval.datasets import load_task, parse_fields, parse_slice
from peftscale.train.data import read_jsonl

# ------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    ("reply", "gold", "prediction", "correct"),
    [
        ("She pays 5 * 250 = $1,250 in all.", "1250", "1250", True),
        ("The total is 1,250,000 dollars.", "1250000", "1250000", True),
        ("It drops by 7, so the change is -7.", "-7", "-7", True),
        ("Each costs $2.50.", "2.5", "2.5", True),
        ("So the answer is 18.00", "18", "18", True),
        ("He walks 3 km, then 4 km: 7 km.", "7", "7", True),
        ("#### 42\nI hope this helps in 2024.", "42", "2024", False),  # the last number counts
        ("3.5 hours, so 210 minutes.", "210", "210", True),
        ("No number here.", "3", None, False),
        ("The answer is 12.", "120", "12", False),
        ("She ends with 0.75 of the cake", "3/4", "0.75", True),
        ("A 50% discount", "50", "50", True),
    ],
)
def test_gsm8k_grading(reply: str, gold: str, prediction: str | None, correct: bool) -> None:
    g = grading.grade_gsm8k(reply, gold)
    assert g.prediction == prediction
    assert g.correct is correct


def test_gsm8k_gold_needs_the_marker() -> None:
    assert grading.gsm8k_gold("steps\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        grading.gsm8k_gold("no marker")


# ------------------------------------------------------------------ MATH


@pytest.mark.parametrize(
    ("reply", "gold", "correct"),
    [
        ("so $\\boxed{\\dfrac{1}{2}}$.", "\\frac12", True),
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("\\boxed{3/4}", "\\frac{3}{4}", True),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("The angle is \\boxed{90^\\circ}", "90", True),
        ("\\boxed{x = 5}", "5", True),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("\\boxed{11\\sqrt2}", "11\\sqrt{2}", True),
        ("\\boxed{\\$12.50}", "12.5", True),
        ("\\boxed{2.50}", "\\frac{5}{2}", True),
        ("\\boxed{\\frac{1}{3}}", "0.33", False),
        ("\\boxed{6 - 5i}", "6+5i", False),
        ("\\boxed{2m}", "2", False),  # a variable is not a unit
        ("\\boxed{12 \\text{ cm}}", "12", True),
        ("first \\boxed{1} then \\boxed{2}", "2", True),
        ("nested \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
        ("The answer is 42.", "42", True),
        ("no answer", "42", False),
    ],
)
def test_math_grading(reply: str, gold: str, correct: bool) -> None:
    assert grading.grade_math(reply, gold).correct is correct


def test_boxed_extraction_balances_braces() -> None:
    assert grading.extract_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert grading.extract_boxed("\\boxed{unclosed") is None
    assert grading.extract_boxed("nothing") is None


def test_every_math500_solution_grades_correct_against_its_answer() -> None:
    """The data set's own worked solutions are the oracle: each ends in a boxed answer that the
    grader must accept, and each must be rejected against another question's answer."""
    rows = read_jsonl(DATA / "math500" / "test.jsonl", ValueError)
    wrong = [r["unique_id"] for r in rows if not grading.grade_math(r["solution"], r["answer"]).correct]
    assert not wrong
    distinct = [(a, b) for a, b in zip(rows, rows[1:], strict=False) if a["answer"] != b["answer"]]
    accepted = [a["unique_id"] for a, b in distinct if grading.grade_math(a["solution"], b["answer"]).correct]
    # Different gold spellings of the same value would be right to accept; none are neighbours here.
    assert len(accepted) <= 2, accepted


def test_every_gsm8k_worked_answer_grades_correct() -> None:
    task = load_task("gsm8k", DATA)
    assert len(task.questions) == 1319
    for q in task.questions:
        steps = q.solution.rpartition("####")[0] + "The answer is " + q.gold + "."
        assert grading.grade_gsm8k(steps, q.gold).correct, q.id


# ------------------------------------------------------------------ Game of 24


@pytest.mark.parametrize(
    ("expression", "puzzle", "correct"),
    [
        ("(10 - 4) * (13 - 9) = 24", "4 9 10 13", True),
        ("(13 - 9) * (10 - 4)", "4 9 10 13", True),
        ("8 / (3 - 8 / 3) = 24", "3 3 8 8", True),  # needs exact fractions
        ("4 × 6 × 1 × 1 = 24", "1 1 4 6", True),
        ("4 * 6 * 1 = 24", "1 1 4 6", False),  # skips a 1
        ("4 * 6 * 1 * 1 * 1 = 24", "1 1 4 6", False),  # uses a 1 twice
        ("(6 - 6) * 4 + 24", "1 1 4 6", False),  # numbers not in the puzzle
        ("4 * 6 / (1 - 1) = 24", "1 1 4 6", False),  # divides by zero
        ("-(1 - 25)", "1 25", False),  # unary minus is not an operation of the game
        ("(10 - 4) * (13 - 9) = 25", "4 9 10 13", True),  # the right side is not graded
        ("(10 + 4) * (13 - 9)", "4 9 10 13", False),  # 56
        ("2 ** 3 * 3", "2 3 3", False),  # powers are not allowed
        ("4 * 6.0 * 1 * 1", "1 1 4 6", False),  # decimals are not puzzle numbers
        ("", "1 1 4 6", False),
        ("import os", "1 1 4 6", False),
    ],
)
def test_game24_checker(expression: str, puzzle: str, correct: bool) -> None:
    assert grading.check_game24(expression, puzzle) is correct


def test_game24_extraction() -> None:
    reply = "4 + 8 = 12 (left: 6 12)\n12 * 2 = 24 (left: 24)\nAnswer: (4 + 8) * 2 = 24"
    assert grading.extract_game24(reply) == "(4 + 8) * 2 = 24"
    assert grading.grade_game24(reply, "2 4 8").correct
    assert grading.extract_game24("steps\n(4 + 8) * 2 = 24\n") == "(4 + 8) * 2 = 24"
    assert grading.extract_game24("no answer") is None
    # Words before the arithmetic are dropped; a step line ("... (left: 24)") is not an answer.
    assert grading.extract_game24("So we get (4 + 8) * 2 = 24.") == "(4 + 8) * 2 = 24"
    assert grading.extract_game24("4 + 8 = 12 (left: 2 12)\n12 * 2 = 24 (left: 24)") is None
    assert not grading.grade_game24("Sum them: 4 + 5 + 6 + 10 = 24", "4 5 6 10").correct


# ------------------------------------------------------------------ statistics


def test_wilson_interval_known_values() -> None:
    z = 1.959964
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(z * z / (10 + z * z))
    low, high = stats.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + z * z))
    # Symmetric in right and wrong.
    a, b = stats.wilson_interval(30, 100), stats.wilson_interval(70, 100)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])
    assert a[0] < 0.3 < a[1]


def test_mcnemar_is_the_exact_binomial_test() -> None:
    # 5 discordant pairs all one way: p = 2 * 0.5**5.
    a, b = [True] * 5 + [False] * 20, [False] * 5 + [False] * 20
    assert stats.mcnemar_p(a, b) == pytest.approx(2 / 32)
    # 3 vs 7 discordant: 2 * P(X <= 3), X ~ Bin(10, 1/2).
    a = [True] * 3 + [False] * 7
    b = [False] * 3 + [True] * 7
    assert stats.mcnemar_p(a, b) == pytest.approx(2 * sum(math.comb(10, i) for i in range(4)) / 1024)
    assert stats.mcnemar_p([True, False], [True, False]) == 1.0


def test_paired_difference() -> None:
    a = [False] * 50 + [True] * 50
    b = [True] * 10 + [False] * 40 + [True] * 50  # b also gets 10 of a's misses
    d = stats.paired_difference(a, b)
    assert d.difference == pytest.approx(0.10)
    assert d.only_a == 0 and d.only_b == 10 and d.questions == 100
    assert 0.0 < d.low < 0.10 < d.high < 0.2
    same = stats.paired_difference(a, a)
    assert same.low == same.high == same.difference == 0.0
    with pytest.raises(ValueError):
        stats.paired_difference([True], [True, False])


# ------------------------------------------------------------------ strategy specs and data


def test_specs_expand_budgets_and_scorers() -> None:
    parsed = specs.parse_specs("base:greedy,greedy,cold,sc@1..16,bon@8+cold,tot@1:3,adaptive@512", has_adapter=True)
    labels = [s.label for s in parsed]
    assert labels == [
        "base:greedy",
        "greedy",
        "cold",
        "sc@1",
        "sc@2",
        "sc@4",
        "sc@8",
        "sc@16",
        "bon@8+cold",
        "tot@1",
        "tot@2",
        "tot@3",
        "adaptive@512",
    ]
    by = {s.label: s for s in parsed}
    assert not by["base:greedy"].uses_adapter and by["greedy"].uses_adapter
    assert isinstance(by["sc@16"].strategy, strategies.SelfConsistency) and by["sc@16"].strategy.n == 16
    assert by["sc@16"].strategy.scorer is None
    assert isinstance(by["bon@8+cold"].strategy.scorer, strategies.CoLD)
    assert by["tot@2"].strategy.breadth == 2
    assert by["adaptive@512"].per_group
    assert specs.parse_specs("sc@3..20")[0].budget == 4  # powers of two within 3..20: 4, 8, 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("warp@2", "unknown strategy"),
        ("greedy@2", "takes no budget"),
        ("sc@0", "budget"),
        ("sc@8..2", "budget"),
        ("sc@x", "budget"),
        ("cold", "needs an adapter"),
        ("sc@4+cold", "needs an adapter"),
        ("sc@4+beam", "scorer suffix"),
        ("", "no strategies"),
    ],
)
def test_bad_specs_are_named(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        specs.parse_specs(text)


def test_overrides_reach_every_budget_and_unknown_fields_are_named() -> None:
    from peftscale.cli import _overrides

    parsed = specs.parse_specs("tot@1:2,sc@4", overrides=_overrides(["tot.depth=3", "sc.vote=weighted"]))
    assert [s.strategy.depth for s in parsed[:2]] == [3, 3] and parsed[2].strategy.vote == "weighted"
    with pytest.raises(InvalidArgument, match="not one of its fields"):
        specs.parse_specs("tot@1", overrides={"tot": {"deep": 3}})
    with pytest.raises(InvalidArgument, match="unknown strategies"):
        specs.parse_specs("tot@1", overrides={"tree": {"depth": 3}})
    with pytest.raises(InvalidArgument, match="FAMILY.FIELD=VALUE"):
        _overrides(["depth=3"])


def test_slices_and_fields() -> None:
    assert parse_slice("200:500", 1319) == range(200, 500)
    assert parse_slice(":3", 10) == range(0, 3)
    assert parse_slice(None, 4) == range(4)
    for bad in ("5:2", "0:2000", "a:b", "7"):
        with pytest.raises(InvalidArgument, match="slice"):
            parse_slice(bad, 1319)
    assert parse_fields("question=q,answer=a") == {"question": "q", "answer": "a"}
    with pytest.raises(InvalidArgument, match="unknown field"):
        parse_fields("prompt=q")


def test_user_jsonl_with_a_field_map(tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text('{"q": "What is 2+2?", "a": 4}\n{"q": "And 3+3?", "a": "#### 6"}\n')
    task = load_task(str(data), fields="question=q,answer=a")
    assert [(q.question, q.gold) for q in task.questions] == [("What is 2+2?", "4"), ("And 3+3?", "6")]
    with pytest.raises(InvalidArgument, match="no field 'question'"):
        load_task(str(data))
    with pytest.raises(InvalidArgument, match="unknown dataset"):
        load_task("nope")


def test_summary_compares_adaptive_with_each_sweep_at_equal_accuracy() -> None:
    from peftscale.eval.report import summarize

    def rec(strategy: str, budget: int | None, i: int, correct: bool, flops: float) -> dict:
        family = strategy.split("@")[0]
        return dict(strategy=strategy, family=family, budget=budget, id=str(i), correct=correct, tokens=10,
                    flops=flops, seconds=1.0)  # fmt: skip

    records = []
    for i in range(100):
        records += [
            rec("greedy", None, i, i < 10, 1e9),
            rec("sc@1", 1, i, i < 10, 1e9),
            rec("sc@4", 4, i, i < 20, 4e9),
            rec("sc@16", 16, i, i < 30, 16e9),
            rec("adaptive@512", 512, i, i < 25, 3e9),
            rec("adaptive@4096", 4096, i, i < 40, 30e9),
        ]
    labels = ["greedy", "sc@1", "sc@4", "sc@16", "adaptive@512", "adaptive@4096"]
    s = summarize(records, [str(i) for i in range(100)], labels)
    first, second = s["equal_accuracy"]
    # 25% lies halfway between sc@4 (20%, 4 GFLOPs) and sc@16 (30%, 16 GFLOPs): 8 GFLOPs in log space.
    assert first["against"] == "sc" and first["their_flops_at_that_accuracy"] == pytest.approx(8e9)
    assert first["ratio"] == pytest.approx(8 / 3)
    assert second["their_flops_at_that_accuracy"] is None and second["ratio"] is None  # sc never reaches 40%
    by = {r["strategy"]: r for r in s["strategies"]}
    assert by["sc@16"]["accuracy"] == 0.3 and by["sc@16"]["flops_per_question"] == 16e9
    (cmp,) = [c for c in s["comparisons"] if c["strategy"] == "sc@16"]
    assert cmp["reference"] == "greedy" and cmp["difference"] == pytest.approx(0.2) and cmp["only_b"] == 20


def test_gsm8k_searches_go_deep_enough_for_a_solution_and_the_user_overrides_win() -> None:
    from peftscale.eval.runner import EvalConfig, _task_overrides

    def tot_with(user: dict) -> strategies.TreeOfThought:
        config = EvalConfig(dataset="gsm8k", strategies="tot@1", overrides={"tot": user})
        merged = _task_overrides(load_task("gsm8k", DATA), config, None)  # type: ignore[arg-type]
        tot = specs.parse_specs("tot@1", overrides=merged)[0].strategy
        assert isinstance(tot, strategies.TreeOfThought)
        return tot

    tot = tot_with({"breadth": 2})
    assert tot.breadth == 2
    train = [q.solution or "" for q in load_task("gsm8k", DATA, shots=7473).shots]
    lines = sorted(len(s.strip().split("\n")) for s in train)
    assert lines[int(0.95 * len(lines))] <= tot.depth < lines[-1]
    assert tot_with({"depth": 3}).depth == 3


@pytest.mark.parametrize(
    ("line", "problem"),
    [('{"question": "q", "answer": "1"', "not JSON"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_a_malformed_jsonl_line_is_named_in_eval_and_in_training(tmp_path: Path, line: str, problem: str) -> None:
    from peftscale.train.config import ConfigError, DataConfig
    from peftscale.train.data import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n' + line + "\n")
    with pytest.raises(InvalidArgument, match=f"invalid argument: {path}:3: {problem}"):
        load_task(str(path))
    with pytest.raises(ConfigError, match=f"{path}:3: {problem}"):
        read_rows(DataConfig(path=str(path), format="gsm8k"))
    # A limit stops before the bad line.
    assert read_rows(DataConfig(path=str(path), format="gsm8k", limit=1)) == [{"question": "q", "answer": "1"}]


@pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="no development copy of the data sets (../shared/data) to compare with"
)
def test_the_shipped_data_sets_are_the_development_copies() -> None:
    for name in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "math500/test.jsonl"):
        assert read_jsonl(DATA / name, ValueError) == read_jsonl(SHARED_DATA / name, ValueError), name
    assert (DATA / "game24" / "24.csv").read_bytes() == (SHARED_DATA / "game24" / "24.csv").read_bytes()
