"""Checks and times the hand-written CUDA kernels in ``cuda/`` on a GPU.

Correctness: the fused CoLD scorer and the BGMV LoRA delta against float64 references of the
same definitions (``rust/core/src/logits/cold.rs`` and peft's ``scale * (x A^T) B^T``) on fresh
random inputs, vocabularies of 32,000 to 151,936, 1 to 64 row pairs, f32 / f16 / bf16.
Speed: the fused CoLD scorer against the same computation as separate torch ops and against
the memory-bandwidth floor for reading both rows; BGMV against torch's gathered matmuls.

    nvcc -arch=sm_90 -cubin -O3 -o build/cuda/cold.cubin cuda/cold.cu   # and bgmv.cu
    python benches/cuda_kernels.py --cubin-dir build/cuda --out benches/cuda_kernels.md

Needs torch with CUDA and CuPy (to load the cubins). ``--mock`` runs the same checks with torch
stand-ins for the kernels on the CPU, to test this script where there is no GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2}
"""Largest relative error accepted per input dtype (scores: against max(1, |reference|);
BGMV: against the largest reference value of the output)."""

VOCABS = (32000, 49152, 128256, 151936)
PAIRS = (1, 8, 64)
REGIMES = {"flat": 1.0, "llm": 4.0, "sharp": 10.0}
"""Standard deviation of the random logits: a flat expert row has thousands of plausible tokens
(the kernel's second pass), a sharp one a handful (its single pass)."""
ALPHA, BETA, BASE_TEMPERATURE = 0.1, 0.5, 1.0


@dataclass
class Cold:
    index: torch.Tensor  # (pairs, k) int32, -1 where fewer than k are plausible
    score: torch.Tensor  # (pairs, k) float32, best first
    lse: torch.Tensor  # (pairs, 2) float32: log-sum-exp of the expert and base rows


class CudaKernels:
    """The cubins loaded with CuPy, launched on torch's current stream (so that CUDA graphs
    captured by torch record them)."""

    COLD_THREADS = 256
    CHUNK_HELD = 64  # kChunkHeld in cold.cu

    def __init__(self, cubin_dir: Path) -> None:
        import cupy
        import numpy as np

        self.cp, self.np = cupy, np
        self.cold_module = cupy.RawModule(path=str(cubin_dir / "cold.cubin"))
        self.bgmv_module = cupy.RawModule(path=str(cubin_dir / "bgmv.cubin"))
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self._workspaces: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _ptr(self, t: torch.Tensor | None) -> Any:
        if t is None:
            return self.np.uint64(0)
        assert t.is_cuda and t.is_contiguous()
        return self.np.uint64(t.data_ptr())

    def _launch(self, fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = self.cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            fn(grid, block, args, shared_mem=shared_mem)

    def reread_share(self, pairs: int, vocab: int) -> float:
        """Share of the chunks the last CoLD launch of this shape had to read twice (flat rows)."""
        splits = self.cold_splits(pairs, vocab)
        counts = self._workspaces[(pairs, splits)][1][pairs : pairs + pairs * splits]
        return float((counts < 0).float().mean())

    def cold_splits(self, pairs: int, vocab: int) -> int:
        """Chunks per row: enough blocks for about two per multiprocessor, chunks of at least 2,048."""
        return max(1, min(-(-vocab // 2048), -(-2 * self.sms // pairs)))

    def cold(self, expert: torch.Tensor, base: torch.Tensor, k: int, out: Cold | None = None) -> Cold:
        np = self.np
        pairs, vocab = expert.shape
        dtype = next(n for n, d in DTYPES.items() if d == expert.dtype)
        if out is None:
            out = Cold(
                torch.empty(pairs, k, dtype=torch.int32, device=expert.device),
                torch.empty(pairs, k, dtype=torch.float32, device=expert.device),
                torch.empty(pairs, 2, dtype=torch.float32, device=expert.device),
            )
        splits = self.cold_splits(pairs, vocab)
        if (pairs, splits) not in self._workspaces:  # the arrival counters start at zero, launches leave them so
            self._workspaces[(pairs, splits)] = (
                torch.zeros(pairs * splits * (4 + 2 * self.CHUNK_HELD), dtype=torch.float32, device=expert.device),
                torch.zeros(pairs * (1 + splits * (1 + self.CHUNK_HELD)), dtype=torch.int32, device=expert.device),
            )
        ws_f, ws_i = self._workspaces[(pairs, splits)]
        fn = self.cold_module.get_function(f"peftscale_cold_score_{dtype}")
        args = (
            self._ptr(expert), self._ptr(base), np.int32(vocab), np.int32(k), np.float32(math.log(ALPHA)),
            np.float32(BETA), np.float32(1.0 / BASE_TEMPERATURE), self._ptr(out.index), self._ptr(out.score),
            self._ptr(out.lse), self._ptr(ws_f), self._ptr(ws_i),
        )  # fmt: skip
        self._launch(fn, (splits, pairs), (self.COLD_THREADS,), args)
        return out

    def bgmv(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
             scales: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None = None) -> None:  # fmt: skip
        np = self.np
        rows, d_in = x.shape
        rank, d_out = a.shape[1], b.shape[1]
        dtype = next(n for n, d in DTYPES.items() if d == x.dtype)
        if u is None:
            u = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
        shrink = self.bgmv_module.get_function(f"peftscale_bgmv_shrink_{dtype}")
        expand = self.bgmv_module.get_function(f"peftscale_bgmv_expand_{dtype}")
        ptr = self._ptr
        args = (ptr(x), ptr(a), ptr(slots), ptr(u), np.int32(d_in), np.int32(rank))
        self._launch(shrink, (rows, max(1, rank // 8)), (256,), args)
        args = (ptr(u), ptr(b), ptr(slots), ptr(scales), ptr(y), np.int32(d_out), np.int32(rank))
        self._launch(expand, (rows, (d_out + 255) // 256), (256,), args, shared_mem=rank * 4)


class MockKernels:
    """Torch stand-ins with the kernels' interface (float32 arithmetic), for ``--mock``."""

    def cold(self, expert: torch.Tensor, base: torch.Tensor, k: int, out: Cold | None = None) -> Cold:
        e, b = expert.float(), base.float()
        lse_e, lse_b = torch.logsumexp(e, -1), torch.logsumexp(b, -1)
        cut = e.max(-1, keepdim=True).values + torch.tensor(math.log(ALPHA), dtype=torch.float32)
        score = (1 + BETA) * (e - lse_e[:, None]) - BETA / BASE_TEMPERATURE * (b - lse_b[:, None])
        score = torch.where(e >= cut, score, -math.inf)
        order = torch.sort(score, dim=-1, descending=True, stable=True)
        index = order.indices[:, :k].to(torch.int32)
        index[~torch.isfinite(order.values[:, :k])] = -1
        return Cold(index, order.values[:, :k].contiguous(), torch.stack([lse_e, lse_b], -1))

    def bgmv(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
             scales: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None = None) -> None:  # fmt: skip
        y.copy_(torch_bgmv(x.float(), a.float(), b.float(), slots, scales, y.float()).to(y.dtype))


def cold_reference(expert: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's CoLD score in float64 (-inf outside the plausible set; the cut itself in
    float32, as the kernel and the CPU scorer take it), and both rows' log-sum-exp."""
    e, b = expert.double(), base.double()
    lse_e, lse_b = torch.logsumexp(e, -1, keepdim=True), torch.logsumexp(b, -1, keepdim=True)
    cut = expert.float().max(-1, keepdim=True).values + torch.tensor(math.log(ALPHA), dtype=torch.float32)
    score = (1 + BETA) * (e - lse_e) - BETA / BASE_TEMPERATURE * (b - lse_b)
    return torch.where(expert.float() >= cut, score, -math.inf), torch.cat([lse_e, lse_b], -1)


def cold_torch(expert: torch.Tensor, base: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scoring as separate torch ops (the baseline the fused kernel replaces)."""
    se = torch.log_softmax(expert.float(), -1)
    sb = torch.log_softmax(base.float(), -1)
    keep = se >= se.max(-1, keepdim=True).values + math.log(ALPHA)
    score = torch.where(keep, (1 + BETA) * se - (BETA / BASE_TEMPERATURE) * sb, -math.inf)
    values, index = torch.topk(score, k, dim=-1)
    return values, index


def torch_bgmv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``y`` plus each row's own adapter delta, by gathered batched matmuls (torch's way)."""
    on = slots >= 0
    slot = slots.clamp(min=0).long()
    u = torch.bmm(a[slot], x.unsqueeze(-1))  # rows x rank x 1
    delta = torch.bmm(b[slot], u).squeeze(-1) * scales[slot].to(x.dtype)[:, None]
    return y + delta * on.to(x.dtype)[:, None]


def check_cold(kernels: Any, device: str, seed: int) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for dtype, td in DTYPES.items():
        for vocab in VOCABS:
            for pairs in PAIRS:
                for regime, sigma in REGIMES.items():
                    expert = (torch.randn(pairs, vocab, generator=gen) * sigma).to(td).to(device)
                    base = (torch.randn(pairs, vocab, generator=gen) * sigma).to(td).to(device)
                    ref, ref_lse = cold_reference(expert, base)
                    ordered = torch.sort(ref, dim=-1, descending=True, stable=True)
                    for k in (1, 8):
                        got = kernels.cold(expert, base, k)
                        row = _judge_cold(dtype, vocab, pairs, regime, k, got, ref, ordered, ref_lse)
                        if hasattr(kernels, "reread_share"):
                            row["chunks_read_twice"] = kernels.reread_share(pairs, vocab)
                        rows.append(row)
    return rows


def _judge_cold(dtype: str, vocab: int, pairs: int, regime: str, k: int, got: Cold, ref: torch.Tensor,
                ordered: Any, ref_lse: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    tol = TOLERANCE[dtype]
    want = ordered.values[:, :k]
    present = torch.isfinite(want)
    index = got.index.long()
    problems = []
    if not torch.equal(index >= 0, present):
        problems.append("plausible-count")
    # The returned tokens' scores, both as the kernel gave them and as the reference has them.
    safe = index.clamp(min=0)
    theirs = torch.gather(ref, 1, safe)
    scale = want.abs().clamp(min=1.0)
    err_rank = ((got.score.double() - want).abs() / scale)[present].max().item() if present.any() else 0.0
    err_own = ((got.score.double() - theirs).abs() / scale)[present].max().item() if present.any() else 0.0
    err_lse = ((got.lse.double() - ref_lse).abs() / ref_lse.abs().clamp(min=1.0)).max().item()
    if not torch.isfinite(theirs[present]).all():
        problems.append("implausible-token")
    # Greedy picks must be the reference's wherever its best two are not within tolerance.
    if k == 1:
        second = ordered.values[:, 1] if ref.shape[1] > 1 else torch.full_like(want[:, 0], -math.inf)
        clear = (want[:, 0] - second) > tol * scale[:, 0]
        if not torch.equal(index[clear, 0], ordered.indices[clear, 0]):
            problems.append("argmax")
    err = max(err_rank, err_own, err_lse)
    if err > tol:
        problems.append(f"error {err:.2e}")
    return {
        "kernel": "cold", "dtype": dtype, "vocab": vocab, "pairs": pairs, "regime": regime, "k": k,
        "max_rel_error": err, "plausible_mean": float(torch.isfinite(ref).sum(-1).double().mean()),
        "ok": not problems, "problems": problems,
    }  # fmt: skip


def check_bgmv(kernels: Any, device: str, seed: int) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    slots_n = 4
    for dtype, td in DTYPES.items():
        for rows_n in (1, 16, 64, 512):
            for d_in, d_out, rank in ((576, 576, 16), (576, 1536, 16), (1536, 576, 64), (4096, 4096, 8)):
                x = torch.randn(rows_n, d_in, generator=gen).to(td).to(device)
                a = (torch.randn(slots_n, rank, d_in, generator=gen) / math.sqrt(d_in)).to(td).to(device)
                b = (torch.randn(slots_n, d_out, rank, generator=gen) / math.sqrt(rank)).to(td).to(device)
                slots = torch.randint(-1, slots_n, (rows_n,), generator=gen, dtype=torch.int32).to(device)
                scales = (torch.rand(slots_n, generator=gen) * 2 + 0.5).to(device)
                y0 = torch.randn(rows_n, d_out, generator=gen).to(td).to(device)
                y = y0.clone()
                kernels.bgmv(x, a, b, slots, scales, y)
                want = torch_bgmv(x.double(), a.double(), b.double(), slots, scales.double(), y0.double())
                err = ((y.double() - want).abs().max() / want.abs().max()).item()
                untouched = slots < 0
                kept = torch.equal(y[untouched], y0[untouched])
                ok = err <= TOLERANCE[dtype] and kept
                rows.append({
                    "kernel": "bgmv", "dtype": dtype, "rows": rows_n, "d_in": d_in, "d_out": d_out, "rank": rank,
                    "max_rel_error": err, "ok": ok,
                    "problems": [] if ok else [f"error {err:.2e}"] + ([] if kept else ["rows without adapter changed"]),
                })  # fmt: skip
    return rows


def _time(fn: Callable[[], Any], device: str, iters: int = 50) -> float:
    """Mean seconds per call as launched from Python, by CUDA events over ``iters`` calls."""
    for _ in range(3):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _time_graph(fn: Callable[[], Any], device: str, iters: int = 20, replays: int = 10) -> float:
    """Mean GPU seconds per call with no launch overhead: ``iters`` calls captured in one CUDA
    graph, replayed ``replays`` times."""
    if device != "cuda":
        return _time(fn, device, iters)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
    except RuntimeError as e:  # a launch that cannot be captured: time it as launched
        print(f"graph capture failed ({e}); timing launches one by one", file=sys.stderr)
        return _time(fn, device, iters)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (iters * replays)


def copy_bandwidth(device: str) -> float:
    """Bytes per second a device-to-device copy moves (read plus write), 2 GiB each way."""
    n = (1 << 31) // 4 if device == "cuda" else 1 << 22
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, iters=10)
    return 2 * n * 4 / seconds


def bench_cold(kernels: Any, device: str, bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for dtype in ("f32", "bf16"):
        for vocab in (49152, 151936):
            for pairs in (1, 16, 64):
                expert = (torch.randn(pairs, vocab, device=device) * 4).to(DTYPES[dtype])
                base = (torch.randn(pairs, vocab, device=device) * 4).to(DTYPES[dtype])
                for k in (1, 8):
                    out = kernels.cold(expert, base, k)
                    fused_call = functools.partial(kernels.cold, expert, base, k, out)
                    ops_call = functools.partial(cold_torch, expert, base, k)
                    fused, ops = _time_graph(fused_call, device), _time_graph(ops_call, device)
                    fused_eager, ops_eager = _time(fused_call, device), _time(ops_call, device)
                    floor = 2 * pairs * vocab * expert.element_size() / bandwidth
                    rows.append({
                        "dtype": dtype, "vocab": vocab, "pairs": pairs, "k": k, "fused_us": fused * 1e6,
                        "torch_ops_us": ops * 1e6, "floor_us": floor * 1e6, "speedup": ops / fused,
                        "of_floor": floor / fused, "fused_eager_us": fused_eager * 1e6,
                        "torch_ops_eager_us": ops_eager * 1e6,
                        "chunks_read_twice": getattr(kernels, "reread_share", lambda *_: 0.0)(pairs, vocab),
                    })  # fmt: skip
    return rows


def bench_bgmv(kernels: Any, device: str) -> list[dict[str, Any]]:
    rows = []
    slots_n, d_in, d_out, rank = 4, 576, 1536, 16
    for dtype in ("f32", "bf16"):
        td = DTYPES[dtype]
        for rows_n in (1, 16, 64, 512):
            x = torch.randn(rows_n, d_in, device=device).to(td)
            a = torch.randn(slots_n, rank, d_in, device=device).to(td)
            b = torch.randn(slots_n, d_out, rank, device=device).to(td)
            slots = torch.randint(0, slots_n, (rows_n,), device=device, dtype=torch.int32)
            scales = torch.ones(slots_n, device=device)
            y = torch.zeros(rows_n, d_out, device=device).to(td)
            u = torch.empty(rows_n, rank, device=device)
            ours = _time_graph(functools.partial(kernels.bgmv, x, a, b, slots, scales, y, u), device)
            theirs = _time_graph(functools.partial(torch_bgmv, x, a, b, slots, scales, y), device)
            rows.append({
                "dtype": dtype, "rows": rows_n, "d_in": d_in, "d_out": d_out, "rank": rank, "bgmv_us": ours * 1e6,
                "torch_gathered_us": theirs * 1e6, "speedup": theirs / ours,
            })  # fmt: skip
    return rows


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}; {report['date']}.", ""]
    checks = report["checks"]
    failed = [c for c in checks if not c["ok"]]
    lines.append(f"Correctness: {len(checks) - len(failed)} of {len(checks)} cases pass.")
    for kernel in ("cold", "bgmv"):
        for dtype in DTYPES:
            errs = [c["max_rel_error"] for c in checks if c["kernel"] == kernel and c["dtype"] == dtype]
            if errs:
                lines.append(f"- {kernel} {dtype}: largest relative error {max(errs):.1e} "
                             f"(limit {TOLERANCE[dtype]:.0e}) over {len(errs)} cases")  # fmt: skip
    for regime in REGIMES:
        shares = [c["chunks_read_twice"] for c in checks if c.get("regime") == regime and "chunks_read_twice" in c]
        if shares:
            lines.append(f"- cold, {regime} rows: {sum(shares) / len(shares):.0%} of chunks read twice")
    for c in failed[:20]:
        lines.append(f"- FAILED {json.dumps(c)}")
    if report.get("copy_bandwidth"):
        lines += ["", f"Device-to-device copy: {report['copy_bandwidth'] / 1e12:.2f} TB/s (read + write).", ""]
    if report.get("cold"):
        lines += [
            "GPU time per call from CUDA-graph replay (no launch overhead); in brackets, per call as "
            "launched one by one from Python. Floor: reading both rows once at the copy bandwidth above.",
            "",
            "| dtype | vocab | pairs | k | fused µs | torch ops µs | fused speed-up | floor µs | floor / fused |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["cold"]:
            lines.append(
                f"| {r['dtype']} | {r['vocab']} | {r['pairs']} | {r['k']} | {r['fused_us']:.1f} "
                f"({r['fused_eager_us']:.0f}) | {r['torch_ops_us']:.1f} ({r['torch_ops_eager_us']:.0f}) | "
                f"{r['speedup']:.1f}x | {r['floor_us']:.2f} | {r['of_floor']:.0%} |"
            )
        lines.append("")
    if report.get("bgmv"):
        lines += [
            "GPU time per call (shrink and expand) from CUDA-graph replay.",
            "",
            "| dtype | rows | d_in → d_out | rank | BGMV µs | torch gathered µs | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["bgmv"]:
            lines.append(
                f"| {r['dtype']} | {r['rows']} | {r['d_in']} → {r['d_out']} | {r['rank']} | {r['bgmv_us']:.1f} | "
                f"{r['torch_gathered_us']:.1f} | {r['speedup']:.1f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cubin-dir", type=Path, default=Path("build/cuda"))
    ap.add_argument("--out", type=Path, default=None, help="Markdown report (a .json beside it)")
    ap.add_argument("--mock", action="store_true", help="torch stand-ins on the CPU (tests this script)")
    ap.add_argument("--no-bench", action="store_true", help="correctness only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.mock:
        kernels: Any = MockKernels()
        device = "cpu"
        global VOCABS, PAIRS
        VOCABS, PAIRS = (1000, 32000), (1, 3)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --mock to test the script on the CPU", file=sys.stderr)
            return 2
        kernels, device = CudaKernels(args.cubin_dir), "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report["checks"] = check_cold(kernels, device, args.seed) + check_bgmv(kernels, device, args.seed)
    if not args.no_bench:
        if device == "cuda":  # bring the clocks up from idle before timing anything
            m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 3:
                m @ m
            torch.cuda.synchronize()
        report["copy_bandwidth"] = copy_bandwidth(device)
        report["cold"] = bench_cold(kernels, device, report["copy_bandwidth"])
        report["bgmv"] = bench_bgmv(kernels, device)
    text = _markdown(report)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
