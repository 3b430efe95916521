"""An evaluation folder's summary: ``summary.json``, ``table.md`` and the accuracy-against-compute
plots ``accuracy_flops.png`` and ``accuracy_seconds.png``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftscale.eval.stats import paired_difference, pass_at_k, wilson_interval

__all__ = ["StrategySummary", "summarize", "write"]

SUMMARY = "summary.json"
TABLE = "table.md"
PLOT_FLOPS = "accuracy_flops.png"
PLOT_SECONDS = "accuracy_seconds.png"


@dataclass(frozen=True)
class StrategySummary:
    strategy: str
    family: str
    budget: int | None
    questions: int
    correct: int
    accuracy: float
    #: 95% Wilson interval of the accuracy.
    ci_low: float
    ci_high: float
    tokens_per_question: float
    flops_per_question: float
    seconds_per_question: float
    #: Sampled strategies: the mean unbiased pass@1 and pass@n (coverage: some of the ``n``
    #: paths is right) over the questions; ``None`` for the others.
    pass_at_1: float | None = None
    pass_at_n: float | None = None


def _reference(labels: Sequence[str]) -> str | None:
    """What the others are compared with: greedy with the adapter, else base greedy, else the first."""
    for name in ("greedy", "base:greedy"):
        if name in labels:
            return name
    return labels[0] if labels else None


def summarize(records: Sequence[dict[str, Any]], ids: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Per-strategy accuracy (with its interval) and compute over the questions ``ids``, and each
    strategy's paired difference from the reference on the questions both answered."""
    wanted = set(ids)
    by: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in labels}
    for r in records:
        if r["strategy"] in by and r["id"] in wanted:
            by[r["strategy"]][r["id"]] = r
    rows: list[StrategySummary] = []
    for label in labels:
        got = list(by[label].values())
        if not got:
            continue
        n, right = len(got), sum(bool(r["correct"]) for r in got)
        low, high = wilson_interval(right, n)
        sampled = [r for r in got if r.get("samples", 0) > 0]
        coverage = [
            (
                pass_at_k(r["samples"], r["samples_correct"], 1),
                pass_at_k(r["samples"], r["samples_correct"], r["samples"]),
            )
            for r in sampled
        ]
        rows.append(
            StrategySummary(
                strategy=label,
                family=got[0]["family"],
                budget=got[0]["budget"],
                questions=n,
                correct=right,
                accuracy=right / n,
                ci_low=low,
                ci_high=high,
                tokens_per_question=sum(r["tokens"] for r in got) / n,
                flops_per_question=sum(r["flops"] for r in got) / n,
                seconds_per_question=sum(r["seconds"] for r in got) / n,
                pass_at_1=sum(c[0] for c in coverage) / len(coverage) if coverage else None,
                pass_at_n=sum(c[1] for c in coverage) / len(coverage) if coverage else None,
            )
        )
    ref = _reference([r.strategy for r in rows])
    comparisons = []
    if ref is not None:
        for row in rows:
            if row.strategy == ref:
                continue
            common = [i for i in ids if i in by[ref] and i in by[row.strategy]]
            if not common:
                continue
            d = paired_difference(
                [bool(by[ref][i]["correct"]) for i in common], [bool(by[row.strategy][i]["correct"]) for i in common]
            )
            comparisons.append({"strategy": row.strategy, "reference": ref, **asdict(d)})
    return {
        "strategies": [asdict(r) for r in rows],
        "reference": ref,
        "comparisons": comparisons,
        "equal_accuracy": _equal_accuracy(rows),
        "seeds": _across_seeds(rows),
    }


def _across_seeds(rows: Sequence[StrategySummary]) -> list[dict[str, Any]]:
    """For each strategy run under several seeds (``sc@8``, ``sc@8#seed1``, ...): its accuracy's
    mean, sample standard deviation, lowest and highest across the seeds."""
    import statistics

    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.strategy.split("#seed")[0], []).append(r.accuracy)
    return [
        {
            "strategy": name,
            "seeds": len(accs),
            "mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs),
            "min": min(accs),
            "max": max(accs),
        }
        for name, accs in groups.items()
        if len(accs) > 1
    ]


def _equal_accuracy(rows: Sequence[StrategySummary]) -> list[dict[str, Any]]:
    """For each adaptive budget and each family swept over several budgets (self-consistency,
    best-of-N, ...): the FLOPs per question at which the sweep first reaches the adaptive run's
    accuracy (interpolated linearly in log FLOPs between neighbouring budgets), and its ratio to
    the adaptive run's FLOPs; ``None`` when the sweep never gets there."""
    import math

    sweeps: dict[str, list[StrategySummary]] = {}
    for r in rows:
        if r.budget is not None and not r.family.endswith("adaptive"):
            sweeps.setdefault(r.family, []).append(r)
    out = []
    for a in (r for r in rows if r.family.split(":")[-1].startswith("adaptive")):
        for family, points in sweeps.items():
            if len(points) < 2:
                continue
            points = sorted(points, key=lambda p: p.flops_per_question)
            at = None
            for lo, hi in zip([None, *points], points, strict=False):
                if hi.accuracy < a.accuracy:
                    continue
                if lo is None or lo.accuracy >= hi.accuracy:
                    at = hi.flops_per_question
                else:
                    t = (a.accuracy - lo.accuracy) / (hi.accuracy - lo.accuracy)
                    at = math.exp(
                        math.log(lo.flops_per_question)
                        + t * (math.log(hi.flops_per_question) - math.log(lo.flops_per_question))
                    )
                break
            out.append(
                {
                    "strategy": a.strategy,
                    "accuracy": a.accuracy,
                    "flops_per_question": a.flops_per_question,
                    "against": family,
                    "their_flops_at_that_accuracy": at,
                    "ratio": None if at is None else at / a.flops_per_question,
                }
            )
    return out


