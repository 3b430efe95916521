"""Test-time search strategies on tiny random models, with scripted scorers, extractors,
evaluators and rewards that pin each algorithm down; token counts against the theoretical ones;
bad parameters and failing callbacks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import peftscale as ps
import pytest

PROMPT = list(range(300, 312))


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> ps.Engine:
    return ps.Engine.load(tiny_llama, dtype="f32")


def _scripted(values: list):
    """A callback returning `values` in call order (then the last one)."""
    it = iter(values)
    last = [values[-1]]

    def f(*_args: str):
        try:
            last[0] = next(it)
        except StopIteration:
            pass
        return last[0]

    return f


def test_best_of_n_returns_the_scorer_pick_and_runs_the_prompt_once(tiny: ps.Engine) -> None:
    out = tiny.generate(PROMPT, max_new_tokens=6, strategy=ps.BestOfN(n=5, sampling=ps.Sampling(seed=3)))
    assert len(out.candidates) == 5
    means = [sum(c.logprobs) / len(c.logprobs) for c in out.candidates]
    for c, m in zip(out.candidates, means, strict=True):
        assert c.score == pytest.approx(m, abs=1e-5)
    assert out.token_ids == out.candidates[max(range(5), key=lambda i: (means[i], -i))].token_ids
    # The prompt once, then every generated token except each candidate's last.
    expected = len(PROMPT) + sum(len(c.token_ids) - 1 for c in out.candidates)
    assert out.stats.tokens_forwarded == expected

    # A scripted verifier: the candidate it scores highest wins, the first on ties.
    scores = [0.1, 0.7, 0.7, -2.0, 0.3]
    picked = tiny.generate(
        PROMPT,
        max_new_tokens=6,
        strategy=ps.BestOfN(n=5, sampling=ps.Sampling(seed=3), scorer=_scripted(scores)),
    )
    assert [c.score for c in picked.candidates] == pytest.approx(scores)
    assert picked.token_ids == picked.candidates[1].token_ids
    summed = tiny.generate(
        PROMPT, max_new_tokens=6, strategy=ps.BestOfN(n=5, sampling=ps.Sampling(seed=3), scorer="sum_logprob")
    )
    sums = [sum(c.logprobs) for c in summed.candidates]
    assert summed.score == pytest.approx(max(sums), abs=1e-4)


def test_streaming_a_search_yields_its_answer_at_the_end(tiny: ps.Engine) -> None:
    strategy = ps.BestOfN(n=3, sampling=ps.Sampling(seed=4))
    out = tiny.generate(PROMPT, max_new_tokens=5, strategy=strategy)
    assert "".join(tiny.stream(PROMPT, max_new_tokens=5, strategy=strategy)) == out.text


def test_same_seed_same_candidates(tiny: ps.Engine) -> None:
    s = ps.BestOfN(n=3, sampling=ps.Sampling(seed=11))
    a = tiny.generate(PROMPT, max_new_tokens=5, strategy=s)
    b = tiny.generate([PROMPT, PROMPT[:5]], max_new_tokens=5, strategy=s)[0]
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]


def test_self_consistency_majority_tie_goes_to_the_first_answer(tiny: ps.Engine) -> None:
    out = tiny.generate(
        PROMPT,
        max_new_tokens=4,
        strategy=ps.SelfConsistency(n=6, extract=_scripted(["7", "5", None, "5", "7", "9"])),
    )
    assert out.votes == {"7": 2.0, "5": 2.0, "9": 1.0}
    assert out.answer == "7"
    assert [c.answer for c in out.candidates] == ["7", "5", None, "5", "7", "9"]
    assert out.token_ids == out.candidates[0].token_ids
    weighted = tiny.generate(
        PROMPT,
        max_new_tokens=4,
        strategy=ps.SelfConsistency(
            n=4, extract=_scripted(["7", "5", "5", "7"]), vote="weighted", scorer=_scripted([0.1, 0.5, 0.2, 0.1])
        ),
    )
    assert weighted.answer == "5" and weighted.votes["5"] == pytest.approx(0.7)


def _beta_upper(top: int, second: int) -> float:
    """P(X > 1/2) for X ~ Beta(top + 1, second + 1), by numerical integration."""
    a, b, steps = top + 1, second + 1, 20000
    xs = [(i + 0.5) / steps for i in range(steps)]
    dens = [x ** (a - 1) * (1 - x) ** (b - 1) for x in xs]
    return sum(d for x, d in zip(xs, dens, strict=True) if x > 0.5) / sum(dens)


def test_beta_rule_stops_exactly_when_the_formula_says(tiny: ps.Engine) -> None:
    answers = ["A", "B", "A", "A", "A", "A", "A", "A", "A", "A", "A", "A"]
    expected = None
    for j in range(1, len(answers) + 1):
        seen = answers[:j]
        top, second = seen.count("A"), seen.count("B")
        if _beta_upper(top, second) >= 0.95:
            expected = j
            break
    assert expected is not None
    out = tiny.generate(
        PROMPT,
        max_new_tokens=3,
        strategy=ps.SelfConsistency(n=12, round_size=1, stop_when_confident=0.95, extract=_scripted(answers)),
    )
    assert len(out.candidates) == expected
    assert out.answer == "A"


def test_tot_bfs_keeps_breadth_states_per_level(tiny: ps.Engine) -> None:
    def value(_prompt: str, state: str) -> float:
        return float(sum(map(ord, state)) % 97)

    strategy = ps.TreeOfThought(
        proposals=3, breadth=2, depth=3, evaluator=value, max_step_tokens=3, step_delimiter="\n\n\n"
    )
    out = tiny.generate(PROMPT, max_new_tokens=32, strategy=strategy)
    nodes = out.tree.nodes
    for level in (1, 2, 3):
        at = [n for n in nodes if n.depth == level]
        assert len(at) == (3 if level == 1 else 6)
        kept = [n for n in at if n.selected]
        assert len(kept) == 2
        assert min(n.value for n in kept) >= max(n.value for n in at if not n.selected)
    assert out.score == max(n.value for n in nodes if n.depth == 3 and n.selected)


def test_tot_self_values_are_cut_at_value_max_tokens(tiny: ps.Engine) -> None:
    """The tree is the same whatever the cap (the random model's replies hold no verdict, so
    every value is 0); only the value replies' tokens change, by at most the cap per sample."""

    def spent(cap: int) -> tuple[int, int]:
        strategy = ps.TreeOfThought(
            proposals=2, breadth=1, depth=1, value_samples=2, value_max_tokens=cap, max_step_tokens=3,
            step_delimiter="\n\n\n", value_template="{state} ->",
        )  # fmt: skip
        out = tiny.generate(PROMPT, max_new_tokens=8, strategy=strategy)
        return out.stats.tokens_forwarded, len(out.tree.nodes)

    (few, nodes), (more, same_nodes) = spent(1), spent(9)
    assert nodes == same_nodes == 3
    # Two states, two samples each; each sample forwards up to cap - 1 more tokens.
    assert few < more <= few + 2 * 2 * 8


