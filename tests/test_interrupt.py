"""Ctrl-C during a long engine call raises KeyboardInterrupt within one step, and the engine
keeps working (on the packaged model: steps of a few milliseconds)."""

from __future__ import annotations

import os
import signal
import threading
import time

import peftscale as ps
import pytest

pytestmark = pytest.mark.integration

LONG = ["Tell me a long story about a dragon."] * 8


def _interrupt_after(seconds: float) -> list[float]:
    """Sends SIGINT to this process after ``seconds``; the list gets the time it was sent."""
    sent: list[float] = []

    def fire() -> None:
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(seconds, fire).start()
    return sent


@pytest.mark.parametrize(
    ("label", "strategy"),
    [
        ("sampling", ps.Sampling(seed=3)),
        ("best_of_n", ps.BestOfN(n=8)),
        ("beam", ps.BeamSearch(num_beams=4)),
    ],
)
def test_ctrl_c_stops_a_long_call_within_a_second_and_the_engine_still_works(
    smollm2_q: ps.Engine, label: str, strategy: ps.Strategy
) -> None:
    prompts = LONG if label == "sampling" else LONG[0]
    expected = smollm2_q.generate("The capital of France is", max_new_tokens=8)
    sent = _interrupt_after(1.0)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        smollm2_q.generate(prompts, max_new_tokens=2000, strategy=strategy, ignore_eos=True)
    caught = time.perf_counter()
    assert sent, "the call ended before the signal was sent: make it longer"
    assert caught - sent[0] < 1.0, f"{label}: KeyboardInterrupt {caught - sent[0]:.2f} s after the signal"
    assert caught - start >= 1.0
    again = smollm2_q.generate("The capital of France is", max_new_tokens=8)
    assert again.token_ids == expected.token_ids
