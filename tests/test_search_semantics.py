"""What the search strategies promise, each held to an oracle on a tiny random model (issue 31,
items 5-7): Tree-of-Thought's path budget, its stop strings, proposals and answers; MCTS
rollouts; the weighted vote; adaptive compute's equal shares and its minimum."""

from __future__ import annotations

import math
from pathlib import Path

import peftscale as ps
import pytest

PROMPT = list(range(300, 312))
DELIM = "\n\n\n"


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> ps.Engine:
    return ps.Engine.load(tiny_llama, dtype="f32")


def _path_tokens(out: ps.GenerationOutput) -> int:
    return len(out.token_ids)


def test_tot_max_new_tokens_bounds_the_whole_path(tiny: ps.Engine) -> None:
    # Steps of up to 5 tokens, 4 levels: 20 tokens unbounded; max_new_tokens=7 bounds the path.
    strategy = ps.TreeOfThought(
        proposals=2, breadth=2, depth=4, evaluator=lambda _p, s: float(len(s)), max_step_tokens=5, step_delimiter=DELIM
    )
    out = tiny.generate(PROMPT, max_new_tokens=7, strategy=strategy, ignore_eos=True)
    assert _path_tokens(out) <= 7
    nodes = out.tree.nodes
    for i, n in enumerate(nodes[1:], 1):
        # The tokens from the root to each state, this state's included, stay within the budget.
        total, at = 0, i
        while at:
            total += nodes[at].token_count
            at = nodes[at].parent
        assert total <= 7, (i, total)
        # A state that spent the budget ends its path.
        if total == 7:
            assert n.terminal and not out.tree.children(i)
    unbounded = tiny.generate(PROMPT, max_new_tokens=64, strategy=strategy, ignore_eos=True)
    assert _path_tokens(unbounded) > 7


def test_tot_a_stop_string_ends_the_path_and_the_answer_is_extracted(tiny: ps.Engine) -> None:
    strategy = ps.TreeOfThought(
        proposals=2, breadth=2, depth=3, evaluator=lambda _p, s: float(len(s)), max_step_tokens=4, step_delimiter=DELIM
    )
    free = tiny.generate(PROMPT, max_new_tokens=40, strategy=strategy, ignore_eos=True)
    first_steps = [free.tree.nodes[c].text for c in free.tree.children(0)]
    stop = first_steps[0][1:3]
    assert stop.strip() and DELIM not in stop
    cut = tiny.generate(PROMPT, max_new_tokens=40, strategy=strategy, stop=[stop], ignore_eos=True)
    for c in cut.tree.children(0):
        node = cut.tree.nodes[c]
        if stop in node.text:
            # A step that ended at the caller's stop string is a finished path: never expanded.
            assert node.terminal and not cut.tree.children(c)
    assert any(stop in cut.tree.nodes[c].text for c in cut.tree.children(0))
    # With an extractor, out.answer is the chosen path's answer (None without one).
    answered = ps.TreeOfThought(
        proposals=2,
        breadth=2,
        depth=2,
        evaluator=lambda _p, s: float(len(s)),
        max_step_tokens=4,
        step_delimiter=DELIM,
        extract=lambda text: f"len={len(text)}",
    )
    out = tiny.generate(PROMPT, max_new_tokens=20, strategy=answered, ignore_eos=True)
    assert out.answer == f"len={len(tiny.tokenizer.decode(out.token_ids))}"
    assert free.answer is None


