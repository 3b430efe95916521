"""The Game of 24 solver and training rows, checked against an independent brute force over
expression strings graded by the checker."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import pytest
from peftscale.eval import game24
from peftscale.eval.datasets import GAME24_TEMPLATE
from peftscale.eval.datasets import PACKAGED_DATA as DATA
from peftscale.eval.grading import check_game24


def _brute_force(puzzle: str) -> bool:
    """Any fully parenthesised expression over any order of the four numbers that the checker
    accepts: an oracle that shares no code with the solver."""
    nums = puzzle.split()
    shapes = ["(({a} {x} {b}) {y} {c}) {z} {d}", "({a} {x} ({b} {y} {c})) {z} {d}", "({a} {x} {b}) {y} ({c} {z} {d})",
              "{a} {x} (({b} {y} {c}) {z} {d})", "{a} {x} ({b} {y} ({c} {z} {d}))"]  # fmt: skip
    for a, b, c, d in set(itertools.permutations(nums)):
        for x, y, z in itertools.product("+-*/", repeat=3):
            for shape in shapes:
                if check_game24(shape.format(a=a, b=b, c=c, d=d, x=x, y=y, z=z), puzzle):
                    return True
    return False


@pytest.mark.parametrize("puzzle", ["4 9 10 13", "3 3 8 8", "1 1 1 1", "1 1 1 2", "1 5 5 5", "2 3 5 12", "1 1 2 7"])
def test_solver_agrees_with_brute_force(puzzle: str) -> None:
    found = game24.solutions(puzzle)
    assert bool(found) == _brute_force(puzzle) == game24.can_reach_24([int(n) for n in puzzle.split()])
    for steps, answer in found:
        assert check_game24(answer, puzzle), answer
        assert len(steps) == 3 and steps[-1].remaining == (Fraction(24),)
    assert len({a for _, a in found}) == len(found)


def test_step_format_and_value_labels() -> None:
    steps, answer = next((s, a) for s, a in game24.solutions("4 9 10 13") if "4 * ((9 + 10) - 13)" in a)
    assert [str(s) for s in steps] == [
        "9 + 10 = 19 (left: 4 13 19)",
        "19 - 13 = 6 (left: 4 6)",
        "4 * 6 = 24 (left: 24)",
    ]
    assert game24.value_label(steps[:1], "4 9 10 13") == "likely"
    assert game24.value_label(steps[:2], "4 9 10 13") == "sure"
    wrong = game24.Step(Fraction(4), "+", Fraction(9), Fraction(13), (Fraction(10), Fraction(13), Fraction(13)))
    assert game24.value_label([wrong], "4 9 10 13") == "impossible"
    assert game24.value_label(steps, "4 9 10 13", answer=answer) == "sure"
    assert game24.value_label(steps, "4 9 10 13", answer="4 * 9 - 10 - 13 = 24") == "impossible"
    assert game24.format_number(Fraction(8, 3)) == "8/3"


def _exact_label(lines: list[str]) -> str:
    """The judgement a partial solution deserves, worked out from its text alone: every step's
    arithmetic and bookkeeping checked, then whether the numbers left can make 24 (brute force),
    or for an answer line whether the checker accepts it for the puzzle the first step implies."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    numbers: list[Fraction] | None = None
    puzzle = ""
    for line in lines:
        if line.startswith("Answer:"):
            assert puzzle
            return "sure" if check_game24(line.removeprefix("Answer: "), puzzle) else "impossible"
        lhs, left = line.split(" (left: ")
        a, op, b, _, c = lhs.split()
        a, b, c = Fraction(a), Fraction(b), Fraction(c)
        after = sorted(Fraction(n) for n in left.rstrip(")").split())
        if numbers is None:  # the puzzle: the first step's operands and what it left besides its result
            rest = list(after)
            rest.remove(c)
            puzzle = " ".join(str(n) for n in sorted([a, b, *rest]))
            numbers = sorted([a, b, *rest])
        pool = list(numbers)
        for n in (a, b):
            if n not in pool:
                return "impossible"
            pool.remove(n)
        if ops[op](a, b) != c or sorted([*pool, c]) != after:
            return "impossible"
        numbers = after
    assert numbers is not None
    reachable = Fraction(24) in _values(numbers)
    return "impossible" if not reachable else "sure" if len(numbers) <= 2 else "likely"


