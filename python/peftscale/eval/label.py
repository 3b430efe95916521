"""Step labels from the engine's own rollouts, as Math-Shepherd makes them, for training verifiers.

For each question the policy (the base model, or it with an adapter) writes ``solutions`` sampled
solutions; each is split into steps at ``delimiter``. From every step prefix the engine samples ``n``
completions (all prefixes of a solution in one batched call); a step's soft label is the share of
its completions that reach the gold answer, its hard label whether any does. The last step is
labelled by the solution's own answer. Where the task has an exact oracle for its steps (Game of 24:
the solver), ``label="exact"`` labels the policy's solutions by it instead, with no rollouts. Rows
are written as each question finishes, in the stepwise format ``peftscale train`` reads
(``prompt``, ``completions``, ``labels``) plus ``id``, ``correct`` and (from rollouts) ``soft`` and
``hard``; rerunning into the same file skips the questions already done.

    peftscale label --dataset runs/arith-train.jsonl --slice 0:200 --n 8 --out runs/arith-rollout-labels.jsonl
    peftscale label --dataset game24 --slice 900:1000 --adapter runs/game24-lora --solutions 8 --label exact \
        --out runs/game24-policy-labels.jsonl
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftscale.errors import InvalidArgument
from peftscale.eval.prompts import build_prompt, question_turn
from peftscale.strategies import Sampling

if TYPE_CHECKING:
    from peftscale.engine import Engine
    from peftscale.eval.datasets import Question, Task

__all__ = ["LabelSettings", "label_question", "label_questions", "split_steps", "step_labels"]


@dataclass(frozen=True)
class LabelSettings:
    #: Completions sampled from each step prefix.
    n: int = 8
    #: Solutions the policy writes per question (each labelled on its own).
    solutions: int = 1
    temperature: float = 0.8
    top_k: int = 50
    #: Where a solution splits into steps.
    delimiter: str = "\n"
    max_new_tokens: int = 256
    #: Which label goes into ``labels``: the share of completions that are right, whether any is,
    #: or the task's exact step oracle (no rollouts).
    label: Literal["soft", "hard", "exact"] = "soft"
    seed: int = 0

    def check(self) -> None:
        for name in ("n", "solutions", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"invalid argument: {name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise InvalidArgument(f"invalid argument: rollouts sample: temperature must be > 0, got {self.temperature}")
        if not self.delimiter:
            raise InvalidArgument("invalid argument: the step delimiter must not be empty")
        if self.label not in ("soft", "hard", "exact"):
            raise InvalidArgument(f"invalid argument: label must be 'soft', 'hard' or 'exact', got {self.label!r}")


def split_steps(text: str, delimiter: str) -> list[str]:
    """The non-empty steps of ``text`` (each stripped of surrounding spaces)."""
    return [s.strip() for s in text.split(delimiter) if s.strip()]


def step_labels(outcomes: Sequence[Sequence[bool]]) -> tuple[list[float], list[float]]:
    """Soft (share right) and hard (any right) labels from each step's completion outcomes."""
    soft = [sum(o) / len(o) for o in outcomes]
    hard = [1.0 if any(o) else 0.0 for o in outcomes]
    return soft, hard


def _seed(base: int, *parts: object) -> int:
    return zlib.crc32("/".join(map(str, (base, *parts))).encode())


def label_question(
    engine: Engine, task: Task, question: Question, settings: LabelSettings, adapter: str | None = None
) -> list[dict[str, Any]]:
    """The labelled rows of one question, one per sampled solution with at least one step."""
    oracle = task.step_oracle if settings.label == "exact" else None
    if settings.label == "exact" and oracle is None:
        raise InvalidArgument(
            f"invalid argument: the task '{task.name}' has no exact step oracle; label with rollouts (soft or hard)"
        )
    prompt = build_prompt(engine, task, question)
    strategy = Sampling(temperature=settings.temperature, top_k=settings.top_k, seed=_seed(settings.seed, question.id))
    solutions = engine.generate(
        [prompt] * settings.solutions, max_new_tokens=settings.max_new_tokens, strategy=strategy, adapter=adapter
    )
    rows = []
    for k, solution in enumerate(solutions):
        steps = split_steps(solution.text, settings.delimiter)
        if not steps:
            continue
        correct = task.grade(solution.text, question.gold).correct
        row: dict[str, Any] = {
            "id": question.id,
            # What the verifier sees as the prompt: the user turn as the policy saw it.
            "prompt": question_turn(task, question.question),
            "completions": steps,
        }
        if oracle is not None:
            rows.append({**row, "labels": oracle(steps, question.gold), "correct": correct})
            continue
        d = settings.delimiter
        heads = [d.join(steps[: i + 1]) + d for i in range(len(steps) - 1)]
        outcomes: list[list[bool]] = []
        if heads:
            rollout = Sampling(
                temperature=settings.temperature, top_k=settings.top_k, seed=_seed(settings.seed, question.id, k)
            )
            outs = engine.generate(
                [prompt + h for h in heads for _ in range(settings.n)],
                max_new_tokens=settings.max_new_tokens,
                strategy=rollout,
                adapter=adapter,
            )
            for i, head in enumerate(heads):
                texts = [head + o.text for o in outs[i * settings.n : (i + 1) * settings.n]]
                outcomes.append([task.grade(t, question.gold).correct for t in texts])
        outcomes.append([correct])
        soft, hard = step_labels(outcomes)
        labels = hard if settings.label == "hard" else soft
        rows.append({**row, "labels": labels, "soft": soft, "hard": hard, "correct": correct})
    return rows


def label_questions(
    engine: Engine,
    task: Task,
    questions: Iterable[Question],
    settings: LabelSettings,
    out: str | Path,
    adapter: str | None = None,
    progress: Callable[[list[Question]], Iterable[Question]] | None = None,
) -> Path:
    """Labels every question not yet done into ``out`` (JSONL, appended as each question finishes).
    The ids of finished questions, those whose solutions had no step included, are kept beside it
    in ``out.done``, so that a rerun continues where an interrupted one stopped."""
    settings.check()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ledger = out.with_name(out.name + ".done")
    done = set(ledger.read_text(encoding="utf-8").split("\n")) if ledger.exists() else set()
    todo = [q for q in questions if q.id not in done]
    with out.open("a", encoding="utf-8") as f, ledger.open("a", encoding="utf-8") as finished:
        for q in progress(todo) if progress else todo:
            for row in label_question(engine, task, q, settings, adapter):
                f.write(json.dumps(row) + "\n")
            f.flush()
            finished.write(q.id + "\n")
            finished.flush()
    return out
