"""The engine on a GPU against the same build on the CPU (issue: the engine on NVIDIA GPUs).

1. Greedy and CoLD decoding of the packaged model, f32, 48 new tokens per prompt, with a random
   LoRA adapter applied unmerged: the GPU's token ids must equal the CPU's.
2. ``ps.cold_top_k`` (the fused kernel of ``cuda/cold.cu`` through candle) against the CPU scorer
   on fresh random rows: vocabularies of 32,000 to 151,936, 1 to 64 pairs; f32 within 1e-5
   relative, bf16 within 1e-2, the same tokens. ``ps.sample_tokens`` (``cuda/sample.cu``)
   against the CPU sampler with the same uniform numbers: the same tokens, but for draws within
   float32 rounding of a boundary (at most 1 in 200).
3. Decode tokens/s on the GPU for 1, 16 and 64 rows (f32 and the GGUF's own Q4_1 weights; greedy,
   and CoLD pairs through the adapter).

    python benches/gpu_engine.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out build/gpu-check/engine.md

Needs a peftscale built with the ``cuda`` feature (``scripts/build-cuda.sh``). ``--device cpu``
runs every step against the CPU itself, to test this script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import peftscale as ps

PROMPTS = [
    "Write a haiku about the sea.",
    "What is 17 times 23? Think step by step.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
]
NEW_TOKENS = 48
VOCABS = (32000, 49152, 128256, 151936)
PAIRS = (1, 8, 64)
TOLERANCE = {"f32": 1e-5, "bf16": 1e-2}
ROWS = (1, 16, 64)
PROJECTIONS = {  # module -> (out, in) as functions of the config
    "self_attn.q_proj": lambda c: (c["num_heads"] * c["head_dim"], c["hidden_size"]),
    "self_attn.v_proj": lambda c: (c["num_kv_heads"] * c["head_dim"], c["hidden_size"]),
    "mlp.down_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
}


def write_adapter(folder: Path, config: dict[str, Any], rank: int = 8, seed: int = 0) -> Path:
    """A random peft LoRA adapter (q, v and down projections of every layer), written without
    torch or safetensors: a JSON header, then the raw little-endian f32 tensors."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(config["num_layers"]):
        for module, shape in PROJECTIONS.items():
            out_f, in_f = shape(config)
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, in_f)) / math.sqrt(in_f)).astype("<f4")
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out_f, rank)) * 0.05).astype("<f4")
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.tobytes())
    modules = sorted({m.split(".")[1] for m in PROJECTIONS})
    config_json = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": modules}
    (folder / "adapter_config.json").write_text(json.dumps(config_json))
    return folder


def load(model: Path, device: str, dtype: str, adapter: Path) -> ps.Engine:
    eng = ps.Engine.load(model, dtype=dtype, device=device)  # type: ignore[arg-type]
    eng.load_adapter(adapter, name="lora")
    return eng


def prompts(eng: ps.Engine, n: int) -> list[list[int]]:
    """`n` chat prompts, distinct so that no row shares another's prefix past the template."""
    out = []
    for i in range(n):
        text = PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i})")
        out.append(eng.tokenizer.encode(eng.apply_chat_template([{"role": "user", "content": text}])))
    return out


