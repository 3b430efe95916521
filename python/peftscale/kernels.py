"""Which CPU kernels this machine runs, and the peak its 8-bit dot-product instruction reaches.

>>> import peftscale as ps
>>> info = ps.cpu_kernels()
>>> info["isa"] in ("avx512-vnni", "avx2", "portable")
True
"""

from __future__ import annotations

from typing import TypedDict, cast

from peftscale import _core


class CpuKernels(TypedDict):
    isa: str
    """``"avx512-vnni"`` (512-bit tile kernels), ``"avx2"`` or ``"portable"``."""
    threads: int
    """Threads the kernels run on (``PEFTSCALE_NUM_THREADS``, or one per core)."""
    int8_peak_gops: float
    """Measured 8-bit multiply-add rate of all threads, in GOP/s (a multiply-add is two)."""


def cpu_kernels(seconds: float = 0.3) -> CpuKernels:
    """Detects the kernel family and measures the dot-product peak for about ``seconds``."""
    return cast(CpuKernels, _core.cpu_kernels(seconds))
