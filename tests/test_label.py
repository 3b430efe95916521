"""Step labels from rollouts (Math-Shepherd): the labels against a hand-computed case, and a run on
the packaged model that writes trainable rows and resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import peftscale as ps
import pytest
from peftscale.eval import arith
from peftscale.eval.datasets import Question, load_task
from peftscale.eval.label import LabelSettings, label_question, label_questions, split_steps, step_labels


@dataclass
class _Out:
    text: str


class _Scripted:
    """An engine whose replies are scripted per prompt ending: the labelling arithmetic, checked by
    hand, without sampling noise."""

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies = replies
        self.calls: list[list[str]] = []

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "<user>" + messages[-1]["content"] + "<assistant>"

    def generate(self, prompts: list[str], **kw: object) -> list[_Out]:
        self.calls.append(list(prompts))
        out, used = [], {}
        for p in prompts:
            key = next(k for k in self.replies if p.endswith(k))
            i = used.get(key, 0)
            used[key] = i + 1
            out.append(_Out(self.replies[key][i]))
        return out


def test_labels_are_the_share_and_the_any_of_right_completions(tmp_path: Path) -> None:
    q = Question(id="q0", question="Ann has 2 pens and gets 3 more, then doubles them. How many?", gold="10")
    task = load_task(str(arith_file(tmp_path)))
    replies = {
        # The policy's solution: right first step, wrong second, wrong answer.
        "<assistant>": ["2 + 3 = 5\n5 * 2 = 12\nThe answer is 12."],
        # From the first step: 3 of 4 completions reach 10.
        "2 + 3 = 5\n": ["5 * 2 = 10\nThe answer is 10.", "5 * 2 = 10. 10", "5 * 2 = 11\nThe answer is 11.", "So 10."],
        # From the wrong second step: none does.
        "5 * 2 = 12\n": ["The answer is 12.", "12", "12 + 0 = 12", "The answer is 13."],
    }
    engine = _Scripted(replies)
    rows = label_question(engine, task, q, LabelSettings(n=4, delimiter="\n"))  # type: ignore[arg-type]
    assert len(rows) == 1
    row = rows[0]
    assert row["completions"] == ["2 + 3 = 5", "5 * 2 = 12", "The answer is 12."]
    assert row["soft"] == [0.75, 0.0, 0.0]
    assert row["hard"] == [1.0, 0.0, 0.0]
    assert row["labels"] == row["soft"] and row["correct"] is False
    # Both prefixes' rollouts go in one batched call after the solution's.
    assert [len(c) for c in engine.calls] == [1, 8]
    hard = label_question(engine.__class__(replies), task, q, LabelSettings(n=4, label="hard"))  # type: ignore[arg-type]
    assert hard[0]["labels"] == [1.0, 0.0, 0.0]


def arith_file(tmp_path: Path) -> Path:
    out = tmp_path / "arith.jsonl"
    arith.main(["problems", "--count", "3", "--seed", "1000", "--out", str(out)])
    return out


def test_helpers_and_bad_settings() -> None:
    assert split_steps(" a \n\n b\n", "\n") == ["a", "b"]
    assert step_labels([[True, False], [False, False], [True]]) == ([0.5, 0.0, 1.0], [1.0, 0.0, 1.0])
    for bad, message in (
        (LabelSettings(n=0), "n must be >= 1"),
        (LabelSettings(temperature=0.0), "temperature must be > 0"),
        (LabelSettings(delimiter=""), "delimiter must not be empty"),
    ):
        with pytest.raises(ps.InvalidArgument, match=message):
            bad.check()


def test_rollout_labels_on_the_packaged_model_train_and_resume(smollm2_path: Path, tmp_path: Path) -> None:
    task = load_task(str(arith_file(tmp_path)))
    eng = ps.Engine.load(smollm2_path)
    out = tmp_path / "labels.jsonl"
    settings = LabelSettings(n=2, max_new_tokens=40, delimiter="\n")
    label_questions(eng, task, task.questions[:2], settings, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in rows} <= {q.id for q in task.questions[:2]}
    for r in rows:
        assert len(r["completions"]) == len(r["labels"]) >= 1
        assert all(x in (0.0, 0.5, 1.0) for x in r["soft"])
        assert r["hard"] == [1.0 if x > 0 else 0.0 for x in r["soft"]]
        assert r["soft"][-1] == (1.0 if r["correct"] else 0.0)
    done = (tmp_path / "labels.jsonl.done").read_text().split()
    assert done == [q.id for q in task.questions[:2]]
    # A rerun over more questions labels only the new one.
    label_questions(eng, task, task.questions[:3], settings, out)
    assert (tmp_path / "labels.jsonl.done").read_text().split() == [q.id for q in task.questions[:3]]
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[: len(rows)] == rows and {r["id"] for r in again[len(rows) :]} <= {task.questions[2].id}


def test_exact_labels_come_from_the_tasks_oracle_without_rollouts() -> None:
    """Game of 24's solver labels the policy's own solutions: no rollouts, and a task without an
    oracle is refused by name."""
    task = load_task("game24")
    q = Question(id="g", question="4 9 10 13", gold="4 9 10 13")
    reply = "9 + 10 = 19 (left: 4 13 19)\n19 - 13 = 7 (left: 4 7)\n4 * 7 = 28 (left: 28)\nAnswer: 4 * 6 = 24"
    engine = _Scripted({"<assistant>": [reply, "9 + 10 = 19 (left: 4 13 19)\n19 - 13 = 6 (left: 4 6)"]})
    rows = label_question(engine, task, q, LabelSettings(solutions=2, label="exact"))  # type: ignore[arg-type]
    assert [len(c) for c in engine.calls] == [2]  # the solutions only
    assert rows[0]["labels"] == [1.0, 0.0, 0.0, 0.0] and rows[0]["correct"] is False
    assert rows[1]["labels"] == [1.0, 1.0]
    assert rows[0]["prompt"] == task.template.replace("{question}", q.question)
    with pytest.raises(ps.InvalidArgument, match="no exact step oracle"):
        label_question(engine, load_task("gsm8k"), q, LabelSettings(label="exact"))  # type: ignore[arg-type]
