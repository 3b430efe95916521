"""Greedy decoding speed: peftscale (Q4_1 kept quantized, and f32) against transformers' generate (f32).

Run:  python benches/bench_greedy.py [--new-tokens 128] [--repeats 3]

All three decode the same chat prompt of the packaged SmolLM2-135M-Instruct in one run. The
memory-bandwidth floor is the bytes of weights one decode step reads divided by the measured
read bandwidth of this machine (a single thread summing a buffer larger than the last-level cache,
and a 200 MB buffer that fits in it).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import peftscale as ps
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def read_bandwidth(nbytes: int) -> float:
    a = np.ones(nbytes // 4, dtype=np.float32)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
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

    bw_dram = read_bandwidth(2 << 30)
    bw_cache = read_bandwidth(200 << 20)
    step_bytes = q.weight_bytes
    floor_dram = bw_dram / step_bytes
    floor_cache = bw_cache / step_bytes

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"prompt tokens: {ids.shape[1]}, new tokens: {args.new_tokens}, best of {args.repeats}")
    print("| engine | tokens/s | vs transformers f32 |")
    print("|---|---|---|")
    print(f"| transformers generate, f32 | {hf_tps:.1f} | 1.00x |")
    print(f"| peftscale f32 | {f_tps:.1f} | {f_tps / hf_tps:.2f}x |")
    print(f"| peftscale Q4_1 (quantized) | {q_tps:.1f} | {q_tps / hf_tps:.2f}x |")
    print()
    print(f"weights read per decode step (Q4_1 + Q8_0 head): {step_bytes / 1e6:.1f} MB")
    print(
        f"read bandwidth, 2 GiB buffer: {bw_dram / 1e9:.1f} GB/s -> floor {floor_dram:.0f} tokens/s; "
        f"quantized is {floor_dram / q_tps:.2f}x the floor time"
    )
    print(
        f"read bandwidth, 200 MiB buffer: {bw_cache / 1e9:.1f} GB/s -> floor {floor_cache:.0f} tokens/s; "
        f"quantized is {floor_cache / q_tps:.2f}x the floor time"
    )


if __name__ == "__main__":
    main()