def decode_matches(cpu: ps.Engine, gpu: ps.Engine) -> list[dict[str, Any]]:
    rows = []
    ids = prompts(cpu, len(PROMPTS))
    # Greedy and CoLD choose their tokens on the GPU (the sampler and CoLD kernels); beam search
    # reads whole rows on the host and forks sequences on the device (informational).
    cases: list[tuple[str, ps.Strategy | None, str | None]] = [
        ("greedy, base model", None, None),
        ("greedy, adapter unmerged", None, "lora"),
        ("CoLD (alpha 0.1, beta 0.5)", ps.CoLD(), "lora"),
        ("beam search (3 beams), informational", ps.BeamSearch(num_beams=3), "lora"),
    ]
    on_cpu: list[list[list[int]]] = []
    for name, strategy, adapter in cases:
        want = cpu.generate(ids, max_new_tokens=NEW_TOKENS, strategy=strategy, adapter=adapter, ignore_eos=True)
        got = gpu.generate(ids, max_new_tokens=NEW_TOKENS, strategy=strategy, adapter=adapter, ignore_eos=True)
        on_cpu.append([w.token_ids for w in want])
        for p, (w, g) in enumerate(zip(want, got, strict=True)):
            first = next((i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids, strict=True)) if a != b), None)
            rows.append({"case": name, "prompt": p, "tokens": len(w.token_ids), "equal": w.token_ids == g.token_ids,
                         "first_difference": first})  # fmt: skip
    # The adapter and the contrast must change the text, or their cases check nothing.
    for (a, b), what in (((0, 1), "adapter changes greedy"), ((1, 2), "CoLD changes the adapter's greedy")):
        changed = sum(x != y for x, y in zip(on_cpu[a], on_cpu[b], strict=True))
        rows.append({"case": what, "prompt": "all", "changed": changed, "effective": changed >= 2})
    # How far apart the two devices' logits are on the first prompt (f32 rounding only).
    for adapter in (None, "lora"):
        a, b = cpu.logits(ids[0], adapter=adapter), gpu.logits(ids[0], adapter=adapter)
        rel = float((np.abs(a - b).max(axis=1) / np.abs(a).max(axis=1)).max())
        rows.append({"case": f"prompt logits, {adapter or 'base'}", "prompt": 0, "relative_difference": rel})
    return rows


def cold_matches(device: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for vocab in VOCABS:
        for pairs in PAIRS:
            for dtype, tol in TOLERANCE.items():
                expert = (rng.standard_normal((pairs, vocab)) * 4).astype(np.float32)
                base = (0.7 * expert + rng.standard_normal((pairs, vocab)) * 2).astype(np.float32)
                want_i, want_s = ps.cold_top_k(expert, base, k=8, dtype=dtype)  # type: ignore[arg-type]
                got_i, got_s = ps.cold_top_k(expert, base, k=8, device=device, dtype=dtype)  # type: ignore[arg-type]
                finite = np.isfinite(want_s)
                err = float((np.abs(got_s - want_s)[finite] / np.maximum(1.0, np.abs(want_s[finite]))).max())
                ok = bool(np.array_equal(got_i, want_i)) and err <= tol
                rows.append({"vocab": vocab, "pairs": pairs, "dtype": dtype, "max_rel_error": err, "ok": ok})
    return rows


SAMPLING = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 50, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (0.8, 200, 0.95, 0.05),
]


def sample_matches(device: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed + 1)
    rows = []
    for vocab in VOCABS:
        for n in PAIRS:
            for t, k, p, m in SAMPLING:
                logits = (rng.standard_normal((n, vocab)) * 3).astype(np.float32)
                u = rng.random(n)
                want = ps.sample_tokens(logits, u, temperature=t, top_k=k, top_p=p, min_p=m)
                got = ps.sample_tokens(logits, u, temperature=t, top_k=k, top_p=p, min_p=m, device=device)
                rows.append({"vocab": vocab, "rows": n, "params": f"t={t} k={k} p={p} min_p={m}",
                             "differ": int((want != got).sum())})  # fmt: skip
    return rows


def tokens_per_second(
    model: Path, device: str, adapter: Path, rows: list[dict[str, Any]], save: Callable[[], None]
) -> None:
    """Appends to `rows` and saves the report after each measurement (a time limit then keeps
    what was measured)."""
    for dtype in ("f32", "auto"):
        eng = load(model, device, dtype, adapter)
        for cold in (False, True):
            for n in ROWS:
                ids = prompts(eng, n)
                kwargs: dict[str, Any] = {"strategy": ps.CoLD(), "adapter": "lora"} if cold else {}
                eng.generate(ids[:1], max_new_tokens=4, ignore_eos=True, **kwargs)  # warm-up
                start = time.perf_counter()
                outs = eng.generate(ids, max_new_tokens=64, ignore_eos=True, **kwargs)
                seconds = time.perf_counter() - start
                new = sum(len(o.token_ids) for o in outs)
                weights, strategy = ("f32" if dtype == "f32" else "Q4_1"), ("CoLD" if cold else "greedy")
                rows.append({"weights": weights, "strategy": strategy, "rows": n, "new_tokens": new,
                             "seconds": seconds, "tokens_per_s": new / seconds})  # fmt: skip
                save()