def _values(numbers: list[Fraction]) -> set[Fraction]:
    """Every value an expression over all of ``numbers`` can take (exact arithmetic)."""
    if len(numbers) == 1:
        return {numbers[0]}
    out: set[Fraction] = set()
    for k in range(1, 2 ** len(numbers) - 1):  # every split into two non-empty groups
        left = [n for i, n in enumerate(numbers) if k >> i & 1]
        right = [n for i, n in enumerate(numbers) if not k >> i & 1]
        for x in _values(left):
            for y in _values(right):
                out |= {x + y, x - y, x * y} | ({x / y} if y else set())
    return out


def _exact_reply_parts(lines: list[str]) -> list[str]:
    """The reasoning a judgement should show before its verdict, worked out independently: the
    last step redone from the numbers the line before it left (for a first step, its claimed
    numbers less its result plus its operands), and for two numbers rightly left, their sum,
    product, difference and quotient that can be 24."""
    steps = [line for line in lines if not line.startswith("Answer:")]
    if not steps:
        return []

    def parse(line: str) -> tuple[Fraction, str, Fraction, Fraction, list[Fraction]]:
        lhs, left = line.split(" (left: ")
        a, op, b, _, c = lhs.split()
        return Fraction(a), op, Fraction(b), Fraction(c), sorted(Fraction(n) for n in left.rstrip(")").split())

    a, op, b, c, after = parse(steps[-1])
    if len(steps) > 1:
        pool = parse(steps[-2])[4]
    else:
        pool = list(after)
        if c in pool:
            pool.remove(c)
        pool += [a, b]
    for n in (a, b):
        if n not in pool:
            return [f"{n} is not left"]
        pool.remove(n)
    true = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
    left = sorted([*pool, true])
    redone = f"{a} {op} {b} = {true} (left: {' '.join(str(n) for n in left)})"
    if redone != steps[-1] or lines[-1].startswith("Answer:") or len(left) != 2:
        return [redone]
    x, y = left
    made = [f"{x} + {y} = {x + y}", f"{x} * {y} = {x * y}", f"{y} - {x} = {y - x}"]
    big, small = (x, y) if abs(x) >= abs(y) else (y, x)
    made += [f"{big} / {small} = {big / small}"] if small else []
    return [redone, ", ".join(made)]


def _judgement_rows(rows: list[dict]) -> list[tuple[list[str], str]]:
    return [
        (r["messages"][0]["content"].split("Steps so far:\n")[1].split("\nCan the numbers")[0].splitlines(),
         r["messages"][1]["content"])
        for r in rows
        if "Steps so far:" in r["messages"][0]["content"]
    ]  # fmt: skip


def test_training_rows_are_labelled_by_the_solver() -> None:
    puzzles = ["4 9 10 13", "3 3 8 8", "1 1 1 1", "2 3 5 12", "1 1 2 7", "1 2 4 10", "5 5 5 9"]
    rows = game24.training_rows(puzzles, traces_per_puzzle=2, seed=3)
    assert rows == game24.training_rows(puzzles, traces_per_puzzle=2, seed=3)
    labels = {"sure": 0, "likely": 0, "impossible": 0}
    for state, reply in _judgement_rows(rows):
        *parts, label = reply.split("; ")
        labels[label] += 1
        assert label == _exact_label(state) == game24.verdict(reply), state
        assert parts == _exact_reply_parts(state), state
    traces = 0
    for row in rows:
        user, reply = (m["content"] for m in row["messages"])
        if "Use the numbers" in user:
            traces += 1
            puzzle = user.split("Use the numbers ")[1].split(" and")[0]
            *steps, answer = reply.splitlines()
            assert len(steps) == 3 and check_game24(answer.removeprefix("Answer: "), puzzle)
            assert _exact_label([*steps, answer]) == "sure"
    assert labels["sure"] == labels["likely"] == labels["impossible"] > 0
    assert labels["sure"] <= traces // 2
    assert traces + sum(labels.values()) == len(rows)


