"""Long-run behaviour with bounded counts on a tiny model: memory stays flat over many calls, no
handles or threads leak when engines are dropped, and one engine is safe to share between
threads. `benches/soak.py` runs the same checks with the full counts on the packaged model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import peftscale as ps
import pytest

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "benches" / "soak.py")
assert _spec and _spec.loader
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak
_spec.loader.exec_module(soak)


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> ps.Engine:
    return ps.Engine.load(tiny_llama, dtype="f32")


def test_memory_stays_flat_over_many_short_generations(tiny: ps.Engine) -> None:
    run = soak.short_generations(tiny, 2000)
    assert run.growth_after_warmup_mib < 8, run


def test_memory_stays_flat_over_long_generations(tiny: ps.Engine) -> None:
    run = soak.long_generations(tiny, 40, 200)
    assert run.growth_after_warmup_mib < 8, run


def test_dropped_engines_leave_no_handles_or_threads(tiny_llama: Path) -> None:
    churn = soak.engine_churn(tiny_llama, 100, dtype="f32")
    assert churn.files_after <= churn.files_before, churn
    assert churn.threads_after <= churn.threads_before, churn
    assert churn.rss_after_mib - churn.rss_before_mib < 16, churn


def test_one_engine_shared_by_eight_threads_gives_the_sequential_results(tiny: ps.Engine) -> None:
    assert soak.shared_between_threads(tiny, 8)
