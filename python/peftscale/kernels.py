"""Which CPU kernels this machine runs, the peak its 8-bit dot-product instruction reaches, and
the engine's per-step scoring on logit rows of your own: the CoLD scorer and the sampler (on the
CPU, or with a CUDA build on the GPU's kernels).

>>> import peftscale as ps
>>> info = ps.cpu_kernels()
>>> info["isa"] in ("avx512-vnni", "avx2", "portable")
True
>>> import numpy as np
>>> expert = np.array([[2.0, 1.9, -5.0, 0.0]], dtype=np.float32)
>>> base = np.array([[3.0, 0.0, -10.0, 0.0]], dtype=np.float32)
>>> tokens, scores = ps.cold_top_k(expert, base, k=2)
>>> tokens.tolist(), [round(float(s), 2) for s in scores[0]]
([[1, 0]], [2.85, 1.5])
>>> ps.sample_tokens(expert, [0.99], temperature=1.0, top_k=2).tolist()  # the 2nd of 2, by u
[1]
>>> "cpu" in ps.compiled_devices()
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict, cast

import numpy as np
import numpy.typing as npt

from peftscale import _core


class CpuKernels(TypedDict):
    isa: str
    """``"avx512-vnni"`` (512-bit tile kernels), ``"avx2"`` or ``"portable"``."""
    threads: int
    """Threads the kernels run on (``PEFTSCALE_NUM_THREADS``, or one per core)."""
    int8_peak_gops: float
    """Measured 8-bit multiply-add rate of all threads, in GOP/s (a multiply-add is two)."""


def compiled_devices() -> list[str]:
    """The kinds of device this build of peftscale can run on: ``"cpu"``, and ``"cuda"`` or
    ``"ascend"`` when it was built with those features (``scripts/build-cuda.sh``). Whether this
    machine has such a device is for ``Engine.load(..., device=...)`` to say."""
    return list(_core.compiled_devices)


def cpu_kernels(seconds: float = 0.3) -> CpuKernels:
    """Detects the kernel family and measures the dot-product peak for about ``seconds``."""
    return cast(CpuKernels, _core.cpu_kernels(seconds))


def cold_top_k(
    expert: npt.ArrayLike,
    base: npt.ArrayLike,
    k: int = 1,
    *,
    alpha: float = 0.1,
    beta: float = 0.5,
    base_temperature: float = 1.0,
    device: str = "cpu",
    dtype: Literal["f32", "f16", "bf16"] = "f32",
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The best ``k`` Contrastive LoRA Decoding candidates of each (expert, base) row pair.

    ``expert`` and ``base`` are ``[pairs, vocab]`` logits (a 1-D row is one pair). Tokens below
    ``alpha`` times the expert's best probability are dropped; the rest score
    ``(1 + beta) * expert - beta * base / base_temperature``. Returns token ids ``[pairs, k]``,
    best first (ties to the lower id; ``-1`` where fewer than ``k`` tokens are plausible), and
    their scores (``-inf`` there). The rows are scored on ``device`` (``"cpu"``, or ``"cuda"`` /
    ``"cuda:N"`` with a CUDA build, where the fused kernel of ``cuda/cold.cu`` runs for
    ``k <= 16``) after rounding to ``dtype``.
    """
    e = np.ascontiguousarray(expert, dtype=np.float32)
    b = np.ascontiguousarray(base, dtype=np.float32)
    if e.ndim == 1 and b.ndim == 1:
        e, b = e[None, :], b[None, :]
    if e.ndim != 2 or b.ndim != 2:
        shapes = f"{e.shape} and {b.shape}"
        raise _core.InvalidArgument(f"invalid argument: expert and base must be 1-D or 2-D, got {shapes}")
    return _core.cold_top_k(e, b, k, alpha, beta, base_temperature, device, dtype)


def sample_tokens(
    logits: npt.ArrayLike,
    uniforms: Sequence[float] | npt.ArrayLike,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    device: str = "cpu",
    dtype: Literal["f32", "f16", "bf16"] = "f32",
) -> npt.NDArray[np.int64]:
    """The token each row of ``logits`` (``[rows, vocab]``; a 1-D row is one) draws with its
    number from ``uniforms`` (one per row, in [0, 1)), as the engine's sampler does.

    Tokens are ranked by ``logits / temperature`` (the smaller id first on ties); ``top_k``
    keeps the first k (0 keeps all), ``top_p`` the ranks up to and including the one whose
    cumulative probability reaches it, ``min_p`` those at least ``min_p`` times as likely as
    the best; the draw is the first kept rank whose cumulative probability exceeds ``u``.
    ``temperature=0`` is the argmax. On ``"cuda"`` (a CUDA build) the kernel of
    ``cuda/sample.cu`` draws them and only the ids leave the GPU.
    """
    x = np.ascontiguousarray(logits, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise _core.InvalidArgument(f"invalid argument: logits must be 1-D or 2-D, got shape {x.shape}")
    u = [float(v) for v in np.asarray(uniforms, dtype=np.float64).reshape(-1)]
    return _core.sample_tokens(x, u, temperature, top_k, top_p, min_p, device, dtype)
