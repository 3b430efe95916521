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
    # Self-consistency draws the same paths as best-of-N with the same sampling, and its answer
    # and votes are the shared vote over them.
    sc = eng.generate(q, max_new_tokens=24, strategy=ps.SelfConsistency(n=4, sampling=sampling))
    assert [c.token_ids for c in sc.candidates] == [c.token_ids for c in bon.candidates]
    tally = ps.vote([c.text or "" for c in sc.candidates])
    assert sc.votes == dict(tally) and sc.answer == (tally[0][0] if tally else None)
    # Tree-of-Thought: 2 proposals from the root, 2 from each of the 2 kept, unless a step ended
    # its path; the returned text is the chosen path's steps.
    tot = eng.generate(
        q,
        max_new_tokens=48,
        strategy=ps.TreeOfThought(proposals=2, breadth=2, depth=2, value_samples=1, max_step_tokens=16),
    )
    nodes = tot.tree.nodes
    level1 = tot.tree.children(0)
    assert len(level1) == 2
    open_states = [c for c in level1 if not nodes[c].terminal]
    assert sum(len(tot.tree.children(c)) for c in level1) == 2 * len(open_states)

    # The answer: the best complete state kept (at the full depth or ended), by value, the first
    # on ties; its ancestors are on the returned path.
    def key(i: int) -> tuple[bool, int, float, int]:
        complete = nodes[i].terminal or nodes[i].depth >= 2
        return (complete, 0 if complete else nodes[i].depth, nodes[i].value, -i)

    leaf = max((i for i, n in enumerate(nodes) if i and n.selected), key=key)
    assert tot.score == nodes[leaf].value
    at = leaf
    while at:
        assert nodes[at].selected
        at = nodes[at].parent
    # MCTS: every back-propagation passes through the root, and the returned path follows the
    # most visited child at each level.
    mcts = eng.generate(
        q, max_new_tokens=32, strategy=ps.MCTS(iterations=3, expansions=2, max_depth=3, max_step_tokens=12)
    )
    nodes = mcts.tree.nodes
    assert nodes[0].visits == sum(nodes[c].visits for c in mcts.tree.children(0))
    expected, at = [0], 0
    while mcts.tree.children(at):
        kids = mcts.tree.children(at)
        at = max(kids, key=lambda c: (nodes[c].visits, nodes[c].value, -c))
        expected.append(at)
    assert [i for i, n in enumerate(nodes) if n.selected] == expected
    # Adaptive: each question's answer is the vote over its paths, and the spends add up.
    adaptive = eng.generate(
        [q, eng.apply_chat_template([{"role": "user", "content": "What is 10 - 2?"}])],
        max_new_tokens=16,
        strategy=ps.Adaptive(budget_tokens=256, probe=2, max_n=6, bins=2),
    )
    assert len(adaptive) == 2
    for out in adaptive:
        tally = ps.vote([c.text or "" for c in out.candidates])
        assert out.answer == (tally[0][0] if tally else None)
    assert sum(o.tokens_spent for o in adaptive) == adaptive[0].stats.tokens_forwarded
