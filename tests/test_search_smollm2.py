"""Search strategies on the packaged SmolLM2-135M: beam search against transformers' generate
(pinned: checked against transformers 5.24.0), and every strategy with small settings."""

from __future__ import annotations

import peftscale as ps
import pytest
import torch
from transformers import GenerationConfig

pytestmark = pytest.mark.integration

CHAT = [
    "Answer with one word: what colour is the sky?",
    "Is 7 a prime number? Reply yes or no.",
    "Say hi.",
]
PLAIN = ["The capital of France is", "def fibonacci(n):"]
# (num_beams, length_penalty, early_stopping, num_return_sequences): every value of each
# parameter appears, spread over the prompts to keep the suite short.
GRID = [
    (2, 1.0, False, 1),
    (2, 0.0, "never", 2),
    (4, 2.0, True, 4),
    (4, 1.0, "never", 1),
    (8, 0.0, False, 8),
    (8, 2.0, True, 1),
    (4, 0.0, True, 2),
]


def _prompts(eng: ps.Engine) -> list[list[int]]:
    chats = [eng.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    return [eng.tokenizer.encode(p) for p in chats + PLAIN]


def test_beam_search_matches_transformers(smollm2_f32: ps.Engine, hf_smollm2) -> None:
    model, _ = hf_smollm2
    eos = smollm2_f32.tokenizer.eos_token_ids
    eos_lengths: set[int] = set()
    for pi, ids in enumerate(_prompts(smollm2_f32)):
        for gi in range(pi, len(GRID), 2) if pi < 2 else (pi % len(GRID), (pi + 3) % len(GRID)):
            k, lp, early, nrs = GRID[gi]
            out = smollm2_f32.generate(
                ids,
                max_new_tokens=24,
                strategy=ps.BeamSearch(num_beams=k, length_penalty=lp, early_stopping=early, num_return_sequences=nrs),
            )
            config = GenerationConfig(
                num_beams=k,
                do_sample=False,
                length_penalty=lp,
                early_stopping=early,
                num_return_sequences=nrs,
                max_new_tokens=24,
                eos_token_id=eos,
                pad_token_id=eos[0],
                return_dict_in_generate=True,
                output_scores=True,
            )
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), generation_config=config)
            want = []
            for row in ref.sequences[:, len(ids) :].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                want.append(row[:cut])
            got = [c.token_ids for c in out.candidates]
            assert got == want, (pi, GRID[gi])
            assert out.token_ids == want[0]
            for c, s in zip(out.candidates, ref.sequences_scores.tolist(), strict=True):
                assert abs(c.score - s) <= 1e-4 * max(1.0, abs(s)), (pi, GRID[gi], c.score, s)
                if c.finish_reason == "eos":
                    eos_lengths.add(len(c.token_ids))
            # The prompt once, then one token per running beam per step.
            assert out.stats.tokens_forwarded == len(ids) + k * (out.stats.forward_passes - 1)
    # Hypotheses finished on EOS at different steps.
    assert len(eos_lengths) >= 2


def test_every_strategy_runs_on_the_packaged_model(smollm2_q: ps.Engine) -> None:
    eng = smollm2_q
    q = eng.apply_chat_template([{"role": "user", "content": "What is 3 + 4? End with the number."}])
    sampling = ps.Sampling(temperature=0.7, seed=1)
    bon = eng.generate(q, max_new_tokens=24, strategy=ps.BestOfN(n=4, sampling=sampling))
    assert len(bon.candidates) == 4 and bon.score == max(c.score for c in bon.candidates)
    sc = eng.generate(q, max_new_tokens=24, strategy=ps.SelfConsistency(n=4, sampling=sampling))
    assert sum(sc.votes.values()) == sum(c.answer is not None for c in sc.candidates)
    assert sc.answer is None or sc.answer == max(sc.votes, key=sc.votes.get)
    tot = eng.generate(
        q,
        max_new_tokens=48,
        strategy=ps.TreeOfThought(proposals=2, breadth=2, depth=2, value_samples=1, max_step_tokens=16),
    )
    assert tot.tree is not None and 1 <= tot.tree.max_depth <= 2 and tot.text is not None
    mcts = eng.generate(
        q, max_new_tokens=32, strategy=ps.MCTS(iterations=3, expansions=2, max_depth=3, max_step_tokens=12)
    )
    assert mcts.tree is not None and mcts.tree.nodes[0].visits >= 3 and mcts.text
    adaptive = eng.generate(
        [q, eng.apply_chat_template([{"role": "user", "content": "What is 10 - 2?"}])],
        max_new_tokens=16,
        strategy=ps.Adaptive(budget_tokens=256, probe=2, max_n=6, bins=2),
    )
    assert len(adaptive) == 2 and all(len(o.candidates) >= 2 for o in adaptive)
