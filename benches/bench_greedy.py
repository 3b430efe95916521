"""Greedy decoding speed: peftscale (Q4_1 kept quantized, and f32) against transformers' generate (f32).

Run:  python benches/bench_greedy.py [--new-tokens 128] [--repeats 3]

All three decode the same chat prompt of the packaged SmolLM2-135M-Instruct in one run. The
memory-bandwidth floor is the bytes of weights one decode step reads divided by the measured
read bandwidth of this machine: numpy summing a 2 GiB buffer (far larger than the last-level cache)
with one thread, and with one thread per core over disjoint parts (numpy releases the GIL while it
sums). The engine decodes with every core, so the all-core figure is the floor it is held to.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time

import numpy as np
import peftscale as ps
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def read_bandwidth(nbytes: int, threads: int) -> float:
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(5):
        workers = [threading.Thread(target=p.sum) for p in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def engine_tps(eng: ps.Engine, prompt: str, n: int, repeats: int) -> float:
    eng.generate(prompt, max_new_tokens=8, ignore_eos=True)
    best = 0.0
    for _ in range(repeats):
        out = eng.generate(prompt, max_new_tokens=n, ignore_eos=True)
        best = max(best, len(out.token_ids) / out.stats.seconds)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = ps.models.smollm2_135m_instruct()
    torch.set_num_threads(2)

    q = ps.Engine.load(path)
    prompt = q.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}])
    q_tps = engine_tps(q, prompt, args.new_tokens, args.repeats)
    f = ps.Engine.load(path, dtype="f32")
    f_tps = engine_tps(f, prompt, args.new_tokens, args.repeats)

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = torch.tensor([tok.encode(prompt)])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=8, **kw)
        hf_tps = 0.0
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.new_tokens, **kw)
            hf_tps = max(hf_tps, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))

    cores = os.cpu_count() or 1
    step_bytes = q.weight_bytes
    bandwidth = {1: read_bandwidth(2 << 30, 1), cores: read_bandwidth(2 << 30, cores)}

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {cores} cores, {torch.get_num_threads()} torch threads")
    print(f"prompt tokens: {ids.shape[1]}, new tokens: {args.new_tokens}, best of {args.repeats}")
    print("| engine | tokens/s | vs transformers f32 |")
    print("|---|---|---|")
    print(f"| transformers generate, f32 | {hf_tps:.1f} | 1.00x |")
    print(f"| peftscale f32 | {f_tps:.1f} | {f_tps / hf_tps:.2f}x |")
    print(f"| peftscale Q4_1 (quantized) | {q_tps:.1f} | {q_tps / hf_tps:.2f}x |")
    print()
    print(f"weights read per decode step (Q4_1 layers + Q8_0 head): {step_bytes / 1e6:.1f} MB")
    print("| read bandwidth (2 GiB buffer) | GB/s | floor tokens/s | quantized time / floor time |")
    print("|---|---|---|---|")
    for threads, bw in bandwidth.items():
        floor = bw / step_bytes
        print(f"| {threads} thread(s) | {bw / 1e9:.1f} | {floor:.0f} | {floor / q_tps:.2f}x |")


if __name__ == "__main__":
    main()