def test_a_judgement_redoes_the_last_step() -> None:
    steps, _ = next((s, a) for s, a in game24.solutions("4 9 10 13") if "4 * ((9 + 10) - 13)" in a)
    assert game24.judgement(steps[:2], "4 9 10 13") == (
        "19 - 13 = 6 (left: 4 6); 4 + 6 = 10, 4 * 6 = 24, 6 - 4 = 2, 6 / 4 = 3/2; sure"
    )
    slip = game24.Step(Fraction(4), "*", Fraction(6), Fraction(24), (Fraction(13), Fraction(24)))
    assert game24.judgement([*steps[:2], slip], "4 9 10 13") == "4 * 6 = 24 (left: 24); impossible"
    absent = game24.Step(Fraction(13), "+", Fraction(6), Fraction(19), (Fraction(4), Fraction(19)))
    assert game24.judgement([*steps[:2], absent], "4 9 10 13") == "13 is not left; impossible"
    assert game24.verdict("sure; unsure, likely") == "likely"
    assert game24.verdict("unsure") is None


def test_judgements_include_the_searchs_failures() -> None:
    """Wrong arithmetic, wrong numbers left and answers built on a false step are judged
    impossible, so that the model's own value judgement can prune its slips."""
    rows = game24.training_rows([p for p in ["4 9 10 13", "2 3 5 12", "1 2 4 10", "3 4 10 10"] * 5], seed=1)
    impossible = [state for state, reply in _judgement_rows(rows) if reply.endswith("; impossible")]
    ops = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "/": Fraction.__truediv__}

    def miscalculated(line: str) -> bool:
        a, op, b, _, c = line.split(" (left: ")[0].split()
        return ops[op](Fraction(a), Fraction(b)) != Fraction(c)

    def misbooked(state: list[str]) -> bool:
        """The last step's arithmetic is right, but not the numbers it says are left."""
        if len(state) < 2 or state[-1].startswith("Answer:") or miscalculated(state[-1]):
            return False
        before, last = state[-2:]
        pool = [Fraction(n) for n in before.split("(left: ")[1].rstrip(")").split()]
        a, _, b, _, c = last.split(" (left: ")[0].split()
        for n in (a, b):
            if Fraction(n) in pool:
                pool.remove(Fraction(n))
        claimed = sorted(Fraction(n) for n in last.split("(left: ")[1].rstrip(")").split())
        return sorted([*pool, Fraction(c)]) != claimed

    assert any(s[-1].startswith("Answer:") for s in impossible)
    assert any(not s[-1].startswith("Answer:") and miscalculated(s[-1]) for s in impossible)
    assert any(misbooked(s) for s in impossible)
    assert any(all(not line.startswith("Answer:") and not miscalculated(line) for line in s) for s in impossible)


def test_the_data_command_never_trains_on_test_puzzles(tmp_path: Path) -> None:
    assert game24.main(["data", "--out", str(tmp_path), "--data-dir", str(DATA)]) == 0
    puzzles = (DATA / "game24" / "24.csv").read_text().splitlines()[1:]
    test = {line.split(",")[1] for line in puzzles[900:1000]}
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    prompts = [r["messages"][0]["content"] for r in rows if "Use the numbers" in r["messages"][0]["content"]]
    used = {p.split("Use the numbers ")[1].split(" and")[0] for p in prompts}
    assert used and not used & test
    # Every puzzle of the file is solvable (it lists solvable puzzles), so each training puzzle has a trace.
    assert len(used) == len(puzzles) - 100


def _exact_step_labels(puzzle: str, lines: list[str]) -> list[float]:
    """Labels worked out independently of the package: a line is 1 while every line up to it
    judges other than impossible (:func:`_exact_label`) and the first step starts from the puzzle."""
    labels, sound = [], True
    for k, line in enumerate(lines):
        if sound and k == 0 and not line.startswith("Answer:"):
            lhs, left = line.split(" (left: ")
            a, _, b, _, c = lhs.split()
            rest = sorted(Fraction(n) for n in left.rstrip(")").split())
            rest.remove(Fraction(c))
            sound = sorted([Fraction(a), Fraction(b), *rest]) == sorted(Fraction(n) for n in puzzle.split())
        sound = sound and _exact_label(lines[: k + 1]) != "impossible"
        labels.append(1.0 if sound else 0.0)
    return labels


