"""Searches guided by a verifier in the engine, against the training side's torch verifier on the
packaged model: every score a search reports is the torch model's on the same tokens, verifier rows
leave the policy's samples unchanged, votes and aggregations are their closed forms, and the
verifier costs rows, not passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peftscale as ps
import pytest
import torch
from peftscale import cli
from peftscale.train import verifier
from test_verifier_engine import build_verifier

NAME = "rand-prm"
QUESTIONS = [
    "Tom has 3 boxes with 4 pens each. He gives away 5 pens. How many pens does he have? Think step by step.",
    "What is 12 + 7 * 2? Explain each step on its own line.",
]


@pytest.fixture(scope="module")
def smol_verifier(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A random (non-trivial) verifier on the packaged model, with its torch reference."""
    path = build_verifier(smollm2_path, tmp_path_factory.mktemp("smol_prm"), seed=5)
    vmodel, vtok = verifier.load(path, base_model=smollm2_path)
    return path, vmodel, vtok


@pytest.fixture(scope="module")
def eng(smollm2_f32: ps.Engine, smol_verifier):
    smollm2_f32.load_verifier(smol_verifier[0], NAME)
    yield smollm2_f32
    smollm2_f32.unload_verifier(NAME)


def _prompts(eng: ps.Engine) -> list[str]:
    return [eng.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


@torch.no_grad()
def oracle_steps(smol_verifier, prompt_ids: list[int], tokens: list[int], eos: list[int]) -> list[float]:
    """The torch verifier's step probabilities for generated ``tokens`` after the prompt: read at
    the token holding each tag's last character, the text closed by a tag when it lacks one."""
    _, vmodel, vtok = smol_verifier
    tag = vmodel.meta["step_tag"]
    ids = list(tokens)
    while ids and ids[-1] in eos:
        ids.pop()
    if not vtok.decode(ids).endswith(tag):
        ids += vtok.encode(tag, add_special_tokens=False)
    text = vtok.decode(ids)
    ends, start = [], 0
    while (at := text.find(tag, start)) >= 0:
        start = at + len(tag)
        ends.append(start)
    positions: list[int] = []
    for end in ends:
        i = next(i for i in range(len(ids)) if len(vtok.decode(ids[: i + 1])) >= end)
        if not positions or positions[-1] != i:
            positions.append(i)
    full = prompt_ids + ids
    h = vmodel.hidden(torch.tensor([full]), torch.ones(1, len(full), dtype=torch.long))[0]
    logits = vmodel.head(h).squeeze(-1)
    return [1.0 / (1.0 + math.exp(-float(logits[len(prompt_ids) + i]))) for i in positions]


def test_best_of_n_ranks_by_the_verifier_as_torch_scores(eng, smol_verifier) -> None:
    prompts = _prompts(eng)
    eos = eng.tokenizer.eos_token_ids
    by_verifier = eng.generate(prompts, strategy=ps.BestOfN(n=4, scorer=ps.Verifier(NAME)), max_new_tokens=40)
    plain = eng.generate(prompts, strategy=ps.BestOfN(n=4), max_new_tokens=40)
    for prompt, out, ref in zip(prompts, by_verifier, plain, strict=True):
        ids = eng.tokenizer.encode(prompt)
        # The verifier's rows share the samples' passes without changing a single sampled token.
        assert [c.token_ids for c in out.candidates] == [c.token_ids for c in ref.candidates]
        for c in out.candidates:
            want = oracle_steps(smol_verifier, ids, c.token_ids, eos)
            assert c.step_scores == pytest.approx(want, abs=1e-4)
            assert c.score == pytest.approx(min(want), abs=1e-4)
        best = max(out.candidates, key=lambda c: c.score)
        assert out.token_ids == best.token_ids
        assert len({round(c.score, 6) for c in out.candidates}) > 1
    # One more pass at most: the last samples' scoring rows.
    assert by_verifier[0].stats.forward_passes <= plain[0].stats.forward_passes + 1
    # LoRA on every layer: nothing is shared with the base-model policy.
    assert by_verifier[0].stats.trunk_tokens == 0


def test_weighted_vote_sums_verifier_scores_per_answer(eng, smol_verifier) -> None:
    prompts = _prompts(eng)
    eos = eng.tokenizer.eos_token_ids
    outs = eng.generate(
        prompts,
        strategy=ps.SelfConsistency(n=6, vote="weighted", scorer=ps.Verifier(NAME)),
        max_new_tokens=48,
    )
    for prompt, out in zip(prompts, outs, strict=True):
        ids = eng.tokenizer.encode(prompt)
        totals: dict[str, float] = {}
        for c in out.candidates:
            want = oracle_steps(smol_verifier, ids, c.token_ids, eos)
            assert c.score == pytest.approx(min(want), abs=1e-4)
            if c.answer is not None:
                totals[c.answer] = totals.get(c.answer, 0.0) + c.score
        assert dict(out.votes) == pytest.approx(totals)
        if totals:
            assert out.answer == max(totals, key=lambda a: totals[a])


@pytest.mark.parametrize("strategy", [ps.VerifierBeamSearch, ps.DVTS])
def test_verifier_beam_scores_every_step_as_torch_does(eng, smol_verifier, strategy) -> None:
    prompts = _prompts(eng)
    eos = eng.tokenizer.eos_token_ids
    outs = eng.generate(
        prompts,
        strategy=strategy(n=4, beam_width=2, verifier=ps.Verifier(NAME), max_steps=6),
        max_new_tokens=64,
    )
    for prompt, out in zip(prompts, outs, strict=True):
        ids = eng.tokenizer.encode(prompt)
        assert out.candidates, "no beam finished"
        for c in out.candidates:
            want = oracle_steps(smol_verifier, ids, c.token_ids, eos)
            assert c.step_scores == pytest.approx(want, abs=1e-4), c.text
            assert c.score == pytest.approx(min(c.step_scores))
            assert len(c.step_scores) <= 6
        scores = [c.score for c in out.candidates]
        assert scores == sorted(scores, reverse=True)
        totals: dict[str, float] = {}
        for c in out.candidates:
            if c.answer is not None:
                totals[c.answer] = totals.get(c.answer, 0.0) + c.score
        assert dict(out.votes) == pytest.approx(totals)
        if totals:
            winner = max(totals, key=lambda a: totals[a])
            assert out.answer == winner
            assert out.token_ids == next(c.token_ids for c in out.candidates if c.answer == winner)


@pytest.fixture(scope="module")
def top_verifier(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A random verifier with LoRA on the top 10 of the 30 layers only: it computes what the
    base model does below them, so it shares those layers with a base-model policy."""
    path = build_verifier(
        smollm2_path, tmp_path_factory.mktemp("top_prm"), seed=6, layers=list(range(20, 30)), head_std=0.02
    )
    vmodel, vtok = verifier.load(path, base_model=smollm2_path)
    return path, vmodel, vtok


@pytest.mark.parametrize(
    "strategy",
    [
        ps.BestOfN(n=4, scorer=ps.Verifier("top")),
        ps.SelfConsistency(n=4, vote="weighted", scorer=ps.Verifier("top")),
        ps.VerifierBeamSearch(n=4, beam_width=2, verifier=ps.Verifier("top"), max_steps=6),
        ps.DVTS(n=4, beam_width=2, verifier=ps.Verifier("top"), max_steps=6),
    ],
    ids=["bon", "sc-w", "prm-beam", "dvts"],
)
def test_a_verifier_sharing_the_policys_layers_scores_as_torch_does(smollm2_f32, top_verifier, strategy) -> None:
    """The policy's rows keep their hidden states at layer 20; the verifier reads the generated
    text from there (its keys and values below copied from the policy's cache), and every score is
    still the torch verifier's on the whole model."""
    eng = smollm2_f32
    eng.load_verifier(top_verifier[0], "top")
    try:
        prompts = _prompts(eng)
        outs = eng.generate(prompts, strategy=strategy, max_new_tokens=40)
        eos = eng.tokenizer.eos_token_ids
        for prompt, out in zip(prompts, outs, strict=True):
            ids = eng.tokenizer.encode(prompt)
            assert out.candidates
            for c in out.candidates:
                want = oracle_steps(top_verifier, ids, c.token_ids, eos)
                assert c.step_scores == pytest.approx(want, abs=1e-4), c.text
            assert len({round(c.score, 6) for c in out.candidates}) > 1
        assert outs[0].stats.trunk_tokens > 0
    finally:
        eng.unload_verifier("top")


@pytest.mark.parametrize(
    "strategy",
    [
        ps.TreeOfThought(evaluator=ps.Verifier("top"), proposals=2, breadth=2, depth=3, max_step_tokens=16),
        ps.MCTS(reward=ps.Verifier("top"), iterations=4, expansions=2, max_step_tokens=12),
    ],
    ids=["tot", "mcts"],
)
def test_tree_searches_value_states_alike_shared_or_not(
    smollm2_f32, smollm2_path: Path, top_verifier, tmp_path: Path, strategy
) -> None:
    """A policy adapter whose update is exactly zero computes what the base model computes, but
    it is not the base model to the engine, so nothing is shared: the two runs pick the same
    thoughts and value every state alike."""
    from peft import LoraConfig, get_peft_model
    from peftscale.train.base import load_model, resolve

    zero = tmp_path / "zero"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")  # B = 0
    get_peft_model(load_model(resolve(str(smollm2_path))), lora).save_pretrained(str(zero))
    eng = smollm2_f32
    eng.load_adapter(zero, "zero")
    eng.load_verifier(top_verifier[0], "top")
    try:
        prompt = _prompts(eng)[1]
        shared = eng.generate(prompt, strategy=strategy, max_new_tokens=48)
        alone = eng.generate(prompt, strategy=strategy, max_new_tokens=48, adapter="zero")
        assert shared.stats.trunk_tokens > 0 and alone.stats.trunk_tokens == 0
        assert shared.text == alone.text
        assert [n.text for n in shared.tree.nodes] == [n.text for n in alone.tree.nodes]
        assert [n.value for n in shared.tree.nodes] == pytest.approx([n.value for n in alone.tree.nodes], abs=1e-5)
        assert len({round(n.value, 6) for n in shared.tree.nodes}) > 2
    finally:
        eng.unload_verifier("top")
        eng.unload_adapter("zero")


def test_verifier_search_parameters_are_checked(eng) -> None:
    with pytest.raises(ps.InvalidArgument, match=r"n \(6\) must be a multiple of beam_width \(4\)"):
        eng.generate("Hi", strategy=ps.VerifierBeamSearch(n=6, beam_width=4, verifier=ps.Verifier(NAME)))
    with pytest.raises(ps.InvalidArgument, match="no verifier named `nope` is loaded"):
        eng.generate("Hi", strategy=ps.DVTS(verifier=ps.Verifier("nope")))
    with pytest.raises(ps.InvalidArgument, match="only with vote='weighted'"):
        eng.generate("Hi", strategy=ps.SelfConsistency(scorer=ps.Verifier(NAME)))


def test_batched_callables_see_every_candidate_of_a_step_once(smollm2_q: ps.Engine) -> None:
    """A ``ps.batched`` scorer is called once per step with all of that step's candidates."""
    eng = smollm2_q
    q = eng.apply_chat_template([{"role": "user", "content": "What is 17 + 25? Answer briefly."}])
    calls: list[list[str]] = []

    @ps.batched
    def shortest(prompt: str, completions: list[str]) -> list[float]:
        assert "17 + 25" in prompt
        calls.append(list(completions))
        return [-float(len(c)) for c in completions]

    out = eng.generate(q, strategy=ps.BestOfN(n=6, scorer=shortest), max_new_tokens=24)
    assert len(calls) == 1 and calls[0] == [c.text for c in out.candidates]
    assert [c.score for c in out.candidates] == [-float(len(t)) for t in calls[0]]
    assert out.text == min(calls[0], key=len)

    calls.clear()
    out = eng.generate(q, strategy=ps.SelfConsistency(n=5, vote="weighted", scorer=shortest), max_new_tokens=24)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(c.text for c in out.candidates)

    calls.clear()
    tot = ps.TreeOfThought(evaluator=shortest, proposals=2, breadth=2, depth=2, max_step_tokens=12)
    out = eng.generate(q, strategy=tot, max_new_tokens=40)
    by_depth = [sum(1 for n in out.tree.nodes if n.depth == d) for d in (1, 2)]
    # One call per level, each with every new state of that level.
    assert [len(c) for c in calls] == [n for n in by_depth if n]

    calls.clear()
    mcts = ps.MCTS(reward=shortest, iterations=4, expansions=2, max_step_tokens=12)
    out = eng.generate(q, strategy=mcts, max_new_tokens=40)
    assert sum(len(c) for c in calls) == len(out.tree.nodes) - 1
    assert all(len(c) >= 1 for c in calls)

    @ps.batched
    def one_short(prompt: str, completions: list[str]) -> list[float]:
        return [0.0] * (len(completions) - 1)

    with pytest.raises(ps.CallbackError, match="returned 1 scores for 2 completions"):
        eng.generate(q, strategy=ps.BestOfN(n=2, scorer=one_short), max_new_tokens=8)

    @ps.batched
    def not_a_list(prompt: str, completions: list[str]) -> float:
        return 1.0

    with pytest.raises(TypeError, match="must return a list of numbers"):
        eng.generate(q, strategy=ps.BestOfN(n=2, scorer=not_a_list), max_new_tokens=8)


def test_eval_verifier_strategies_read_smaller_budgets_as_their_own_runs(
    smollm2_q: ps.Engine, smol_verifier, tmp_path: Path
) -> None:
    """``peftscale eval --verifier``: sc-w and bon-w nest like sc and bon (each smaller budget equals its
    own run), and every verifier strategy's record is the engine's own output for its spec."""
    import json

    from peftscale.eval.datasets import load_task
    from peftscale.eval.prompts import build_prompt

    data = tmp_path / "q.jsonl"
    rows = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"), ("What is 6 * 5?", "30")]
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    strategies = "sc-w@2..4,bon-w@2..4,prm-beam@4,dvts@4"
    out = ps.eval.run(
        dataset=str(data),
        strategies=strategies,
        verifier=str(smol_verifier[0]),
        out=tmp_path / "run",
        max_new_tokens=32,
        engine=smollm2_q,
        progress=False,
    )
    records = {(r["strategy"], r["id"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    task = load_task(str(data))
    specs = ps.eval.parse_specs(strategies, has_verifier=True)
    assert {s.label for s in specs} == {s for s, _ in records}
    for spec in specs:
        assert (spec.shares_samples_of is not None) == (spec.family in ("sc-w", "bon-w") and spec.budget == 2)
        for q in task.questions:
            r = records[(spec.label, q.id)]
            own = smollm2_q.generate(build_prompt(smollm2_q, task, q), max_new_tokens=32, strategy=spec.strategy)
            assert r["text"] == own.text, (spec.label, q.id)
    with pytest.raises(ps.InvalidArgument, match=r"'dvts@4' needs a verifier \(--verifier PATH\)"):
        ps.eval.run(dataset=str(data), strategies="dvts@4", out=tmp_path / "x", engine=smollm2_q, progress=False)


def test_step_quality_reads_the_engines_scores_like_torchs(eng, smol_verifier, tmp_path: Path) -> None:
    """Held-out step AUC and accuracy (``peftscale score-steps``) over Game of 24 rows: the engine's
    scores are the torch verifier's, and the figures, overall and by kind and by step, are their
    closed forms."""
    from peftscale.eval import game24
    from peftscale.eval.stats import auc
    from peftscale.eval.step_quality import quality, verifier_scores

    rows = game24.verifier_rows(["4 9 10 13", "1 1 4 6"], seed=0)
    got = verifier_scores(eng, rows, verifier=NAME, batch_size=3)
    _, vmodel, vtok = smol_verifier
    want = [verifier.score(vmodel, vtok, r["prompt"], r["completions"]) for r in rows]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    q = quality(rows, got)
    flat = [(s, y, r["kind"]) for r, ss in zip(rows, got, strict=True) for s, y in zip(ss, r["labels"], strict=True)]
    assert q["steps"] == len(flat)
    assert q["step_auc"] == auc([s for s, *_ in flat], [y >= 0.5 for _, y, *_ in flat])
    assert q["step_accuracy"] == sum((s >= 0.5) == (y >= 0.5) for s, y, *_ in flat) / len(flat)
    for kind in game24.VERIFIER_KINDS:
        part = [(s, y) for s, y, kd in flat if kd == kind]
        assert q["by_kind"][kind]["steps"] == len(part)
        assert q["by_kind"][kind]["share_good"] == sum(y for _, y in part) / len(part)
    assert sum(v["steps"] for v in q["by_step"].values()) == len(flat)
    assert list(q["by_step"]) == [str(k) for k in range(1, len(q["by_step"]) + 1)]

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "quality.json"
    args = ["score-steps", "--verifier", str(smol_verifier[0]), "--rows", str(path), "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["steps"] == len(flat)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "labels": [1.5] * len(rows[0]["labels"])}) + "\n")
    assert cli.main(["score-steps", "--verifier", str(smol_verifier[0]), "--rows", str(bad)]) == 1


def test_the_policys_own_judgement_sees_each_state_once(smollm2_q: ps.Engine) -> None:
    """``judge_scores`` asks the value question about every prefix of every reply, in batches, and
    scores each greedy verdict; the same states asked one at a time give the same scores."""
    from peftscale.eval import game24

    rows = game24.verifier_rows(["4 9 10 13"], seed=1, per_puzzle=2)
    got = game24.judge_scores(smollm2_q, rows, None, batch_size=3)
    assert [len(s) for s in got] == [len(r["labels"]) for r in rows]
    for row, scores in zip(rows, got, strict=True):
        for k, score in enumerate(scores):
            state = "\n".join(row["completions"][: k + 1])
            question = game24.VALUE_QUESTION.replace("{state}", state)
            chat = smollm2_q.apply_chat_template([{"role": "user", "content": question}])
            out = smollm2_q.generate(chat, max_new_tokens=game24.VALUE_MAX_TOKENS, stop=["\n"])
            assert score == game24.VERDICT_SCORES[game24.verdict(out.text or "")]
