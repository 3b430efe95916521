"""`ps.cold_top_k`, the CoLD scorer on caller-supplied rows, against a float64 NumPy oracle (the
CPU path here; `scripts/gpu-check.sh` holds the CUDA kernel to the same path), and its errors."""

from __future__ import annotations

import math

import numpy as np
import peftscale as ps
import pytest


def _oracle(expert: np.ndarray, base: np.ndarray, alpha: float, beta: float, t: float) -> np.ndarray:
    """Every token's score in float64, -inf outside the plausible set (cut taken in float32)."""
    e, b = expert.astype(np.float64), base.astype(np.float64)
    cut = expert.max(axis=1, keepdims=True) + np.float32(math.log(alpha))
    return np.where(expert >= cut, (1 + beta) * e - beta * b / t, -np.inf)


def _rows(rng: np.random.Generator, pairs: int, vocab: int, sharpness: float) -> tuple[np.ndarray, np.ndarray]:
    expert = (rng.standard_normal((pairs, vocab)) * sharpness).astype(np.float32)
    base = (expert * 0.7 + rng.standard_normal((pairs, vocab)) * sharpness * 0.5).astype(np.float32)
    return expert, base


@pytest.mark.parametrize(
    ("pairs", "vocab", "sharpness", "k"), [(1, 32000, 4.0, 1), (5, 4099, 0.3, 8), (3, 49152, 2.0, 16)]
)
def test_cold_top_k_matches_the_oracle(pairs: int, vocab: int, sharpness: float, k: int) -> None:
    rng = np.random.default_rng(pairs * vocab + k)
    expert, base = _rows(rng, pairs, vocab, sharpness)
    alpha, beta, t = 0.1, 0.5, 1.3
    tokens, scores = ps.cold_top_k(expert, base, k, alpha=alpha, beta=beta, base_temperature=t)
    assert tokens.shape == scores.shape == (pairs, k)
    ref = _oracle(expert, base, alpha, beta, t)
    for r in range(pairs):
        plausible = int(np.isfinite(ref[r]).sum())
        order = sorted(np.flatnonzero(np.isfinite(ref[r])), key=lambda i: (-ref[r, i], i))[:k]
        n = min(k, plausible)
        assert list(tokens[r, :n]) == order, r
        np.testing.assert_allclose(scores[r, :n], ref[r, order], rtol=1e-5, atol=1e-5)
        assert (tokens[r, n:] == -1).all() and np.isneginf(scores[r, n:]).all()


def test_few_plausible_tokens_pad_with_minus_one() -> None:
    expert = np.array([2.0, 1.9, -5.0, 0.0], dtype=np.float32)
    base = np.array([3.0, 0.0, -10.0, 0.0], dtype=np.float32)
    tokens, scores = ps.cold_top_k(expert, base, k=4)
    # ln(0.1) + 2 = -0.30: tokens 0, 1 and 3 are plausible; the base's liking for 0 demotes it.
    assert tokens.tolist() == [[1, 0, 3, -1]]
    np.testing.assert_allclose(scores[0, :3], [1.5 * 1.9, 1.5 * 2.0 - 0.5 * 3.0, 0.0], atol=1e-6)
    assert np.isneginf(scores[0, 3:]).all()
    # beta = 0 is plain decoding with the expert.
    assert ps.cold_top_k(expert, base, k=1, beta=0.0)[0].tolist() == [[0]]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_rows_are_scored_after_rounding(dtype: str) -> None:
    import torch

    rng = np.random.default_rng(3)
    expert, base = _rows(rng, 4, 5000, 3.0)
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    rounded = [torch.from_numpy(x).to(torch_dtype).float().numpy() for x in (expert, base)]
    ref = _oracle(*rounded, 0.1, 0.5, 1.0)
    tokens, scores = ps.cold_top_k(expert, base, k=1, dtype=dtype)
    for r in range(4):
        best = ref[r].max()
        # Ties after rounding may go to any of the tied tokens' lowest id: the score must be the best.
        assert ref[r, tokens[r, 0]] == best
        assert scores[r, 0] == pytest.approx(best, rel=1e-6)


