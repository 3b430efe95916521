"""Searches ended before they finish (issue 31, item 2): self-consistency cut short by the
timeout path or by Ctrl-C votes over the samples that finished, on the packaged model."""

from __future__ import annotations

import os
import signal
import threading

import peftscale as ps
import pytest

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now? Explain briefly."
SC = ps.SelfConsistency(n=6, sampling=ps.Sampling(temperature=1.0, seed=5))


def _prompt(eng: ps.Engine) -> list[int]:
    return eng.tokenizer.encode(eng.apply_chat_template([{"role": "user", "content": QUESTION}]))


def _expected_vote(candidates: list[ps.Candidate]) -> tuple[str | None, dict[str, float]]:
    tally = ps.vote([c.text or "" for c in candidates], "last_number")
    return (tally[0][0] if tally else None), dict(tally)


def test_self_consistency_cut_short_votes_over_the_samples_that_finished(smollm2_q: ps.Engine) -> None:
    eng = smollm2_q
    ids = _prompt(eng)
    full = eng.generate(ids, max_new_tokens=96, strategy=SC)
    lengths = sorted(len(c.token_ids) for c in full.candidates)
    assert lengths[0] < lengths[-1], "the samples must end at different steps for this test"
    by_text = {c.text: c for c in full.candidates}

    # The same generation, stopped after enough steps for the shortest sample but not the longest.
    gen = eng._core.start([ids], adapters=[None], **eng._kwargs(96, SC, None, False, None))
    for _ in range(lengths[0] + 1):
        gen.step()
    assert not gen.done
    gen.finish_early("interrupted")
    out = ps.GenerationOutput._from_core(gen.outputs()[0])

    assert out.finish_reason == "interrupted"
    assert 1 <= len(out.candidates) < len(full.candidates)
    # Each is a sample of the full run (same seed, same tokens), finished on its own.
    for c in out.candidates:
        assert c.text in by_text and c.token_ids == by_text[c.text].token_ids
    answer, votes = _expected_vote(out.candidates)
    assert out.answer == answer and out.votes == votes
    assert out.answer is not None or all(c.answer is None for c in out.candidates)


@pytest.mark.usefixtures("python_handles_ctrl_c")
def test_ctrl_c_raises_interrupted_carrying_the_vote(smollm2_q: ps.Engine) -> None:
    eng = smollm2_q
    ids = _prompt(eng)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(ps.Interrupted) as caught:
            eng.generate(ids, max_new_tokens=4000, strategy=SC)
    finally:
        timer.cancel()
    assert isinstance(caught.value, KeyboardInterrupt)
    out = caught.value.outputs
    assert isinstance(out, ps.GenerationOutput) and out.finish_reason == "interrupted"
    answer, votes = _expected_vote(out.candidates)
    assert out.answer == answer and out.votes == votes
    # The engine stays usable.
    assert eng.generate(ids, max_new_tokens=4).finish_reason == "length"