def test_step_labels_of_a_hand_worked_reply() -> None:
    right = ["9 + 10 = 19 (left: 4 13 19)", "19 - 13 = 6 (left: 4 6)", "4 * 6 = 24 (left: 24)"]
    assert game24.step_labels("4 9 10 13", [*right, "Answer: 4 * ((9 + 10) - 13) = 24"]) == [1.0] * 4
    # An answer that uses a number twice, after sound steps.
    assert game24.step_labels("4 9 10 13", [*right, "Answer: 4 * 6 = 24"]) == [1.0, 1.0, 1.0, 0.0]
    # 4 + 6 = 10 leaves 10 alone: sound arithmetic, but 24 is out of reach.
    assert game24.step_labels("4 9 10 13", [*right[:2], "4 + 6 = 10 (left: 10)"]) == [1.0, 1.0, 0.0]
    # A slip in the arithmetic, then steps that happen to be right from the wrong number.
    slip = ["9 + 10 = 18 (left: 4 13 18)", "18 - 13 = 5 (left: 4 5)", "4 * 5 = 20 (left: 20)"]
    assert game24.step_labels("4 9 10 13", slip) == [0.0, 0.0, 0.0]
    # Numbers left wrongly booked: 13 kept after use.
    assert game24.step_labels("4 9 10 13", [right[0], "19 - 13 = 6 (left: 4 6 13)"]) == [1.0, 0.0]
    # A number that is not in the puzzle, and a line that is not a step.
    assert game24.step_labels("4 9 10 13", ["8 * 3 = 24 (left: 24)"]) == [0.0]
    assert game24.step_labels("4 9 10 13", ["Let me think.", *right]) == [0.0] * 4
    assert game24.parse_step("2/3 * 9 = 6 (left: 4 6)") == game24.Step(
        Fraction(2, 3), "*", Fraction(9), Fraction(6), (Fraction(4), Fraction(6))
    )


def test_verifier_rows_are_labelled_exactly() -> None:
    puzzles = ["4 9 10 13", "1 1 4 6", "3 3 8 8", "1 1 1 1", "2 3 5 12", "5 5 5 9"]
    rows = game24.verifier_rows(puzzles, seed=3, per_puzzle=10)
    assert len(rows) == 60
    kinds = {k: set() for k in game24.VERIFIER_KINDS}
    for row in rows:
        puzzle = row["prompt"].split("Use the numbers ")[1].split(" and")[0]
        assert row["prompt"] == GAME24_TEMPLATE.replace("{question}", puzzle)
        assert row["labels"] == _exact_step_labels(puzzle, row["completions"]), row
        kinds[row["kind"]] |= set(row["labels"])
    assert kinds["trace"] == {1.0}  # "1 1 1 1" has no solution: its replies are walks
    assert kinds["walk"] == kinds["turn"] == kinds["slip"] == kinds["false-finish"] == {0.0, 1.0}
    assert rows == game24.verifier_rows(puzzles, seed=3, per_puzzle=10)
    assert rows != game24.verifier_rows(puzzles, seed=4, per_puzzle=10)


def test_the_verifier_rows_command_keeps_train_and_test_puzzles_apart(tmp_path: Path) -> None:
    puzzles = (DATA / "game24" / "24.csv").read_text().splitlines()[1:]
    test = {line.split(",")[1] for line in puzzles[900:1000]}
    seen = {}
    for part in ("train", "test"):
        out = tmp_path / f"{part}.jsonl"
        args = ["verifier-rows", "--puzzles", part, "--per-puzzle", "1", "--out", str(out), "--data-dir", str(DATA)]
        assert game24.main(args) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        seen[part] = {r["prompt"].split("Use the numbers ")[1].split(" and")[0] for r in rows}
    assert seen["test"] == test
    assert len(seen["train"]) == len(puzzles) - 100 and not seen["train"] & test