def test_tot_dfs_backtracks_below_the_threshold(tiny: ps.Engine) -> None:
    # Root -> A (5), B (3); A -> A1 (0), A2 (0): both pruned, back to B -> B1 (0), B2 (2).
    strategy = ps.TreeOfThought(
        proposals=2,
        depth=2,
        search="dfs",
        value_threshold=1.0,
        evaluator=_scripted([5.0, 3.0, 0.0, 0.0, 0.0, 2.0]),
        max_step_tokens=3,
        step_delimiter="\n\n\n",
    )
    out = tiny.generate(PROMPT, max_new_tokens=32, strategy=strategy)
    nodes = out.tree.nodes
    assert len(nodes) == 7
    a, b = out.tree.children(0)
    assert nodes[a].value == 5.0 and nodes[b].value == 3.0
    a1, a2 = out.tree.children(a)
    b1, b2 = out.tree.children(b)
    assert not nodes[a1].selected and not nodes[a2].selected and not nodes[b1].selected
    assert nodes[b2].selected and out.score == 2.0


def test_mcts_prefers_the_rewarded_branch_and_counts_add_up(tiny: ps.Engine) -> None:
    delimiter = "\n\n\n"
    first: list[str] = []

    def reward(_prompt: str, text: str) -> float:
        if not first:
            first.append(text[:8])
        return 1.0 if text.startswith(first[0]) else 0.0

    out = tiny.generate(
        PROMPT,
        max_new_tokens=12,
        strategy=ps.MCTS(
            iterations=8,
            expansions=3,
            max_step_tokens=3,
            step_delimiter=delimiter,
            reward=reward,
            sampling=ps.Sampling(temperature=1.0, seed=5),
        ),
    )
    nodes = out.tree.nodes
    root_children = out.tree.children(0)
    assert len(root_children) == 3
    visits = [nodes[c].visits for c in root_children]
    rewarded = [c for c in root_children if nodes[c].value > 0]
    assert nodes[root_children[0]].value > 0
    assert nodes[root_children[visits.index(max(visits))]].value > 0 and rewarded
    # A node's visits are its own back-ups plus its children's: the root has none of its own, an
    # expanded node exactly one (its evaluation; only leaves that cannot be expanded are counted
    # again), a leaf at least one.
    for i, n in enumerate(nodes):
        kids = out.tree.children(i)
        own = n.visits - sum(nodes[c].visits for c in kids)
        assert own == (0 if i == 0 else 1) if kids else own >= 1, (i, own)
    assert nodes[0].visits == sum(visits)
    # The prompt once, each step's tokens (a terminal step's last one is never fed), each
    # rollout's tokens but its last.
    expected = len(PROMPT) + sum(
        n.token_count - (1 if n.terminal else 0) + max(n.rollout_tokens - 1, 0) for n in nodes[1:]
    )
    assert out.stats.tokens_forwarded == expected


