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
    tokens, scores = ps.cold_top_k(expert, base, k=6)
    # ln(0.1) + 2 = -0.30: tokens 0, 1 and 3 are plausible; the base's liking for 0 demotes it.
    assert tokens.tolist() == [[1, 0, 3, -1, -1, -1]]
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
    with pytest.raises(ps.InvalidArgument, match="k >= 1"):
        ps.cold_top_k(row, row, k=0)
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