def report(out: dict[str, Any]) -> str:
    lines = [f"# The engine on `{out['device']}` against the CPU", "", f"- {out['machine']}", ""]
    lines += ["## Decoding, f32, 48 new tokens per prompt", "", "| case | prompt | equal | first difference |",
              "|---|---|---|---|"]  # fmt: skip
    for r in out.get("decode", []):
        if "equal" in r:
            lines.append(f"| {r['case']} | {r['prompt']} | {r['equal']} | {r['first_difference']} |")
    for r in out.get("decode", []):
        if "changed" in r:
            lines.append(f"\n{r['case']}: {r['changed']} of {len(PROMPTS)} prompts")
    for r in out.get("decode", []):
        if "relative_difference" in r:
            lines.append(f"\n{r['case']}: largest relative difference {r['relative_difference']:.2e}")
    lines += ["", "## `ps.cold_top_k` on the device against the CPU scorer (k = 8)", "",
              "| vocab | pairs | dtype | max rel. error | ok |", "|---|---|---|---|---|"]  # fmt: skip
    for r in out.get("cold", []):
        lines.append(f"| {r['vocab']} | {r['pairs']} | {r['dtype']} | {r['max_rel_error']:.1e} | {r['ok']} |")
    if "sample" in out:
        draws = sum(r["rows"] for r in out["sample"])
        differ = sum(r["differ"] for r in out["sample"])
        lines += ["", f"## `ps.sample_tokens` on the device against the CPU: {differ} of {draws} draws differ", ""]
        lines += [f"- vocab {r['vocab']}, {r['rows']} rows, {r['params']}: {r['differ']} differ"
                  for r in out["sample"] if r["differ"]]  # fmt: skip
    if out.get("speed"):
        lines += ["", "## Decode speed on the device (64 new tokens per row)", "",
                  "| weights | strategy | rows | tokens/s |", "|---|---|---|---|"]  # fmt: skip
        for r in out["speed"]:
            lines.append(f"| {r['weights']} | {r['strategy']} | {r['rows']} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the packaged SmolLM2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="Markdown report (a .json beside it)")
    ap.add_argument("--no-bench", action="store_true", help="correctness only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = args.model or ps.models.smollm2_135m_instruct()
    started = time.perf_counter()
    out: dict[str, Any] = {"device": args.device, "machine": f"{platform.node()} {platform.processor()}"}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report(out))
            args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        cpu = ps.Engine.load(model, dtype="f32")
        adapter = write_adapter(Path(tmp) / "lora", cpu.config, seed=args.seed)
        cpu.load_adapter(adapter, name="lora")
        gpu = load(model, args.device, "f32", adapter)
        out["decode"] = decode_matches(cpu, gpu)
        save()
        print(f"decode checked ({time.perf_counter() - started:.0f} s)", flush=True)
        out["cold"] = cold_matches(args.device, args.seed)
        save()
        print(f"cold_top_k checked ({time.perf_counter() - started:.0f} s)", flush=True)
        out["sample"] = sample_matches(args.device, args.seed)
        save()
        print(f"sample_tokens checked ({time.perf_counter() - started:.0f} s)", flush=True)
        del cpu, gpu
        if not args.no_bench:
            out["speed"] = []
            tokens_per_second(model, args.device, adapter, out["speed"], save)
    print(report(out))
    failed = [r for r in out["decode"] if r.get("effective") is False]
    failed += [r for r in out["decode"] if r.get("equal") is False and "informational" not in r["case"]]
    failed += [r for r in out["cold"] if not r["ok"]]
    draws = sum(r["rows"] for r in out["sample"])
    if sum(r["differ"] for r in out["sample"]) * 200 > draws:
        failed.append({"case": "sample_tokens", "draws": draws})
    print(f"{len(failed)} failed; {time.perf_counter() - started:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
