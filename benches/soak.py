"""Long-run soak of the engine: memory, file handles and threads over many calls.

    python benches/soak.py                       # the packaged model, the full counts (~30 min)
    python benches/soak.py --short 1000 --long 20 --engines 20   # a quick look

Measures, in one process:
- resident memory (RSS) over ``--short`` short generations (4 new tokens) and ``--long`` long ones
  (``--long-tokens`` new tokens, end-of-sequence ignored), read after a warm-up tenth of each;
- open file handles and threads before and after loading and dropping ``--engines`` engines;
- whether generations run from ``--threads`` Python threads on one shared engine equal the same
  calls run one at a time.

Prints a JSON report; `benches/RESULTS.md` records the figures. ``tests/test_soak.py`` runs the
same functions with bounded counts on a tiny model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import peftscale as ps

PROMPTS = [
    "The capital of France is",
    "Question: what is 12 times 7?\nAnswer:",
    "def add(a, b):",
    "Once upon a time",
    "List three colours:",
    "Translate to French: good morning",
    "The sum of the angles of a triangle is",
    "A haiku about the sea:",
]


def rss_mib() -> float:
    """Resident memory of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@dataclass
class MemoryRun:
    calls: int
    rss_start_mib: float
    rss_warm_mib: float
    rss_end_mib: float
    seconds: float

    @property
    def growth_after_warmup_mib(self) -> float:
        return self.rss_end_mib - self.rss_warm_mib


def memory_over_calls(call: Callable[[int], object], count: int) -> MemoryRun:
    """Runs ``call(i)`` ``count`` times; RSS at the start, after the first tenth, at the end."""
    gc.collect()
    start_rss = rss_mib()
    warm_at = max(1, count // 10)
    warm = start_rss
    started = time.perf_counter()
    for i in range(count):
        call(i)
        if i + 1 == warm_at:
            gc.collect()
            warm = rss_mib()
    gc.collect()
    return MemoryRun(count, start_rss, warm, rss_mib(), time.perf_counter() - started)


def short_generations(engine: ps.Engine, count: int) -> MemoryRun:
    def call(i: int) -> object:
        if i % 10 == 9:
            return engine.chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_new_tokens=4)
        return engine.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=4)

    return memory_over_calls(call, count)


def long_generations(engine: ps.Engine, count: int, tokens: int) -> MemoryRun:
    def call(i: int) -> object:
        return engine.generate(
            PROMPTS[i % len(PROMPTS)],
            max_new_tokens=tokens,
            strategy=ps.Sampling(temperature=0.8, seed=i),
            ignore_eos=True,
        )

    return memory_over_calls(call, count)


@dataclass
class Churn:
    engines: int
    files_before: int
    files_after: int
    threads_before: int
    threads_after: int
    rss_before_mib: float
    rss_after_mib: float


def engine_churn(path: Path, count: int, dtype: str = "auto") -> Churn:
    """Loads, uses and drops ``count`` engines; counts handles and threads around it (one engine
    is loaded first, so that pools started once per process are not counted as leaks)."""
    ps.Engine.load(path, dtype=dtype).generate(PROMPTS[0], max_new_tokens=2)
    gc.collect()
    files, thr, rss = open_files(), threads(), rss_mib()
    for _ in range(count):
        e = ps.Engine.load(path, dtype=dtype)
        e.generate(PROMPTS[0], max_new_tokens=2)
        del e
    gc.collect()
    return Churn(count, files, open_files(), thr, threads(), rss, rss_mib())


def shared_between_threads(engine: ps.Engine, n_threads: int, tokens: int = 24) -> bool:
    """Each thread runs its own seeded sampling calls on the one engine; the results must equal
    the same calls made one at a time."""

    def calls(t: int) -> list[list[int]]:
        out = []
        for k in range(3):
            prompt = PROMPTS[(t + k) % len(PROMPTS)]
            strategy = ps.Sampling(temperature=0.9, seed=100 * t + k)
            out.append(engine.generate(prompt, max_new_tokens=tokens, strategy=strategy).token_ids)
        return out

    alone = [calls(t) for t in range(n_threads)]
    together: list[list[list[int]] | None] = [None] * n_threads
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            together[t] = calls(t)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]
    return together == alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF or folder (default: packaged SmolLM2)")
    ap.add_argument("--short", type=int, default=10_000)
    ap.add_argument("--long", type=int, default=200)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--engines", type=int, default=100)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    path = args.model or ps.models.smollm2_135m_instruct()
    engine = ps.Engine.load(path)
    report = {
        "model": str(path),
        "cpu": cpu_name(),
        "short": asdict(short_generations(engine, args.short)),
        "long": asdict(long_generations(engine, args.long, args.long_tokens)),
        "churn": asdict(engine_churn(path, args.engines)),
        "threads_equal_sequential": shared_between_threads(engine, args.threads),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
