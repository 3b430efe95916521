"""Ctrl-C during a long engine call raises KeyboardInterrupt within one step, and the engine
keeps working (on the packaged model: steps of a few milliseconds)."""

from __future__ import annotations

import os
import signal
import threading
import time

import peftscale as ps
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("python_handles_ctrl_c")]

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


def test_timeout_ends_a_long_generation_keeping_what_it_produced(smollm2_q: ps.Engine) -> None:
    start = time.perf_counter()
    outs = smollm2_q.generate(LONG[:4], max_new_tokens=2000, ignore_eos=True, timeout_s=1.0)
    took = time.perf_counter() - start
    assert 1.0 <= took < 2.0, f"a 1 s timeout returned after {took:.2f} s"
    assert all(o.finish_reason == "timeout" for o in outs)
    produced = len(outs[0].token_ids)
    assert 0 < produced < 2000
    # What a timed-out row kept is exactly the start of the untimed continuation.
    full = smollm2_q.generate(LONG[0], max_new_tokens=produced, ignore_eos=True)
    assert outs[0].token_ids == full.token_ids
    assert outs[0].text == full.text


def test_a_zero_timeout_stops_after_the_first_step(smollm2_q: ps.Engine) -> None:
    prompt = "Once upon a time, in a small village,"
    out = smollm2_q.generate(prompt, max_new_tokens=50, timeout_s=0)
    assert out.finish_reason == "timeout"
    assert len(out.token_ids) == 1
    pieces = list(smollm2_q.stream(prompt, max_new_tokens=50, timeout_s=0))
    assert "".join(pieces) == out.text


@pytest.mark.parametrize(
    ("label", "strategy"),
    [("best_of_n", ps.BestOfN(n=4)), ("beam", ps.BeamSearch(num_beams=4))],
)
def test_timeout_ends_a_search_with_what_it_has(smollm2_q: ps.Engine, label: str, strategy: ps.Strategy) -> None:
    start = time.perf_counter()
    out = smollm2_q.generate(LONG[0], max_new_tokens=2000, strategy=strategy, ignore_eos=True, timeout_s=1.0)
    took = time.perf_counter() - start
    assert took < 2.0, f"{label}: a 1 s timeout returned after {took:.2f} s"
    assert out.finish_reason == "timeout"
    if label == "beam":
        # The best running beam is kept when no hypothesis finished.
        assert len(out.token_ids) > 0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True])
def test_bad_timeouts_are_typed_errors(smollm2_q: ps.Engine, bad: object) -> None:
    with pytest.raises(ps.InvalidArgument, match="timeout_s"):
        smollm2_q.generate("Hi", max_new_tokens=2, timeout_s=bad)  # type: ignore[arg-type]


def test_ctrl_c_stops_the_logits_of_long_inputs(smollm2_q: ps.Engine) -> None:
    long = [[(7 * i + k) % 40000 + 100 for i in range(8000)] for k in range(6)]
    sent = _interrupt_after(1.0)
    with pytest.raises(KeyboardInterrupt):
        smollm2_q.logits(long)
    caught = time.perf_counter()
    assert sent, "the call ended before the signal was sent: make it longer"
    assert caught - sent[0] < 1.0, f"KeyboardInterrupt {caught - sent[0]:.2f} s after the signal"
    short = [1, 2, 3, 4]
    assert smollm2_q.logits(short).shape == (4, smollm2_q.config["vocab_size"])
