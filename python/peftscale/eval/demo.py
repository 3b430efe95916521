"""``peftscale demo``: the whole product on the packaged model in bounded CPU time.

1. A LoRA trained on GSM8K train rows with ``peftscale train`` (the config is written beside it).
2. Base greedy, LoRA greedy, CoLD, self-consistency and adaptive allocation on a fixed slice of
   GSM8K test rows outside the development rows 0-199, with accuracy, 95% intervals, tokens,
   FLOPs and seconds per question, and the accuracy-against-compute plots.

Rerunning into the same folder reuses the trained adapter and the answered questions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from peftscale import models
from peftscale.engine import Engine
from peftscale.errors import InvalidArgument
from peftscale.eval.datasets import default_data_dir
from peftscale.provenance import RECORD
from peftscale.train.data import data_file

__all__ = ["DemoPlan", "plan", "run"]


@dataclass(frozen=True)
class DemoPlan:
    train_steps: int
    slice: str
    strategies: str
    max_new_tokens: int


def plan(quick: bool) -> DemoPlan:
    """The default demo takes about 15 minutes on two cores, ``quick`` about 3."""
    if quick:
        return DemoPlan(
            train_steps=8,
            slice="200:216",
            strategies="base:greedy,greedy,cold,sc@4,adaptive@640",
            max_new_tokens=160,
        )
    return DemoPlan(
        train_steps=80,
        slice="200:300",
        strategies="base:greedy,greedy,cold,sc@4,adaptive@1024",
        max_new_tokens=256,
    )


def _train_config(data: Path, steps: int, output: Path) -> dict[str, object]:
    return {
        "method": "lora",
        "model": "packaged",
        "data": {"path": str(data / "gsm8k" / "train.jsonl"), "format": "gsm8k", "limit": 2000, "eval_rows": 20},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {
            "max_steps": steps,
            "batch_size": 4,
            "lr": 3.0e-4,
            "max_length": 256,
            "warmup_steps": max(1, steps // 10),
            "scheduler": "cosine",
            "eval_every": steps,
            "save_every": steps,
        },
        "output": str(output),
    }


def _trained(output: Path, steps: int) -> bool:
    import json

    try:
        record = json.loads((output / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return not record.get("interrupted") and record.get("config", {}).get("train", {}).get("max_steps") == steps


def run(out: str | os.PathLike[str] = "runs/demo", quick: bool = False, data_dir: str | None = None) -> Path:
    """Trains (or reuses) the demo's LoRA, evaluates the strategies, prints the table; returns the
    evaluation folder."""
    import yaml

    from peftscale import eval as ev
    from peftscale import train

    p = plan(quick)
    data = (Path(data_dir) if data_dir else default_data_dir()).resolve()
    if not data_file(data / "gsm8k" / "train.jsonl").is_file():
        raise InvalidArgument(f"invalid argument: the demo reads GSM8K from {data}/gsm8k (set --data-dir)")
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = models.smollm2_135m_instruct()
    engine = Engine.load(path)
    print(f"model: {path.name} ({engine.weight_bytes / 1e6:.0f} MB of weights), {'quick' if quick else 'full'} demo")

    lora = root / "lora"
    config_path = root / "lora.yaml"
    config = _train_config(data, p.train_steps, lora)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"\n[1/2] LoRA on GSM8K train, {p.train_steps} steps: peftscale train {config_path}")
    if _trained(lora, p.train_steps):
        print(f"      reusing the adapter already trained in {lora}")
    else:
        t0 = time.perf_counter()
        result = train.run(train.load_config(config_path))
        print(
            f"      held-out loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f} "
            f"in {time.perf_counter() - t0:.0f} s"
        )

    print(f"\n[2/2] GSM8K test rows {p.slice}: {p.strategies}")
    t0 = time.perf_counter()
    folder = ev.run(
        ev.EvalConfig(
            dataset="gsm8k",
            strategies=p.strategies,
            adapter=str(lora),
            slice=p.slice,
            data_dir=str(data),
            max_new_tokens=p.max_new_tokens,
        ),
        root / "eval",
        engine=engine,
    )
    print(f"      {time.perf_counter() - t0:.0f} s\n")
    print((folder / "table.md").read_text(), end="")
    print(f"\nresults, summary and plots (accuracy_flops.png, accuracy_seconds.png) in {folder}")
    return folder
