"""How well step scores rank held-out steps: step AUC and accuracy against exact or rollout labels,
overall, by the rows' ``kind`` and by step position; the scores a verifier's (in the engine) or any
other judge's.

    peftscale score-steps --verifier runs/game24-prm --rows runs/game24-steps-test.jsonl
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftscale.eval.stats import auc

if TYPE_CHECKING:
    from peftscale.engine import Engine

__all__ = ["quality", "read_rows", "report", "summarize", "table", "verifier_scores"]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Stepwise rows from a JSONL file, refused by row and field as training refuses them."""
    from peftscale.train.config import ConfigError, DataConfig
    from peftscale.train.data import read_jsonl
    from peftscale.train.verifier import check_rows

    rows = read_jsonl(path, ConfigError)
    check_rows(rows, DataConfig(path=Path(path), format="stepwise"), outcome=False)
    return rows


def summarize(scores: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Step AUC, accuracy (scores and labels split at 0.5) and the share of good steps (the accuracy
    of always saying "good")."""
    good = [y >= 0.5 for y in labels]
    right = sum((s >= 0.5) == g for s, g in zip(scores, good, strict=True))
    n = max(len(scores), 1)
    return {
        "steps": len(scores),
        "step_auc": auc(scores, good),
        "step_accuracy": right / n,
        "share_good": sum(good) / n,
    }


def verifier_scores(
    engine: Engine,
    rows: Sequence[dict[str, Any]],
    verifier: str = "verifier",
    batch_size: int = 32,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> list[list[float]]:
    """The loaded ``verifier``'s score of every step of stepwise ``rows`` (``prompt``,
    ``completions``), ``batch_size`` rows per batched call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scores: list[list[float]] = []
    starts: Iterable[int] = range(0, len(rows), batch_size)
    for start in progress(starts) if progress else starts:
        batch = rows[start : start + batch_size]
        scores += engine.score_steps_batch([(r["prompt"], r["completions"]) for r in batch], verifier=verifier)
    return scores


def quality(rows: Sequence[dict[str, Any]], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """:func:`summarize` of ``scores`` (one per step of each row) against the rows' ``labels``:
    overall, by the rows' ``kind`` where they have one, and by step position (1-based)."""
    groups: dict[str, dict[str, tuple[list[float], list[float]]]] = {"kind": {}, "step": {}}
    every: tuple[list[float], list[float]] = ([], [])
    for row, got in zip(rows, scores, strict=True):
        for k, (s, y) in enumerate(zip(got, row["labels"], strict=True)):
            for group, key in (("kind", row.get("kind")), ("step", str(k + 1))):
                if key is not None:
                    pair = groups[group].setdefault(key, ([], []))
                    pair[0].append(s)
                    pair[1].append(y)
            every[0].append(s)
            every[1].append(y)
    return {
        **summarize(*every),
        "by_kind": {k: summarize(*v) for k, v in groups["kind"].items()},
        "by_step": {k: summarize(*v) for k, v in sorted(groups["step"].items(), key=lambda kv: int(kv[0]))},
    }


def table(q: dict[str, Any]) -> str:
    """:func:`quality`'s figures as a Markdown table."""
    lines = ["| steps | count | step AUC | step accuracy | share good |", "|---|---|---|---|---|"]
    parts = [("all", q), *((f"kind {k}", v) for k, v in q["by_kind"].items())]
    parts += [(f"step {k}", v) for k, v in q["by_step"].items()]
    for name, s in parts:
        lines.append(
            f"| {name} | {s['steps']} | {s['step_auc']:.3f} | {s['step_accuracy']:.3f} | {s['share_good']:.3f} |"
        )
    return "\n".join(lines)


def report(q: dict[str, Any], out: str | Path | None, **about: Any) -> None:
    """Prints :func:`table` of ``q``, and writes ``about`` and ``q`` to ``out`` as JSON when given."""
    print(table(q))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({**about, **q}, f, indent=2)
            f.write("\n")