def _table(summary: dict[str, Any]) -> str:
    lines = [
        "| strategy | questions | accuracy | 95% CI | pass@1 / pass@n | tokens / q | GFLOPs / q | seconds / q |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["strategies"]:
        cover = "-" if r.get("pass_at_1") is None else f"{r['pass_at_1']:.1%} / {r['pass_at_n']:.1%}"
        lines.append(
            f"| {r['strategy']} | {r['questions']} | {r['accuracy']:.1%} | {r['ci_low']:.1%}-{r['ci_high']:.1%} | "
            f"{cover} | {r['tokens_per_question']:.0f} | {r['flops_per_question'] / 1e9:.1f} | "
            f"{r['seconds_per_question']:.2f} |"
        )
    if summary["comparisons"]:
        lines += [
            "",
            f"Paired against {summary['reference']} (same questions; 95% paired-bootstrap interval, exact McNemar):",
            "",
            "| strategy | difference | 95% CI | only reference right | only strategy right | p |",
            "|---|---|---|---|---|---|",
        ]
        for c in summary["comparisons"]:
            lines.append(
                f"| {c['strategy']} | {c['difference']:+.1%} | {c['low']:+.1%} to {c['high']:+.1%} | "
                f"{c['only_a']} | {c['only_b']} | {c['p_value']:.3g} |"
            )
    if summary.get("seeds"):
        lines += [
            "",
            "Across seeds (strategies that sample, run once per seed):",
            "",
            "| strategy | seeds | mean accuracy | sd | lowest | highest |",
            "|---|---|---|---|---|---|",
        ]
        for g in summary["seeds"]:
            lines.append(
                f"| {g['strategy']} | {g['seeds']} | {g['mean']:.1%} | {g['sd']:.1%} | "
                f"{g['min']:.1%} | {g['max']:.1%} |"
            )
    if summary.get("equal_accuracy"):
        lines += [
            "",
            "Compute to reach the adaptive run's accuracy along each sweep (interpolated in log FLOPs):",
            "",
            "| adaptive | its accuracy | its GFLOPs / q | sweep | sweep GFLOPs / q at that accuracy | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for e in summary["equal_accuracy"]:
            theirs = e["their_flops_at_that_accuracy"]
            lines.append(
                f"| {e['strategy']} | {e['accuracy']:.1%} | {e['flops_per_question'] / 1e9:.1f} | {e['against']} | "
                + ("not reached | - |" if theirs is None else f"{theirs / 1e9:.1f} | {e['ratio']:.2f}x |")
            )
    return "\n".join(lines) + "\n"


def _short(value: float, _: object = None) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _plot(summary: dict[str, Any], x_key: str, x_label: str, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict[str, Any]]] = {}
    for r in summary["strategies"]:
        families.setdefault(r["family"], []).append(r)
    for family, rs in families.items():
        rs = sorted(rs, key=lambda r: r[x_key])
        xs = [r[x_key] for r in rs]
        ys = [100 * r["accuracy"] for r in rs]
        err = [
            [100 * (r["accuracy"] - r["ci_low"]) for r in rs],
            [100 * (r["ci_high"] - r["accuracy"]) for r in rs],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=family, linestyle="-" if len(rs) > 1 else "none")
        for r in rs:
            if r["budget"] is not None:
                ax.annotate(
                    str(r["budget"]),
                    (r[x_key], 100 * r["accuracy"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    # Ticks at 1, 2 and 5 of each decade with short labels (50G, 100G, 200G): matplotlib's
    # default minor labels collide when the range spans less than a decade.
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_short))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(out: Path, ids: Sequence[str], labels: Sequence[str], title: str = "") -> dict[str, Any]:
    """Writes ``summary.json``, ``table.md`` and the plots for the results in ``out``; returns the
    summary. Plots need matplotlib (``pip install "peftscale[train]"``); without it they are
    skipped with a note."""
    from peftscale.eval.runner import read_records

    summary = summarize(read_records(out), ids, labels)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    (out / TABLE).write_text(_table(summary))
    if summary["strategies"]:
        flops = _plot(summary, "flops_per_question", "FLOPs per question (log)", out / PLOT_FLOPS, title)
        seconds = _plot(summary, "seconds_per_question", "seconds per question (log)", out / PLOT_SECONDS, title)
        if not (flops and seconds):
            print("matplotlib is not installed: plots skipped (pip install matplotlib)", file=sys.stderr)
    return summary