def test_bad_arguments_raise_typed_errors() -> None:
    row = np.zeros((2, 10), dtype=np.float32)
    with pytest.raises(ps.InvalidArgument, match="one shape"):
        ps.cold_top_k(row, row[:, :9])
    for k in (0, 11):
        with pytest.raises(ps.InvalidArgument, match="1 <= k <= the vocabulary size"):
            ps.cold_top_k(row, row, k=k)
    with pytest.raises(ps.InvalidArgument, match="alpha"):
        ps.cold_top_k(row, row, alpha=0.0)
    with pytest.raises(ps.InvalidArgument, match="dtype"):
        ps.cold_top_k(row, row, dtype="f64")  # type: ignore[arg-type]
    with pytest.raises(ps.InvalidArgument, match="unknown device `gpu`"):
        ps.cold_top_k(row, row, device="gpu")
    with pytest.raises(ps.InvalidArgument, match="1-D or 2-D"):
        ps.cold_top_k(row[None], row[None])


def test_cuda_scores_like_the_cpu_or_names_what_is_missing() -> None:
    expert, base = _rows(np.random.default_rng(9), 6, 32000, 2.0)
    try:
        tokens, scores = ps.cold_top_k(expert, base, k=8, device="cuda:0")
    except ps.DeviceError as e:  # the default build, or no GPU
        assert "cuda:0" in str(e)
        return
    want_tokens, want_scores = ps.cold_top_k(expert, base, k=8)
    assert np.array_equal(tokens, want_tokens)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


SAMPLING_CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 50, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (1.0, 40, 0.5, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.8, 200, 0.95, 0.02),
    (1.0, 1, 1.0, 0.0),
]


