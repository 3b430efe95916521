"""Runs strategies over a data set's questions, one result line per question, resumably."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peftscale import models
from peftscale.engine import Candidate, Engine, GenerationOutput
from peftscale.errors import InvalidArgument
from peftscale.eval.datasets import Question, Task, _callable_fingerprint, load_task, parse_slice
from peftscale.eval.prompts import build_prompt
from peftscale.eval.specs import VERIFIER, Spec, parse_seeds, parse_specs
from peftscale.strategies import Adaptive, CoLD

__all__ = ["EvalConfig", "Record", "run", "RESULTS", "RUN"]

RESULTS = "results.jsonl"
"""One JSON line per (strategy, question), appended as each question finishes."""
RUN = "run.json"
"""What the results in a folder were produced from; a rerun into the folder must match it."""

_MAX_NEW_TOKENS = {"gsm8k": 256, "math500": 512, "game24": 192}
_ADAPTER = "eval"


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's results (``run.json`` holds it)."""

    #: ``"gsm8k"``, ``"math500"``, ``"game24"``, a ``.jsonl`` path, or a task of your own
    #: (:func:`peftscale.eval.user_task`).
    dataset: str | Task
    strategies: str
    model: str | None = None
    #: Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
    device: str = "cpu"
    adapter: str | None = None
    #: A verifier folder (``peftscale train`` with ``method: prm`` or ``orm``) for the strategies
    #: ``bon-w``, ``sc-w``, ``prm-beam`` and ``dvts``.
    verifier: str | None = None
    slice: str | None = None
    data_dir: str | None = None
    fields: str | None = None
    shots: int = 0
    #: The user turn, ``{question}`` replaced; default: the task's zero-shot chain of thought.
    template: str | None = None
    #: Per generated answer (searches: per path); default per data set (GSM8K 256, MATH 512, 24: 192).
    max_new_tokens: int | None = None
    #: Questions per call (their rows share each forward pass); searches whose judge calls the
    #: engine itself take one question per call.
    batch_size: int = 8
    #: Adaptive allocation spreads its budget over fixed windows of this many consecutive
    #: questions of the slice (the same windows when a run resumes; another size changes the
    #: allocation, so compare adaptive results at one size).
    group_size: int = 16
    #: CoLD settings for ``cold`` and ``+cold``.
    cold_alpha: float = 0.1
    cold_beta: float = 0.5
    #: Per-family keyword arguments for the strategy dataclasses (``{"tot": {"depth": 4}}``).
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Strategies that sample run once per seed (``"0,1,2"``; seed 0 keeps the plain label, the
    #: others are labelled ``sc@8#seed1``); the table gives each one's spread across seeds.
    seeds: str | None = None

    def identity(self) -> dict[str, Any]:
        """The fields whose change makes earlier results incomparable: not the strategies, the
        seeds or the slice (results are kept per strategy and question, so each may grow), nor
        batching."""
        d = asdict(dataclasses.replace(self, dataset=""))
        for k in ("strategies", "slice", "batch_size", "group_size", "data_dir", "seeds"):
            d.pop(k)
        task = self.dataset
        if isinstance(task, Task):
            # A user task by its questions' content and its callables' fingerprints.
            questions = [(q.id, q.question, q.gold) for q in task.questions]
            d["dataset"] = {
                "task": task.name,
                "questions": fingerprint(questions),
                "grade": _identify(task.grade),
                "prompt": _identify(task.prompt) if task.prompt is not None else None,
                "extract": _identify(task.extract),
            }
        else:
            d["dataset"] = task
        if d["device"] == "cpu":  # runs from before devices existed stay comparable
            d.pop("device")
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return d


@dataclass(frozen=True)
class Record:
    """One question answered by one strategy."""

    id: str
    strategy: str
    family: str
    budget: int | None
    question: str
    gold: str
    prediction: str | None
    correct: bool
    #: The reply the prediction was read from (the search's chosen path).
    text: str
    finish_reason: str
    #: Tokens run through the model for this question (prompt once, every path and probe).
    tokens: int
    #: Tokens generated in the returned reply.
    generated_tokens: int
    flops: float
    seconds: float
    #: Set when the result was read from the first samples of a larger budget's run (see
    #: :attr:`peftscale.eval.Spec.shares_samples_of`); its compute is that run's, scaled by the
    #: tokens of the samples it used.
    shares_samples_of: str | None = None
    #: Sampled strategies (self-consistency, best-of-N, adaptive): the paths drawn and how many
    #: of them the grader accepts, for pass@k (coverage); 0 for the others.
    samples: int = 0
    samples_correct: int = 0


@dataclass
class _Call:
    """One engine call's outputs for some questions, and each question's share of its cost."""

    outputs: list[GenerationOutput]
    shares: list[float]
    #: Tokens and FLOPs of engine calls the strategy's callables made (a model judging rollouts).
    nested: tuple[int, float] = (0, 0.0)


#: Strategy fields that may hold a judge calling the engine itself (and counting what it spends).
_JUDGES = ("reward", "evaluator", "scorer")


def _nested_spent(strategy: object) -> tuple[int, float]:
    tokens, flops = 0, 0.0
    for name in _JUDGES:
        take = getattr(getattr(strategy, name, None), "take_spent", None)
        if callable(take):
            t, f = take()
            tokens, flops = tokens + t, flops + f
    return tokens, flops


def _progress(total: int, label: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="q", file=sys.stderr, dynamic_ncols=True)


class _Results:
    """The results file: read once, then appended line by line (flushed, so a crash keeps them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        # A line cut short by a crash: that question runs again.
                        continue
        self.done = {(r["strategy"], r["id"]) for r in self.records}
        self._file: TextIO | None = None

    def append(self, record: Record) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        line = json.dumps(asdict(record), ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(asdict(record))
        self.done.add((record.strategy, record.id))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _check_run_file(out: Path, config: EvalConfig) -> None:
    path = out / RUN
    # As JSON reads it back (tuples become lists). A callable in an override is recorded by its
    # name and the fingerprint of what it depends on (its address changes from run to run).
    identity = json.loads(json.dumps(config.identity(), default=_identify))
    if config.adapter is not None and Path(config.adapter).exists():
        # The adapter's files, not only its path: retrained in place, it is another evaluation.
        identity["adapter_sha256"] = fingerprint(config.adapter)
    if config.verifier is not None and Path(config.verifier).exists():
        identity["verifier_sha256"] = fingerprint(config.verifier)
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            earlier = None
        if earlier != identity:
            changed = sorted(k for k in identity if not isinstance(earlier, dict) or earlier.get(k) != identity[k])
            raise InvalidArgument(
                f"invalid argument: {out} holds results of a different evaluation (changed: {', '.join(changed)}); "
                "use another output folder"
            )
        unknown = _unidentified(identity)
        if unknown:
            raise InvalidArgument(
                f"invalid argument: {out} holds earlier results, and whether {', '.join(unknown)} changed since "
                "cannot be told: give each callable a peftscale_fingerprint() method returning what it depends on "
                "(for example peftscale.eval.fingerprint(adapter_dir, settings)), or use another output folder"
            )
    else:
        path.write_text(json.dumps(identity, indent=2) + "\n")


def fingerprint(*parts: object) -> str:
    """A content hash of what a scorer, judge or grader depends on, for its
    ``peftscale_fingerprint()``: files and folders (``Path`` or ``str`` naming one) by their bytes
    (every file below a folder, by relative path), anything else by its ``repr``.

    >>> class Verifier:
    ...     def __init__(self, adapter: str) -> None:
    ...         self.adapter = adapter
    ...     def __call__(self, prompt: str, completion: str) -> float: ...
    ...     def peftscale_fingerprint(self) -> str:
    ...         return fingerprint(self.adapter, {"threshold": 0.5})
    """
    h = hashlib.sha256()
    for part in parts:
        target = Path(part) if isinstance(part, (str, os.PathLike)) else None
        if target is not None and target.exists():
            files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
            for f in files:
                h.update(str(f.relative_to(target) if target.is_dir() else f.name).encode())
                each = hashlib.sha256()
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        each.update(chunk)
                h.update(each.digest())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def _identify(value: object) -> object:
    """How run.json records a value JSON cannot hold: a callable by its name and fingerprint (its
    ``peftscale_fingerprint()``, a plain function's code, else ``None``: not identifiable),
    anything else by its type's name; strings as they are."""
    if isinstance(value, str):
        return value
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    if not callable(value):
        return name
    return {"callable": name, "fingerprint": _callable_fingerprint(value)}


def _unidentified(identity: object) -> list[str]:
    """The callables recorded in ``identity`` without a fingerprint."""
    if isinstance(identity, dict):
        if set(identity) == {"callable", "fingerprint"} and identity["fingerprint"] is None:
            return [str(identity["callable"])]
        return [name for v in identity.values() for name in _unidentified(v)]
    if isinstance(identity, list):
        return [name for v in identity for name in _unidentified(v)]
    return []


def _chunks(items: Sequence[Question], size: int) -> Iterator[list[Question]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


_TOT_JUDGE = ("evaluator", "value_samples", "value_max_tokens", "value_template")


def _task_overrides(task: Task, config: EvalConfig, engine: Engine) -> dict[str, dict[str, Any]]:
    """The task's own search settings (``Task.search``), then the user's on top."""
    adapter = _ADAPTER if config.adapter is not None else None
    own = task.search(engine, adapter) if task.search is not None else {}
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in own.items()}
    if config.verifier is not None:
        # The verifier values Tree-of-Thought's states and rewards MCTS's rollouts in place of
        # the task's own judge (the user's --set still wins).
        for family, fields in (("tot", _TOT_JUDGE), ("mcts", ("reward",))):
            for f in fields:
                merged.get(family, {}).pop(f, None)
    for family, kwargs in config.overrides.items():
        merged.setdefault(family, {}).update(kwargs)
    return merged


def _shares(outputs: Sequence[GenerationOutput]) -> list[float]:
    """Each output's share of its call's cost: its own tokens (prompt and reply; search outputs
    report ``tokens_spent``) over all of them."""
    weights = [o.tokens_spent or (o.prompt_tokens + len(o.token_ids)) for o in outputs]
    total = sum(weights) or 1
    return [w / total for w in weights]


def _run_call(engine: Engine, spec: Spec, prompts: list[str], max_new_tokens: int, group_budget: int | None) -> _Call:
    adapter = _ADAPTER if spec.uses_adapter else None
    strategy = spec.strategy
    if isinstance(strategy, Adaptive):
        assert group_budget is not None
        strategy = dataclasses.replace(strategy, budget_tokens=group_budget)
    if len(prompts) == 1 and not isinstance(strategy, Adaptive):
        out = engine.generate(prompts[0], max_new_tokens=max_new_tokens, strategy=strategy, adapter=adapter)
        return _Call([out], [1.0], _nested_spent(strategy))
    outs = engine.generate(prompts, max_new_tokens=max_new_tokens, strategy=strategy, adapter=adapter)
    assert isinstance(outs, list)
    return _Call(outs, _shares(outs))


def _record(
    task: Task, spec: Spec, q: Question, out: GenerationOutput, share: float, nested: tuple[int, float] = (0, 0.0)
) -> Record:
    text = out.text or ""
    if out.answer is not None:
        prediction: str | None = out.answer
        correct = task.judge(prediction, q.gold)
    else:
        grade = task.grade(text, q.gold)
        prediction, correct = grade.prediction, grade.correct
    tokens = out.tokens_spent or round(out.stats.tokens_forwarded * share)
    samples, samples_correct = _coverage(task, spec, q, out.candidates)
    return Record(
        id=q.id,
        strategy=spec.label,
        family=spec.family,
        budget=spec.budget,
        question=q.question,
        gold=q.gold,
        prediction=prediction,
        correct=bool(correct),
        text=text,
        finish_reason=out.finish_reason,
        tokens=int(tokens) + nested[0],
        generated_tokens=len(out.token_ids),
        flops=float(out.stats.flops * share) + nested[1],
        seconds=float(out.stats.seconds * share),
        samples=samples,
        samples_correct=samples_correct,
    )


#: Families whose candidates are independent samples of the model (what pass@k counts).
_SAMPLED = ("sc", "bon", "adaptive", "sc-w", "bon-w")


def _coverage(task: Task, spec: Spec, q: Question, candidates: Sequence[Candidate]) -> tuple[int, int]:
    """How many sampled paths ``candidates`` holds and how many of them the grader accepts."""
    if spec.family.removeprefix("base:").split("+")[0] not in _SAMPLED or not candidates:
        return 0, 0
    return len(candidates), sum(task.grade(c.text or "", q.gold).correct for c in candidates)


def _first_samples(task: Task, spec: Spec, q: Question, out: GenerationOutput, parent: Record) -> Record:
    """``spec``'s result for ``q`` from the first ``spec.budget`` samples of the larger run ``out``
    (same vote, or same ranking, as the engine's: ties go to the sample drawn first)."""
    assert spec.budget is not None
    used = out.candidates[: spec.budget]
    if spec.family.startswith(("sc", "base:sc")):
        votes: dict[str, float] = {}
        for c in used:
            if c.answer is not None:
                votes[c.answer] = votes.get(c.answer, 0.0) + c.score
        winner = max(votes, key=lambda a: votes[a]) if votes else None  # first seen wins ties
        chosen = next((c for c in used if winner is not None and c.answer == winner), used[0])
        prediction, correct = winner, task.judge(winner, q.gold)
    else:
        chosen = max(used, key=lambda c: c.score)  # the first of equal scores
        grade = task.grade(chosen.text or "", q.gold)
        prediction, correct = grade.prediction, grade.correct
    full = out.prompt_tokens + sum(len(c.token_ids) for c in out.candidates)
    part = (out.prompt_tokens + sum(len(c.token_ids) for c in used)) / full
    return dataclasses.replace(
        parent,
        strategy=spec.label,
        budget=spec.budget,
        prediction=prediction,
        correct=bool(correct),
        text=chosen.text or "",
        finish_reason=chosen.finish_reason,
        tokens=round(parent.tokens * part),
        generated_tokens=len(chosen.token_ids),
        flops=parent.flops * part,
        seconds=parent.seconds * part,
        shares_samples_of=parent.strategy,
        samples=len(used),
        samples_correct=_coverage(task, spec, q, used)[1],
    )


def run(
    config: EvalConfig | None = None,
    out: str | os.PathLike[str] = "eval-out",
    *,
    engine: Engine | None = None,
    progress: bool = True,
    on_record: Callable[[Record], None] | None = None,
    **kwargs: Any,
) -> Path:
    """Runs every strategy of ``config`` over the chosen questions and writes the results to
    ``out`` (see :mod:`peftscale.eval`); returns ``out``.

    ``config`` may be left out and its fields given as keywords (``dataset="gsm8k",
    strategies="greedy,sc@8", slice="200:500"``). Questions already in ``out/results.jsonl`` are
    skipped, so an interrupted run continues where it stopped. ``engine`` reuses a loaded model
    (it must be the one ``config.model`` names).
    """
    if config is None:
        config = EvalConfig(**kwargs)
    elif kwargs:
        raise InvalidArgument(f"invalid argument: give either a config or keywords, not both ({sorted(kwargs)})")
    if config.batch_size < 1 or config.group_size < 1:
        raise InvalidArgument("invalid argument: batch_size and group_size must be >= 1")
    if isinstance(config.dataset, Task):
        task = config.dataset
    else:
        task = load_task(config.dataset, config.data_dir, config.fields, config.shots)
    rows = parse_slice(config.slice, len(task.questions))
    questions = [task.questions[i] for i in rows]
    # The strategies are checked before the model loads (it takes seconds), then built with the
    # task's engine-dependent settings.
    has_adapter = config.adapter is not None
    has_verifier = config.verifier is not None
    checked = parse_specs(
        config.strategies,
        overrides=config.overrides,
        has_adapter=has_adapter,
        has_verifier=has_verifier,
        seeds=parse_seeds(config.seeds),
    )
    max_new_tokens = config.max_new_tokens or _MAX_NEW_TOKENS.get(task.name, 256)
    _check_adaptive_budgets(checked, max_new_tokens)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_file(out_dir, config)
    if engine is None:
        engine = Engine.load(config.model or models.smollm2_135m_instruct(), device=config.device)
    if config.adapter is not None and _ADAPTER not in engine.adapters:
        engine.load_adapter(config.adapter, name=_ADAPTER)
    if config.verifier is not None:
        # Loaded afresh: a reused engine may hold another evaluation's verifier under the name.
        if VERIFIER in engine.verifiers:
            engine.unload_verifier(VERIFIER)
        engine.load_verifier(config.verifier, name=VERIFIER)
    specs = parse_specs(
        config.strategies,
        extract=task.extract,
        cold=CoLD(alpha=config.cold_alpha, beta=config.cold_beta),
        overrides=_task_overrides(task, config, engine),
        has_adapter=has_adapter,
        has_verifier=has_verifier,
        seeds=parse_seeds(config.seeds),
    )
    prompts = {q.id: build_prompt(engine, task, q, config.template) for q in questions}
    results = _Results(out_dir / RESULTS)
    try:
        for spec in specs:
            if spec.shares_samples_of is not None:
                continue  # written with the run whose samples it reads
            nested = [s for s in specs if s.shares_samples_of == spec.label]
            labels = [spec.label, *(s.label for s in nested)]
            todo = [q for q in questions if any((label, q.id) not in results.done for label in labels)]
            earlier = [r for r in results.records if r["strategy"] == spec.label]
            right, seen = sum(r["correct"] for r in earlier), len(earlier)
            title = spec.label + (f" (and {', '.join(s.label for s in nested)})" if nested else "")
            bar = _progress(len(questions), title, progress)
            if bar is not None:
                bar.update(len(questions) - len(todo))
            if spec.per_group:
                # Adaptive allocation spreads its budget over fixed windows of group_size
                # consecutive questions of the slice, the same windows on a resumed run: a
                # window with a question left runs whole again (records already written stay).
                pending = {q.id for q in todo}
                chunks = [w for w in _chunks(questions, config.group_size) if any(q.id in pending for q in w)]
            else:
                chunks = list(_chunks(todo, config.batch_size if _batchable(spec) else 1))
            for chunk in chunks:
                budget = spec.budget * len(chunk) if spec.per_group and spec.budget else None
                call = _run_call(engine, spec, [prompts[q.id] for q in chunk], max_new_tokens, budget)
                for q, o, share in zip(chunk, call.outputs, call.shares, strict=True):
                    record = _record(task, spec, q, o, share, call.nested)
                    if (record.strategy, record.id) not in results.done:
                        right, seen = right + record.correct, seen + 1
                    for r in [record, *(_first_samples(task, s, q, o, record) for s in nested)]:
                        if (r.strategy, r.id) in results.done:
                            continue  # run again only to fill in a shared-sample result
                        results.append(r)
                        if on_record is not None:
                            on_record(r)
                if bar is not None:
                    bar.update(sum(q.id in {t.id for t in todo} for q in chunk))
                    bar.set_postfix(acc=f"{right / max(seen, 1):.1%}")
            if bar is not None:
                bar.close()
    finally:
        results.close()
    from peftscale.eval import report

    rows_text = f"rows {rows.start}-{rows.stop - 1}"
    adapter_text = f" + {Path(config.adapter).name}" if config.adapter else ""
    title = f"{task.name}, {rows_text}: {Path(engine.path).name}{adapter_text}"
    report.write(out_dir, [q.id for q in questions], [s.label for s in specs], title=title)
    return out_dir


def _check_adaptive_budgets(specs: Sequence[Spec], max_new_tokens: int) -> None:
    """Adaptive allocation first samples ``probe`` answers of up to ``max_new_tokens`` tokens
    for every question; a budget per question below that cannot pay for them."""
    for spec in specs:
        if isinstance(spec.strategy, Adaptive) and spec.budget is not None:
            needed = spec.strategy.probe * max_new_tokens
            if spec.budget < needed:
                raise InvalidArgument(
                    f"invalid argument: {spec.label} gives {spec.budget} tokens per question, but its "
                    f"{spec.strategy.probe} probes of up to {max_new_tokens} tokens need {needed}: "
                    f"use adaptive@{needed} or more, or fewer probes (--set adaptive.probe=N)"
                )


def _batchable(spec: Spec) -> bool:
    """Several questions share one batched call (each keeps its own search; its answer does not
    depend on the others), except a search whose judge re-enters the engine: that compute is
    counted per call, so such a search runs one question per call."""
    strategy = spec.strategy
    return not any(callable(getattr(getattr(strategy, n, None), "take_spent", None)) for n in _JUDGES)


def read_records(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The result lines of an evaluation folder."""
    return _Results(Path(out) / RESULTS).records
