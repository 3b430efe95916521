"""Unit tests on tiny random models: logits parity with transformers, batching, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peftscale as ps
import pytest
import torch
from transformers import AutoModelForCausalLM


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float((np.abs(ours - ref).max(axis=-1) / np.abs(ref).max(axis=-1)).max())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eng = ps.Engine.load(folder, dtype="f32")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, size=40).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert _rel_err(eng.logits(ids), ref) < 1e-4


def test_rope_settings_in_either_config_format(tmp_path: Path, gguf_tokenizer) -> None:
    import json

    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "theta", "llama", gguf_tokenizer, rope_theta=100000.0)
    config = json.loads((folder / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = list(range(200, 260))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    # transformers >= 5 writes `rope_parameters`; older versions a top-level `rope_theta`.
    theta = config.get("rope_parameters", {}).pop("rope_theta", None) or config.pop("rope_theta")
    for layout in ({"rope_parameters": {"rope_theta": theta, "rope_type": "default"}}, {"rope_theta": theta}):
        (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": None, **layout}))
        assert _rel_err(ps.Engine.load(folder, dtype="f32").logits(ids), ref) < 1e-4, layout
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(ps.ModelLoadError, match='rope_type "yarn" is not supported'):
        ps.Engine.load(folder, dtype="f32")


def test_bf16_and_f16_weights_stay_close(tiny_llama: Path) -> None:
    ids = list(range(100, 130))
    ref = ps.Engine.load(tiny_llama, dtype="f32").logits(ids)
    for dtype in ("f16", "bf16"):
        got = ps.Engine.load(tiny_llama, dtype=dtype).logits(ids)
        assert _rel_err(got, ref) < 5e-2, dtype


def test_greedy_matches_transformers_generate(tiny_qwen2: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    eng = ps.Engine.load(tiny_qwen2)
    for prompt in ([5, 17, 900, 31], [44] * 7, list(range(300, 340))):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        out = eng.generate(prompt, max_new_tokens=24, ignore_eos=True)
        assert out.token_ids == ref


def test_batch_rows_equal_single_rows(tiny_llama: Path) -> None:
    eng = ps.Engine.load(tiny_llama)
    prompts = [[7, 8, 9], list(range(1000, 1025)), [3], list(range(50, 61))]
    alone = [eng.generate(p, max_new_tokens=20, ignore_eos=True).token_ids for p in prompts]
    together = eng.generate(prompts, max_new_tokens=20, ignore_eos=True)
    assert [o.token_ids for o in together] == alone
    # The batch ran as one forward per step: 1 prefill + 19 decode steps.
    assert together[0].stats.forward_passes == together[0].stats.steps == 20


def test_seeded_sampling_is_reproducible(tiny_llama: Path) -> None:
    eng = ps.Engine.load(tiny_llama)
    s = ps.Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a = eng.generate([[1, 2, 3]] * 3, max_new_tokens=16, strategy=s, ignore_eos=True)
    b = eng.generate([[1, 2, 3]] * 3, max_new_tokens=16, strategy=s, ignore_eos=True)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # Different rows draw from different generators; a different seed changes the draw.
    assert len({tuple(o.token_ids) for o in a}) > 1
    c = eng.generate([[1, 2, 3]], max_new_tokens=16, strategy=ps.Sampling(seed=124), ignore_eos=True)
    assert c[0].token_ids != a[0].token_ids


def _reference_distribution(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """transformers' warpers, written out: temperature, top-k, top-p, min-p."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(p)  # ascending, as transformers sorts
        cum = np.cumsum(p[order])
        drop = order[cum <= 1 - top_p]
        p[drop] = 0
        p /= p.sum()
    if min_p > 0:
        p = np.where(p < min_p * p.max(), 0, p)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0),
        dict(temperature=1.5, top_k=12, top_p=1.0, min_p=0.0),
        dict(temperature=2.0, top_k=0, top_p=0.6, min_p=0.0),
        dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.2),
    ],
)
def test_one_step_sampling_follows_the_filtered_softmax(tiny_llama: Path, params: dict) -> None:
    """Chi-square goodness of fit of 3000 one-token draws against the reference distribution."""
    eng = ps.Engine.load(tiny_llama)
    prompt = [11, 12, 13, 14]
    expected = _reference_distribution(eng.logits(prompt)[-1], **params)
    n = 3000
    # One batch of n identical prompts: each row samples with its own (seed, row) generator.
    outs = eng.generate([prompt] * n, max_new_tokens=1, strategy=ps.Sampling(seed=7, **params), ignore_eos=True)
    counts = np.bincount([o.token_ids[0] for o in outs], minlength=len(expected))
    assert counts[expected == 0].sum() == 0, "sampled a token the filters remove"
    support = expected > 0
    # Pool rare tokens so every cell expects at least 5 draws.
    exp_counts = expected[support] * n
    obs = counts[support]
    order = np.argsort(exp_counts)
    pooled_e, pooled_o, acc_e, acc_o = [], [], 0.0, 0
    for i in order:
        acc_e += exp_counts[i]
        acc_o += obs[i]
        if acc_e >= 5:
            pooled_e.append(acc_e)
            pooled_o.append(acc_o)
            acc_e, acc_o = 0.0, 0
    if acc_e > 0 and pooled_e:
        pooled_e[-1] += acc_e
        pooled_o[-1] += acc_o
    e, o = np.array(pooled_e), np.array(pooled_o)
    chi2 = float(((o - e) ** 2 / e).sum())
    dof = max(len(e) - 1, 1)
    # p < 0.001 critical value, via the Wilson-Hilferty approximation.
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, f"chi2={chi2:.1f} > {crit:.1f} with {dof} dof"
    assert support.sum() > 1


def test_identical_prompts_run_once_and_fork(tiny_llama: Path) -> None:
    eng = ps.Engine.load(tiny_llama)
    p, other = list(range(20, 50)), [1, 2, 3]
    n = 6
    outs = eng.generate([p] * 16 + [other], max_new_tokens=n, strategy=ps.Sampling(seed=5), ignore_eos=True)
    # Each distinct prompt once, then every row feeds back all but its last token.
    assert outs[0].stats.tokens_forwarded == len(p) + len(other) + 17 * (n - 1)
    assert len({tuple(o.token_ids) for o in outs[:16]}) > 1, "rows must keep their own generators"
    # A row that forks a shared prompt decodes as the same row would with the prompt to itself.
    shared = eng.generate([p, p], max_new_tokens=12, strategy=ps.Sampling(seed=9), ignore_eos=True)[1]
    own = eng.generate([other, p], max_new_tokens=12, strategy=ps.Sampling(seed=9), ignore_eos=True)[1]
    assert shared.token_ids == own.token_ids
    np.testing.assert_allclose(shared.logprobs, own.logprobs, rtol=1e-4, atol=1e-5)
    greedy = eng.generate([p] * 4, max_new_tokens=12, ignore_eos=True)
    alone = eng.generate(p, max_new_tokens=12, ignore_eos=True)
    assert all(o.token_ids == alone.token_ids for o in greedy)
    assert greedy[0].stats.tokens_forwarded == len(p) + 4 * 11
