"""`peftscale demo --quick`: the README's main job, end to end (about 3 minutes on two cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from peftscale.cli import main
from peftscale.eval.datasets import PACKAGED_DATA as DATA

pytestmark = pytest.mark.integration


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="training stack missing: pip install -e '.[dev]'")
def test_quick_demo_trains_evaluates_and_resumes(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--data-dir", str(DATA)]) == 0
    printed = capsys.readouterr().out
    strategies = ["base:greedy", "greedy", "cold", "sc@4", "adaptive@640"]
    for s in strategies:
        assert f"| {s} | 16 |" in printed, printed
    record = json.loads((out / "lora" / "peftscale.json").read_text())
    assert record["metrics"]["eval_loss_after"] < record["metrics"]["eval_loss_before"]
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert [s["strategy"] for s in summary["strategies"]] == strategies
    for s in summary["strategies"]:
        assert s["tokens_per_question"] > 0 and s["flops_per_question"] > 0
    # More compute per question for the searches than for one greedy answer.
    by = {s["strategy"]: s for s in summary["strategies"]}
    assert by["sc@4"]["flops_per_question"] > by["greedy"]["flops_per_question"]
    assert (out / "eval" / "accuracy_flops.png").stat().st_size > 0
    lines = (out / "eval" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 16 * len(strategies)
    # A second run reuses the adapter and every answered question.
    assert main(["demo", "--quick", "--out", str(out), "--data-dir", str(DATA)]) == 0
    assert "reusing the adapter" in capsys.readouterr().out
    assert (out / "eval" / "results.jsonl").read_text().splitlines() == lines
