"""Evaluation data: GSM8K, MATH-500, Game of 24 and user JSONL, as :class:`Question` lists.

GSM8K, MATH-500 and Game of 24 ship with peftscale (``peftscale/data``, with their licences);
``data_dir`` or ``$PEFTSCALE_DATA`` reads another copy with the same layout.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftscale.errors import InvalidArgument
from peftscale.eval.grading import (
    Grade,
    check_game24,
    extract_game24,
    grade_game24,
    grade_gsm8k,
    grade_math,
    gsm8k_gold,
    judge_math,
    judge_number,
)
from peftscale.strategies import Extract
from peftscale.train.data import data_file, read_jsonl

if TYPE_CHECKING:
    from peftscale.engine import Engine

__all__ = ["Question", "Task", "default_data_dir", "load_task", "parse_fields", "parse_slice", "user_task"]


@dataclass(frozen=True)
class Question:
    #: Stable within its data set: the row index in its file (``"gsm8k/test:217"``).
    id: str
    question: str
    gold: str
    #: A worked solution, when the data set has one (the k-shot prompts use them).
    solution: str | None = None


@dataclass(frozen=True)
class Task:
    """A data set with its grader and the prompt format its questions want."""

    name: str
    questions: list[Question]
    #: ``(reply, gold)``: the answer read from a whole reply, and whether it is right.
    grade: Callable[[str, str], Grade]
    #: ``(answer, gold)``: whether an already extracted answer (a vote's winner) is right.
    judge: Callable[[str | None, str], bool]
    #: Worked examples for k-shot prompts (from the train split, never the evaluated rows).
    shots: list[Question] = field(default_factory=list)
    #: The user turn for a question (``{question}`` is replaced); replaceable per run. GSM8K's
    #: default is the bare question, as in training: the instruct model reasons step by step
    #: unasked, and on development rows 0-47 an added "Let's think step by step" (1/48 right)
    #: or a '####' answer format (0/48, 27 replies degenerating into '#' until the length cap)
    #: did worse than the bare question (2/48).
    template: str = "{question}"
    #: What the self-consistency, MCTS and adaptive votes extract from each path.
    extract: Extract = "last_number"
    #: Per-family keyword arguments the task's searches need, given the loaded engine and the
    #: adapter's name (``{"tot": {"depth": 4}}``).
    search: Callable[[Engine, str | None], dict[str, dict[str, Any]]] | None = None
    #: A user task's prompt builder: the question's whole user turn (replaces ``template``).
    prompt: Callable[[str], str] | None = None
    #: ``(steps, gold)``: exact labels of a reply's steps, where the task has an oracle for them
    #: (Game of 24's solver); ``peftscale label --label exact`` uses it instead of rollouts.
    step_oracle: Callable[[Sequence[str], str], list[float]] | None = None


def user_task(
    name: str,
    questions: Sequence[tuple[str, str]] | Sequence[Mapping[str, str]] | Sequence[Question],
    grader: Callable[[str, str], bool],
    *,
    prompt: Callable[[str], str] | None = None,
    extract: Extract = "last_number",
) -> Task:
    """A task of your own for :func:`peftscale.eval.run` (``dataset=user_task(...)``), no file needed.

    ``questions``: ``(question, gold)`` pairs, ``{"question", "answer"}`` mappings or
    :class:`Question` objects. ``grader(text, gold) -> bool`` decides whether a reply (or, for the
    voting strategies, the answer they voted for) is right. ``prompt(question) -> str`` builds the
    user turn (default: the bare question). ``extract`` reads the answer the voting strategies vote
    on and the one shown as the prediction (the rules of :func:`peftscale.extract_answer`, or a
    callable).

    >>> task = user_task("sums", [("What is 2 + 3?", "5")], lambda text, gold: gold in text)
    >>> task.grade("It is 5.", "5")
    Grade(prediction='5', correct=True)
    """
    from peftscale.answers import extract_answer

    items: list[Question] = []
    for i, q in enumerate(questions):
        if isinstance(q, Question):
            items.append(q)
        elif isinstance(q, Mapping):
            items.append(Question(id=f"{name}:{i}", question=str(q["question"]), gold=str(q["answer"])))
        else:
            text, gold = q
            items.append(Question(id=f"{name}:{i}", question=str(text), gold=str(gold)))
    if not items:
        raise InvalidArgument(f"invalid argument: task {name!r} has no questions")

    def read(text: str) -> str | None:
        return extract_answer(text, extract) if isinstance(extract, str) else extract(text)  # type: ignore[arg-type]

    def grade(text: str, gold: str) -> Grade:
        return Grade(read(text), bool(grader(text, gold)))

    def judge(answer: str | None, gold: str) -> bool:
        return answer is not None and bool(grader(answer, gold))

    grade.peftscale_fingerprint = lambda: _callable_fingerprint(grader)  # type: ignore[attr-defined]
    judge.peftscale_fingerprint = grade.peftscale_fingerprint  # type: ignore[attr-defined]
    return Task(name, items, grade, judge, extract=extract, prompt=prompt)


def _callable_fingerprint(f: Callable[..., object]) -> str | None:
    """What identifies a user's callable across runs: its ``peftscale_fingerprint()``, else for a
    plain function its code (bytecode, constants and the values it closes over), else ``None``."""
    import hashlib
    import types

    own = getattr(f, "peftscale_fingerprint", None)
    if callable(own):
        return str(own())
    if isinstance(f, types.FunctionType):
        code = f.__code__
        # Settings it closes over count by value; objects (state a grader keeps) by their type.
        plain = (str, int, float, bool, bytes, type(None), tuple, frozenset)
        cells = tuple(
            c.cell_contents if isinstance(c.cell_contents, plain) else type(c.cell_contents).__qualname__
            for c in f.__closure__ or ()
        )
        return hashlib.sha256(code.co_code + repr((code.co_consts, code.co_names, cells)).encode()).hexdigest()
    return None


PACKAGED_DATA = Path(__file__).resolve().parent.parent / "data"
"""The data sets shipped with peftscale (GSM8K, MATH-500, Game of 24; see its README)."""


def default_data_dir() -> Path:
    """``$PEFTSCALE_DATA`` if set, else the data sets shipped with peftscale."""
    env = os.environ.get("PEFTSCALE_DATA")
    return Path(env) if env else PACKAGED_DATA


def parse_slice(spec: str | None, total: int) -> range:
    """``"200:500"`` -> rows 200..499; ``":100"``, ``"900:"``, ``None`` (all). Checked against the
    data set's size."""
    if spec is None or spec.strip() in ("", ":"):
        return range(total)
    start_s, sep, end_s = spec.partition(":")
    if not sep:
        raise InvalidArgument(f"invalid argument: slice must look like 'a:b', got '{spec}'")
    try:
        start = int(start_s) if start_s.strip() else 0
        end = int(end_s) if end_s.strip() else total
    except ValueError:
        raise InvalidArgument(f"invalid argument: slice bounds must be integers, got '{spec}'") from None
    if not 0 <= start < end <= total:
        raise InvalidArgument(f"invalid argument: slice {spec} is empty or outside the data set's {total} rows")
    return range(start, end)