def test_tot_propose_turns_each_line_of_one_completion_into_a_state(tiny: ps.Engine) -> None:
    greedy = ps.Sampling(temperature=0.0)
    strategy = ps.TreeOfThought(
        generate="propose",
        proposals=3,
        breadth=3,
        depth=1,
        evaluator=lambda _p, s: 0.0,
        max_step_tokens=6,
        sampling=greedy,
        step_delimiter="\n",
        propose_template="{problem} next:",
    )
    out = tiny.generate(PROMPT, max_new_tokens=30, strategy=strategy)
    # The propose prompt, run alone greedily with the same cap and stop, gives the same lines.
    problem = tiny.tokenizer.decode(PROMPT)
    reply = tiny.generate(f"{problem} next:", max_new_tokens=6 * 3, stop=["\n\n"])
    lines = [line.strip() for line in (reply.text or "").splitlines() if line.strip()][:3]
    assert [out.tree.nodes[c].text for c in out.tree.children(0)] == [f"{line}\n" for line in lines]


def test_mcts_rollouts_are_the_greedy_continuations_of_their_nodes(tiny: ps.Engine) -> None:
    strategy = ps.MCTS(
        iterations=1,
        expansions=1,
        max_depth=1,
        max_step_tokens=3,
        step_delimiter=DELIM,
        reward=lambda _p, _t: 1.0,
        sampling=ps.Sampling(temperature=1.0, seed=2),
    )
    out = tiny.generate(PROMPT, max_new_tokens=10, strategy=strategy, ignore_eos=True)
    node = out.tree.nodes[1]
    step, rollout = out.token_ids[: node.token_count], out.token_ids[node.token_count :]
    assert node.rollout_tokens == len(rollout) == 10 - len(step)
    alone = tiny.generate(PROMPT + step, max_new_tokens=len(rollout), ignore_eos=True)
    assert rollout == alone.token_ids


def test_the_weighted_vote_weighs_each_path_by_its_mean_token_probability(tiny: ps.Engine) -> None:
    answers = ["7", "5", "7", "5", "9"]
    it = iter(answers)
    out = tiny.generate(
        PROMPT,
        max_new_tokens=4,
        strategy=ps.SelfConsistency(n=5, vote="weighted", extract=lambda _t: next(it), sampling=ps.Sampling(seed=3)),
    )
    weights: dict[str, float] = {}
    for c, a in zip(out.candidates, answers, strict=True):
        weights[a] = weights.get(a, 0.0) + math.exp(sum(c.logprobs) / len(c.logprobs))
    assert out.votes == pytest.approx(weights, rel=1e-5)
    assert out.answer == max(weights, key=lambda a: weights[a])


def test_adaptive_gives_equally_hard_questions_equal_shares(tiny: ps.Engine) -> None:
    # Four copies of one prompt disagree identically; before, bins were cut by rank, so equal
    # questions could fall in different bins and get different shares.
    def extract(text: str) -> str:
        return str(len(text) % 3)

    outs = tiny.generate(
        [PROMPT] * 4 + [PROMPT[:6]],
        max_new_tokens=4,
        strategy=ps.Adaptive(budget_tokens=400, probe=3, max_n=20, bins=3, extract=extract),
        ignore_eos=True,
    )
    copies = outs[:4]
    assert len({len(o.candidates) for o in copies}) == 1
    assert len({o.tokens_spent for o in copies[1:]}) == 1
    assert len(copies[0].candidates) > 3, "the copies' probes must disagree for this test"


def test_adaptive_min_n_samples_every_question_even_when_probes_agree(tiny: ps.Engine) -> None:
    agree = ps.Adaptive(budget_tokens=400, probe=2, max_n=8, bins=2, extract=lambda _t: "1")
    assert all(len(o.candidates) == 2 for o in tiny.generate([PROMPT] * 2, max_new_tokens=4, strategy=agree))
    floor = ps.Adaptive(budget_tokens=400, probe=2, min_n=5, max_n=8, bins=2, extract=lambda _t: "1")
    assert all(len(o.candidates) == 5 for o in tiny.generate([PROMPT] * 2, max_new_tokens=4, strategy=floor))
    with pytest.raises(ps.InvalidArgument, match="min_n"):
        tiny.generate([PROMPT], max_new_tokens=4, strategy=ps.Adaptive(probe=2, min_n=9, max_n=8))
