"""Peak memory and step time of full fine-tuning, LoRA and QLoRA on the packaged SmolLM2-135M.

Run:  python benches/bench_train.py [--steps 6] [--batch-size 4] [--max-length 256]

Each method trains in its own process (so that one method's peak cannot hide in another's) through
`ps.train.run`, on GSM8K train rows (../shared/data), every example cut to --max-length tokens.
Reported per method: the median seconds per optimizer step (the first step left out), training
tokens per second, the peak resident memory of the process during the training steps, and the
peak over the whole run (model loading included: QLoRA loads the GGUF in f32 once before
quantizing it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"

METHODS = {
    "full fine-tuning, AdamW": {"method": "full", "optimizer": "adamw", "lr": 2e-5},
    "full fine-tuning, 8-bit AdamW": {"method": "full", "optimizer": "adamw8bit", "lr": 2e-5},
    "LoRA r=16 all-linear, AdamW": {"method": "lora", "optimizer": "adamw", "lr": 2e-4},
    "QLoRA (NF4 base) r=16, 8-bit AdamW": {"method": "qlora", "optimizer": "adamw8bit", "lr": 2e-4},
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict, steps: int, batch_size: int, max_length: int) -> None:
    import resource

    import peftscale as ps
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peak = 0
            self.t = 0.0

        def on_step_begin(self, args, state, control, **kw) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw) -> None:
            self.times.append(time.perf_counter() - self.t)
            self.peak = max(self.peak, rss_bytes())

    probe = Probe()
    with tempfile.TemporaryDirectory() as out:
        config = {
            "method": spec["method"],
            "model": "packaged",
            "data": {"path": str(DATA), "format": "gsm8k", "limit": steps * batch_size * 2, "eval_rows": 0},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {
                "max_steps": steps,
                "batch_size": batch_size,
                "max_length": max_length,
                "lr": spec["lr"],
                "optimizer": spec["optimizer"],
                "save_every": 10 * steps,
                "log_every": 1,
            },
            "output": out,
        }
        ps.train.run(config, callbacks=[probe])
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "step_s": statistics.median(probe.times[1:]),
                "train_peak": probe.peak,
                "whole_peak": whole,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child), args.steps, args.batch_size, args.max_length)
        return
    shape = f"batch {args.batch_size} x <= {args.max_length} tokens"
    print(f"packaged SmolLM2-135M-Instruct, GSM8K rows, {shape}, ", end="")
    print(f"{args.steps} steps (median of steps 2..{args.steps}), {os.cpu_count()} cores, torch on the CPU")
    print("| method | s/step | peak RSS while training | peak RSS, whole run |")
    print("|---|---|---|---|")
    for name, spec in METHODS.items():
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        gib = 1 << 30
        print(f"| {name} | {r['step_s']:.2f} | {r['train_peak'] / gib:.2f} GiB | {r['whole_peak'] / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