def parse_fields(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"question=q,answer=a"`` -> ``{"question": "q", "answer": "a"}`` (defaults: the same names)."""
    fields = {"question": "question", "answer": "answer"}
    if spec is None:
        return fields
    pairs = spec.items() if isinstance(spec, Mapping) else (p.split("=", 1) for p in spec.split(",") if p.strip())
    for pair in pairs:
        if len(pair) != 2:
            raise InvalidArgument(f"invalid argument: fields must look like 'question=q,answer=a', got '{spec}'")
        key, value = (s.strip() for s in pair)
        if key not in fields:
            raise InvalidArgument(f"invalid argument: unknown field '{key}' (known: question, answer)")
        fields[key] = value
    return fields


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not data_file(path).is_file():
        raise InvalidArgument(f"invalid argument: no data file at {path} (set --data-dir or PEFTSCALE_DATA)")
    return read_jsonl(path, lambda message: InvalidArgument(f"invalid argument: {message}"))


def _gsm8k(data_dir: Path, shots: int) -> Task:
    def load(split: str) -> list[Question]:
        rows = _read_jsonl(data_dir / "gsm8k" / f"{split}.jsonl")
        return [
            Question(
                id=f"gsm8k/{split}:{i}",
                question=r["question"],
                gold=gsm8k_gold(r["answer"]),
                solution=r["answer"],
            )
            for i, r in enumerate(rows)
        ]

    return Task(
        "gsm8k",
        load("test"),
        grade_gsm8k,
        judge_number,
        shots=load("train")[:shots] if shots else [],
        search=_gsm8k_search,
    )


def _gsm8k_search(engine: Engine, adapter: str | None) -> dict[str, dict[str, Any]]:
    """Searches deep enough for a whole solution: 98.6% of GSM8K's train solutions take at most
    eight lines, the ``#### answer`` line included (the strategies' defaults stop at four levels
    for Tree-of-Thought, Game of 24's three steps and an answer)."""
    return {"tot": {"depth": 8}, "mcts": {"max_depth": 8}}


def _math500(data_dir: Path, shots: int) -> Task:
    rows = _read_jsonl(data_dir / "math500" / "test.jsonl")
    questions = [
        Question(id=f"math500:{i}", question=r["problem"], gold=r["answer"], solution=r.get("solution"))
        for i, r in enumerate(rows)
    ]
    if shots:
        raise InvalidArgument("invalid argument: MATH-500 has no train split here; use shots=0")
    return Task(
        "math500",
        questions,
        grade_math,
        judge_math,
        template="{question}\n\nPut the final answer in \\boxed{}.",
        extract="boxed",
    )


def _game24_search(engine: Engine, adapter: str | None) -> dict[str, dict[str, Any]]:
    from peftscale.eval.game24 import search_settings

    return search_settings(engine, adapter)


def _game24_step_labels(steps: Sequence[str], puzzle: str) -> list[float]:
    from peftscale.eval.game24 import step_labels

    return step_labels(puzzle, steps)


def _judge_game24(expression: str | None, puzzle: str) -> bool:
    return expression is not None and check_game24(expression, puzzle)


GAME24_TEMPLATE = (
    "Use the numbers {question} and + - * / to make 24. Each number must be used exactly once. "
    "Combine two numbers per step, then end with 'Answer: <expression> = 24'."
)


def _game24(data_dir: Path, shots: int) -> Task:
    path = data_dir / "game24" / "24.csv"
    if not path.is_file():
        raise InvalidArgument(f"invalid argument: no data file at {path} (set --data-dir or PEFTSCALE_DATA)")
    with open(path, encoding="utf-8", newline="") as f:
        puzzles = [row["Puzzles"] for row in csv.DictReader(f)]
    if shots:
        raise InvalidArgument("invalid argument: Game of 24 prompts are zero-shot; use shots=0")
    return Task(
        "game24",
        [Question(id=f"game24:{i}", question=p, gold=p) for i, p in enumerate(puzzles)],
        grade_game24,
        _judge_game24,
        template=GAME24_TEMPLATE,
        extract=extract_game24,
        search=_game24_search,
        step_oracle=_game24_step_labels,
    )


def _jsonl(path: Path, fields: dict[str, str]) -> Task:
    rows = _read_jsonl(path)
    questions = []
    for i, r in enumerate(rows):
        missing = [f for f in fields.values() if f not in r]
        if missing:
            raise InvalidArgument(
                f"invalid argument: {path} row {i} has no field {missing[0]!r} "
                f"(map fields with --fields question=...,answer=...)"
            )
        answer = str(r[fields["answer"]])
        gold = gsm8k_gold(answer) if "####" in answer else answer
        questions.append(Question(id=f"{path.name}:{i}", question=str(r[fields["question"]]), gold=gold))
    return Task(path.stem, questions, grade_gsm8k, judge_number)


def load_task(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    fields: str | Mapping[str, str] | None = None,
    shots: int = 0,
) -> Task:
    """``dataset``: ``"gsm8k"`` (test split; k-shot examples from train), ``"math500"``,
    ``"game24"`` or a path to a JSONL file whose rows hold a question and a numeric answer
    (``fields`` maps their names)."""
    if shots < 0:
        raise InvalidArgument(f"invalid argument: shots must be >= 0, got {shots}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if dataset == "gsm8k":
        return _gsm8k(root, shots)
    if dataset == "math500":
        return _math500(root, shots)
    if dataset == "game24":
        return _game24(root, shots)
    path = Path(dataset)
    if path.suffix == ".jsonl":
        if shots:
            raise InvalidArgument("invalid argument: a JSONL data set has no train split here; use shots=0")
        return _jsonl(path, parse_fields(fields))
    raise InvalidArgument(
        f"invalid argument: unknown dataset '{dataset}' (gsm8k, math500, game24 or a path to a .jsonl file)"
    )
