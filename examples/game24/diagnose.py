"""Where a Game of 24 adapter goes wrong, on the test puzzles 900-999:

- how often its greedy value judgement ends on the solver's label, and how often it redoes the
  last step right, per kind of state (states built from the test puzzles the way training rows
  are, so never trained on);
- per strategy of an evaluation, how many steps have wrong arithmetic or bookkeeping (the numbers
  left must be those before, less the two used, plus the result), and how many answers rest on one.

    python examples/game24/diagnose.py --adapter runs/game24-lora --records runs/eval-game24/results.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import peftscale as ps
from peftscale.eval import game24
from peftscale.eval.datasets import default_data_dir

OPS = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "/": Fraction.__truediv__}


def _state(row: dict) -> list[str]:
    user = row["messages"][0]["content"]
    return user.split("Steps so far:\n")[1].split("\nCan the numbers")[0].splitlines()


def _kind(state: list[str], reply: str) -> str:
    last, label = state[-1], game24.verdict(reply)
    if last.startswith("Answer:"):
        return f"answer, {label}"
    a, op, b, _, c = last.split(" (left: ")[0].split()
    if OPS[op](Fraction(a), Fraction(b)) != Fraction(c):
        return "wrong arithmetic, impossible"
    if reply.split("; ")[0] != last:
        return "wrong numbers left, impossible"
    return f"{len(last.split('(left: ')[1].rstrip(')').split())} left, {label}"


def judgements(adapter: str, puzzles: list[str]) -> None:
    rows = [r for r in game24.training_rows(puzzles, seed=12345) if "Steps so far:" in r["messages"][0]["content"]]
    engine = ps.Engine.load(ps.models.smollm2_135m_instruct(), dtype="auto")
    engine.load_adapter(adapter, name="game24")
    chats = [engine.apply_chat_template([r["messages"][0]]) for r in rows]
    outs = engine.generate(
        chats, max_new_tokens=game24.VALUE_MAX_TOKENS, strategy=ps.Greedy(), adapter="game24", stop=["\n"]
    )
    right: Counter[str] = Counter()
    redone: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for row, out in zip(rows, outs, strict=True):
        reply, text = row["messages"][1]["content"], out.text or ""
        label = game24.verdict(reply)
        kind = _kind(_state(row), reply)
        total[kind] += 1
        right[kind] += game24.verdict(text) == label
        redone[kind] += text.strip().split("; ")[0] == reply.split("; ")[0]
    print(f"value judgements: {sum(right.values())} of {sum(total.values())} right")
    for kind in sorted(total):
        print(f"  {kind}: {right[kind]} of {total[kind]} right, last step redone right in {redone[kind]}")


def _audit(puzzle: str, text: str) -> tuple[int, int, bool, bool]:
    """Steps, wrong steps, whether any is wrong, whether a wrong one leaves exactly 24."""
    numbers = sorted(Fraction(n) for n in puzzle.split())
    steps = wrong = 0
    false_24 = False
    for line in text.splitlines():
        if "(left:" not in line:
            continue
        steps += 1
        try:
            x, op, y, _, z = line.split(" (left: ")[0].split()
            a, b, c = Fraction(x), Fraction(y), Fraction(z)
            left = sorted(Fraction(n) for n in line.split("(left: ")[1].rstrip(")").split())
            pool = list(numbers)
            pool.remove(a)
            pool.remove(b)
            ok = OPS[op](a, b) == c and sorted([*pool, c]) == left
        except (ValueError, KeyError, ZeroDivisionError):
            ok, left = False, numbers
        if not ok:
            wrong += 1
            false_24 |= left == [24]
        numbers = left
    return steps, wrong, wrong > 0, false_24


def steps(records: Path) -> None:
    by: dict[str, Counter[str]] = {}
    for line in records.open(encoding="utf-8"):
        r = json.loads(line)
        s = by.setdefault(r["strategy"], Counter())
        n, wrong, any_wrong, false_24 = _audit(r["question"], r.get("text") or "")
        s.update(puzzles=1, right=int(r["correct"]), steps=n, wrong=wrong)
        s.update(on_wrong=int(any_wrong), false_24=int(false_24))
    print("| strategy | puzzles | right | steps | steps wrong | answers on a wrong step | on one falsely leaving 24 |")
    print("|---|---|---|---|---|---|---|")
    for name, s in by.items():
        share = s["wrong"] / max(1, s["steps"])
        print(
            f"| {name} | {s['puzzles']} | {s['right']} | {s['steps']} | {s['wrong']} ({share:.0%}) | "
            f"{s['on_wrong']} | {s['false_24']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="the Game of 24 LoRA folder (value judgements)")
    ap.add_argument("--records", type=Path, help="results.jsonl of a game24 evaluation (step audit)")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    data_dir = args.data_dir or default_data_dir()
    with open(data_dir / "game24" / "24.csv", encoding="utf-8", newline="") as f:
        puzzles = [row["Puzzles"] for row in csv.DictReader(f)]
    if args.adapter:
        judgements(args.adapter, [puzzles[i] for i in game24.TEST_RANGE])
    if args.records:
        steps(args.records)


if __name__ == "__main__":
    main()