def test_adaptive_spends_more_where_probes_disagree(tiny: ps.Engine) -> None:
    answers = ["1", "1", "1", "1", "1", "2", "3", "4"] + ["9"] * 100
    out = tiny.generate(
        [PROMPT, PROMPT[:6] + [900]],
        max_new_tokens=4,
        strategy=ps.Adaptive(budget_tokens=200, probe=4, max_n=12, bins=2, extract=_scripted(answers)),
        ignore_eos=True,
    )
    settled, unsettled = out
    assert len(settled.candidates) == 4 and settled.answer == "1"
    assert len(unsettled.candidates) > 4
    assert unsettled.tokens_spent > settled.tokens_spent
    assert settled.tokens_spent + unsettled.tokens_spent == settled.stats.tokens_forwarded


def test_beam_search_forwards_each_prompt_once(tiny: ps.Engine) -> None:
    for k in (1, 3):
        out = tiny.generate(PROMPT, max_new_tokens=7, strategy=ps.BeamSearch(num_beams=k), ignore_eos=True)
        assert out.stats.tokens_forwarded == len(PROMPT) + k * (out.stats.forward_passes - 1)
        assert len(out.token_ids) == 7


@pytest.mark.parametrize(
    ("strategy", "name"),
    [
        (ps.BestOfN(n=0), "n"),
        (ps.SelfConsistency(n=0), "n"),
        (ps.BeamSearch(num_beams=0), "num_beams"),
        (ps.BeamSearch(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (ps.TreeOfThought(breadth=0), "breadth"),
        (ps.TreeOfThought(depth=0), "depth"),
        (ps.TreeOfThought(value_max_tokens=0), "value_max_tokens"),
        (ps.MCTS(c_puct=-1.0), "c_puct"),
        (ps.MCTS(iterations=0), "iterations"),
        (ps.Adaptive(budget_tokens=10, probe=4), "budget_tokens"),
        (ps.SelfConsistency(stop_when_confident=0.3), "stop_when_confident"),
        (ps.BestOfN(sampling=ps.Sampling(top_p=0.0)), "top_p"),
        (ps.SelfConsistency(extract=5), "extract"),
        (ps.BestOfN(scorer=5), "scorer"),
    ],
)
def test_bad_parameters_name_themselves(tiny: ps.Engine, strategy: ps.Strategy, name: str) -> None:
    with pytest.raises(ps.InvalidArgument, match=name):
        tiny.generate(PROMPT, max_new_tokens=4, strategy=strategy)


def test_failing_callbacks_surface_and_leave_the_engine_usable(tiny: ps.Engine) -> None:
    class Boom(RuntimeError):
        pass

    def raises(_p: str, _c: str) -> float:
        raise Boom("verifier crashed")

    with pytest.raises(Boom, match="verifier crashed"):
        tiny.generate(PROMPT, max_new_tokens=3, strategy=ps.BestOfN(n=2, scorer=raises))
    with pytest.raises(TypeError, match="must return a number.*'high'"):
        tiny.generate(PROMPT, max_new_tokens=3, strategy=ps.BestOfN(n=2, scorer=lambda p, c: "high"))
    with pytest.raises(ps.CallbackError, match="finite"):
        tiny.generate(PROMPT, max_new_tokens=3, strategy=ps.BestOfN(n=2, scorer=lambda p, c: math.nan))
    with pytest.raises(TypeError, match="str or None"):
        tiny.generate(PROMPT, max_new_tokens=3, strategy=ps.SelfConsistency(n=2, extract=lambda t: 3))
    with pytest.raises(ZeroDivisionError):
        tiny.generate(PROMPT, max_new_tokens=8, strategy=ps.MCTS(iterations=2, reward=lambda p, t: 1 / 0))
    ok = tiny.generate(PROMPT, max_new_tokens=3, strategy=ps.BestOfN(n=2))
    assert len(ok.candidates) == 2


def test_thread_count_does_not_change_results(tiny_llama: Path) -> None:
    import subprocess
    import sys

    code = (
        "import peftscale as ps, sys; e = ps.Engine.load(sys.argv[1], dtype='f32');"
        "o = e.generate(list(range(300, 312)), max_new_tokens=6, strategy=ps.SelfConsistency(n=4));"
        "print([c.token_ids for c in o.candidates])"
    )
    outs = set()
    for threads in ("1", "2"):
        env = {**__import__("os").environ, "PEFTSCALE_NUM_THREADS": threads}
        r = subprocess.run([sys.executable, "-c", code, str(tiny_llama)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout)
    assert len(outs) == 1


@pytest.fixture(scope="module")
def tiny_with_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> ps.Engine:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("tiny_adapter")
    get_peft_model(base, cfg).save_pretrained(folder)
    eng = ps.Engine.load(tiny_llama, dtype="f32")
    eng.load_adapter(folder, "a")
    return eng


def test_cold_as_the_token_scorer(tiny_with_adapter: ps.Engine) -> None:
    eng = tiny_with_adapter
    # With every token plausible and no contrast, CoLD's scores are the expert's logits: the
    # search must equal the same search with the adapter alone, at twice the tokens (the base
    # twins).
    neutral = ps.CoLD(alpha=1e-30, beta=0.0)
    plain = eng.generate(PROMPT, max_new_tokens=6, strategy=ps.BeamSearch(num_beams=3), adapter="a", ignore_eos=True)
    cold = eng.generate(
        PROMPT, max_new_tokens=6, strategy=ps.BeamSearch(num_beams=3, scorer=neutral), adapter="a", ignore_eos=True
    )
    assert [c.token_ids for c in cold.candidates] == [c.token_ids for c in plain.candidates]
    assert cold.score == pytest.approx(plain.score, abs=1e-5)
    assert cold.stats.tokens_forwarded == 2 * plain.stats.tokens_forwarded
    s = ps.Sampling(temperature=1.0, seed=2)
    bon = eng.generate(PROMPT, max_new_tokens=5, strategy=ps.BestOfN(n=3, sampling=s), adapter="a")
    bon_cold = eng.generate(PROMPT, max_new_tokens=5, strategy=ps.BestOfN(n=3, sampling=s, scorer=neutral), adapter="a")
    assert [c.token_ids for c in bon_cold.candidates] == [c.token_ids for c in bon.candidates]
    # A real contrast changes the beams, and CoLD without an adapter is refused.
    strong = eng.generate(
        PROMPT,
        max_new_tokens=6,
        strategy=ps.BeamSearch(num_beams=3, scorer=ps.CoLD(alpha=1e-30, beta=4.0)),
        adapter="a",
        ignore_eos=True,
    )
    assert [c.token_ids for c in strong.candidates] != [c.token_ids for c in plain.candidates]
    with pytest.raises(ps.InvalidArgument, match="adapter"):
        eng.generate(PROMPT, max_new_tokens=3, strategy=ps.SelfConsistency(n=2, scorer=neutral))
    sc = eng.generate(PROMPT, max_new_tokens=4, strategy=ps.SelfConsistency(n=2, scorer=neutral), adapter="a")
    assert len(sc.candidates) == 2


@pytest.mark.parametrize(
    "strategy",
    [
        ps.BeamSearch(num_beams=3),
        ps.BestOfN(n=3),
        ps.SelfConsistency(n=3),
        ps.TreeOfThought(proposals=2, breadth=2, depth=3, evaluator=lambda _p, s: float(len(s)), max_step_tokens=3),
        ps.MCTS(iterations=4, expansions=2, max_step_tokens=3, reward=lambda _p, t: float(len(t) % 3)),
        ps.Adaptive(budget_tokens=60, probe=2, max_n=6, bins=2),
    ],
    ids=lambda s: type(s).__name__,
)
def test_every_search_cut_short_by_a_timeout_returns_one_row_per_prompt(tiny: ps.Engine, strategy) -> None:
    # A deadline already passed ends the call after its first pass (the prompts' prefill and each
    # path's first token), before any path finished: nothing is voted or chosen; beam search
    # returns its running beams, one token each, the best first.
    outs = tiny.generate([PROMPT, PROMPT[:5]], max_new_tokens=12, strategy=strategy, ignore_eos=True, timeout_s=0)
    assert len(outs) == 2
    for o in outs:
        assert o.finish_reason == "timeout"
        if isinstance(strategy, ps.BeamSearch):
            assert [len(c.token_ids) for c in o.candidates] == [1]
            assert o.token_ids == o.candidates[0].token_ids
        else:
            assert (o.token_ids, o.candidates, o.answer, o.votes) == ([], [], None, {})
    # Without the timeout the same search finishes on its own.
    full = tiny.generate([PROMPT, PROMPT[:5]], max_new_tokens=12, strategy=strategy, ignore_eos=True)
    assert all(o.finish_reason != "timeout" and o.token_ids for o in full)


def test_self_consistency_cut_short_votes_over_the_finished_round(tiny: ps.Engine) -> None:
    """Rounds of two samples of four tokens: after six passes the first round has finished and
    the second has not. Ended there, the search votes over the first round's two samples."""
    strategy = ps.SelfConsistency(
        n=6, round_size=2, stop_when_confident=0.99, extract=_scripted(["3", "4", "3", "5", "6", "7"])
    )
    gen = tiny._core.start([PROMPT], adapters=[None], **tiny._kwargs(4, strategy, None, True, None))
    for _ in range(6):
        gen.step()
    assert not gen.done
    gen.finish_early("timeout")
    out = ps.GenerationOutput._from_core(gen.outputs()[0])
    assert out.finish_reason == "timeout"
    assert [c.answer for c in out.candidates] == ["3", "4"]
    assert out.votes == {"3": 1.0, "4": 1.0} and out.answer == "3"
    assert out.token_ids == out.candidates[0].token_ids


@pytest.mark.parametrize(
    ("strategy", "name"),
    [
        (ps.BestOfN(n=2, scorer=ps.CoLD(sample=True)), "CoLD.sample"),
        (ps.SelfConsistency(n=2, scorer=ps.CoLD(temperature=0.5)), "CoLD.temperature"),
        (ps.BeamSearch(num_beams=2, scorer=ps.CoLD(seed=3)), "CoLD.seed"),
        (ps.MCTS(iterations=1, scorer=ps.CoLD(paired=False)), "CoLD.paired"),
        (ps.SelfConsistency(n=2, scorer=lambda p, c: 1.0), "vote='weighted'"),
        (ps.SelfConsistency(n=2, round_size=3), "round_size"),
        (ps.TreeOfThought(propose_template="{problem}"), "propose_template"),
        (ps.TreeOfThought(evaluator=lambda p, s: 1.0, value_samples=5), "value_samples"),
        (ps.TreeOfThought(evaluator=lambda p, s: 1.0, value_template="{state}"), "value_template"),
        (ps.TreeOfThought(value_threshold=0.5), "value_threshold"),
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_parameters_without_effect_are_refused(tiny_with_adapter: ps.Engine, strategy: ps.Strategy, name: str) -> None:
    with pytest.raises(ps.InvalidArgument, match=re.escape(name)):
        tiny_with_adapter.generate(PROMPT, max_new_tokens=3, strategy=strategy, adapter="a")


def test_cold_in_a_search_honours_the_search_sampling(tiny_with_adapter: ps.Engine) -> None:
    """top_k=1 leaves one token to draw from the contrastive scores: every sample is CoLD's greedy
    decode (before, a search's top-k/top-p/min-p/repetition penalty were ignored under CoLD)."""
    eng = tiny_with_adapter
    cold = ps.CoLD(alpha=0.05, beta=1.0)
    greedy = eng.generate(PROMPT, max_new_tokens=6, strategy=cold, adapter="a", ignore_eos=True)
    bon = eng.generate(
        PROMPT,
        max_new_tokens=6,
        strategy=ps.BestOfN(n=3, sampling=ps.Sampling(temperature=1.5, top_k=1, seed=4), scorer=cold),
        adapter="a",
        ignore_eos=True,
    )
    assert [c.token_ids for c in bon.candidates] == [greedy.token_ids] * 3
    # Without the cap the draws differ.
    free = eng.generate(
        PROMPT,
        max_new_tokens=6,
        strategy=ps.BestOfN(n=3, sampling=ps.Sampling(temperature=1.5, seed=4), scorer=cold),
        adapter="a",
        ignore_eos=True,
    )
    assert len({tuple(c.token_ids) for c in free.candidates}) > 1


def test_beam_search_ends_a_beam_at_a_stop_string(tiny: ps.Engine) -> None:
    free = tiny.generate(PROMPT, max_new_tokens=10, strategy=ps.BeamSearch(num_beams=3), ignore_eos=True)
    text = free.text or ""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the random model's text must hold a stop string to test"
    out = tiny.generate(PROMPT, max_new_tokens=10, strategy=ps.BeamSearch(num_beams=3), stop=[stop], ignore_eos=True)
    stopped = [c for c in out.candidates if c.finish_reason == "stop"]
    assert stopped, "the stop string must end a beam"
    for c in stopped:
        full = tiny.tokenizer.decode(c.token_ids)
        assert stop in full and stop not in (c.text or "")
        assert full.startswith(c.text or "")
        # It ends the beam as soon as it appears: the text before the last token lacks it.
        assert stop not in tiny.tokenizer.decode(c.token_ids[:-1])