def _ranked(row: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids in sampling order (scaled logit high to low, smaller id first on ties) and their
    weights exp(key - max) in float64."""
    key = row.astype(np.float32) / np.float32(temperature)
    order = np.lexsort((np.arange(len(key)), -key.astype(np.float64)))
    return order, np.exp(key[order].astype(np.float64) - float(key.max()))


def _oracle_draw(row: np.ndarray, t: float, top_k: int, top_p: float, min_p: float, u: float) -> tuple[int, float]:
    """The sampler's definition walked in float64: the token, and how close the draw came to a
    boundary (relative to the kept mass; a draw that close may go either way in float32)."""
    order, w = _ranked(row, t)
    n = len(w) if top_k == 0 else min(top_k, len(w))
    w = w[:n]
    total = w.sum()
    cum = np.cumsum(w)
    keep = n
    if top_p < 1.0 or min_p > 0.0:
        before = np.concatenate([[0.0], cum[:-1]])
        stop = [i for i in range(n) if (i > 0 and before[i] >= top_p * total) or w[i] < min_p]
        keep = max(1, stop[0] if stop else n)
    kept = cum[keep - 1]
    target = u * kept
    pick = int(np.searchsorted(cum[:keep], target, side="right"))
    pick = min(pick, keep - 1)
    margins = [abs(cum[:keep] - target).min() / kept]
    if top_p < 1.0:
        margins.append(abs(cum[:n] - top_p * total).min() / total)
    if min_p > 0.0:
        margins.append(abs(w - min_p).min())
    return int(order[pick]), float(min(margins))


def _radix_emulation(row: np.ndarray, t: float, top_k: int, top_p: float, min_p: float, u: float) -> int:
    """`cuda/sample.cu`'s algorithm step by step in NumPy: 64-bit rank keys, eight 8-bit radix
    passes with weighted histograms per select, the min-p filter, the last-element fallback."""
    key = row.astype(np.float32) / np.float32(t)
    bits = key.view(np.uint32).astype(np.uint64)
    bits = np.where(bits & 0x80000000, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    rank = ((~bits & 0xFFFFFFFF) << np.uint64(32)) | np.arange(len(key), dtype=np.uint64)
    w = np.exp(key.astype(np.float64) - float(key.max()))
    all_ranks = np.uint64(2**64 - 1)

    def select(limit: np.uint64, by_count: bool, target: float, reach: bool, floor: float) -> np.uint64:
        prefix, mask, take_last = np.uint64(0), np.uint64(0), False
        part = (rank <= limit) & (w >= floor)
        for shift in range(56, -8, -8):
            s = np.uint64(shift)
            sel = part & ((rank & mask) == prefix)
            digits = ((rank[sel] >> s) & np.uint64(0xFF)).astype(np.int64)
            hist = np.bincount(digits, weights=None if by_count else w[sel], minlength=256).astype(np.float64)
            before, before_last, pick, last = 0.0, 0.0, -1, 0
            for b in range(256):
                if hist[b] <= 0.0:
                    continue
                after = before + hist[b]
                if not take_last and (after >= target if reach else after > target):
                    pick = b
                    break
                before_last, last, before = before, b, after
            if pick < 0:
                take_last, pick, before = True, last, before_last
            target -= before
            prefix |= np.uint64(pick) << s
            mask |= np.uint64(0xFF) << s
        return prefix

    limit = all_ranks
    if 0 < top_k < len(key):
        limit = select(all_ranks, True, top_k - 1.0, False, 0.0)
    total = w[rank <= limit].sum()
    if top_p < 1.0:
        limit = select(limit, False, top_p * total, True, 0.0)
    kept = w[(rank <= limit) & (w >= min_p)].sum()
    pick = select(limit, False, u * kept, False, min_p)
    return int(pick & np.uint64(0xFFFFFFFF))


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), SAMPLING_CASES)
def test_sample_tokens_draws_what_the_definition_says(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    rng = np.random.default_rng(int(temperature * 100) + top_k)
    logits = (rng.standard_normal((24, 3000)) * 3).astype(np.float32)
    logits[:, 7] = logits[:, 11] = logits.max(axis=1) + 0.5  # a tie for the best token
    uniforms = rng.random(24).astype(np.float32)
    got = ps.sample_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    close = 0
    for row, u, token in zip(logits, uniforms, got, strict=True):
        want, margin = _oracle_draw(row, temperature, top_k, top_p, min_p, float(u))
        if margin < 1e-6:
            close += 1
            continue
        assert token == want
        # The GPU kernel's algorithm, emulated, draws the same token.
        assert _radix_emulation(row, temperature, top_k, top_p, min_p, float(u)) == want
    assert close <= 2


def test_sample_tokens_edges() -> None:
    row = np.array([[0.0, 2.0, 2.0, -1.0, -np.inf]], dtype=np.float32)
    # Ties go to the smaller id; u near 0 takes the first rank, near 1 the last kept one.
    assert ps.sample_tokens(row, [0.0]).tolist() == [1]
    assert ps.sample_tokens(row, [0.999999], top_k=2).tolist() == [2]
    assert ps.sample_tokens(row, [0.999999]).tolist() == [3]  # never the -inf token
    assert ps.sample_tokens(row, [0.5], temperature=0.0).tolist() == [1]
    # min_p = 1 keeps only tokens as likely as the best; top_p tiny keeps the best alone.
    assert ps.sample_tokens(row, [0.9], min_p=1.0).tolist() == [2]
    assert ps.sample_tokens(row, [0.9], top_p=1e-6).tolist() == [1]
    for u in (0.0, 0.3, 0.99):
        assert _radix_emulation(row[0], 1.0, 0, 1.0, 0.0, u) == ps.sample_tokens(row, [u])[0]


def test_sample_tokens_errors() -> None:
    row = np.zeros((2, 6), dtype=np.float32)
    with pytest.raises(ps.InvalidArgument, match="uniform numbers for 2 rows"):
        ps.sample_tokens(row, [0.5])
    with pytest.raises(ps.InvalidArgument, match=r"\[0, 1\)"):
        ps.sample_tokens(row, [0.5, 1.0])
    with pytest.raises(ps.InvalidArgument, match="top_p"):
        ps.sample_tokens(row, [0.5, 0.5], top_p=0.0)
    with pytest.raises(ps.InvalidArgument, match="temperature"):
        ps.sample_tokens(row, [0.5, 0.5], temperature=-1.0)
    bad = row.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ps.NumericalError, match="row 1"):
        ps.sample_tokens(bad, [0.5, 0.5])


def test_cuda_draws_like_the_cpu_or_names_what_is_missing() -> None:
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((16, 32000)) * 3).astype(np.float32)
    uniforms = rng.random(16)
    try:
        got = ps.sample_tokens(logits, uniforms, top_k=100, top_p=0.9, device="cuda:0")
    except ps.DeviceError as e:
        assert "cuda:0" in str(e)
        return
    assert np.array_equal(got, ps.sample_tokens(logits, uniforms, top_k=100, top_p=0.9))
