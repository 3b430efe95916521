"""Per-token latency of CoLD against greedy decoding with the same unmerged adapter.

Run:  python benches/bench_cold.py [--new-tokens 128] [--repeats 9]

The packaged SmolLM2-135M-Instruct kept quantized (Q4_1), with a random r=16 LoRA adapter on all
seven projections of every layer (written in peft's format; its values do not affect speed).
Reports base greedy, greedy with the adapter, paired CoLD (base and expert rows in one forward
pass) and naive CoLD (two passes per step), in milliseconds: per generated token with the prompt's
pass included, per output token after the first (TPOT), and to the first token (TTFT).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import peftscale as ps
from safetensors.numpy import save_file


def write_adapter(folder: Path, eng: ps.Engine, rank: int = 16) -> None:
    c = eng.config
    h, inter = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    shapes = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(c["num_layers"]):
        for module, (out_f, in_f) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, in_f)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out_f, rank)) * 0.002).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear", "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


Timings = dict[str, dict[str, float]]


def timings(runs: dict[str, tuple[ps.Engine, dict[str, object]]], prompt: str, n: int, repeats: int) -> Timings:
    """Median timings of each named (engine, generate kwargs) run, in milliseconds:
    ``per_token`` (whole call over new tokens, prompt included), ``tpot`` (per output token
    after the first) and ``ttft`` (time to the first token: the prompt and one step).

    The runs take turns, round after round, so that a slow spell of a shared machine hits all
    of them alike rather than whichever happened to run then; the median of the rounds then
    sheds the spells themselves.
    """
    for eng, kw in runs.values():
        eng.generate(prompt, max_new_tokens=4, ignore_eos=True, **kw)  # type: ignore[arg-type]
    got: dict[str, dict[str, list[float]]] = {name: {"per_token": [], "tpot": [], "ttft": []} for name in runs}
    for _ in range(repeats):
        for name, (eng, kw) in runs.items():
            out = eng.generate(prompt, max_new_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]
            got[name]["per_token"].append(1000 * out.stats.seconds / len(out.token_ids))
            got[name]["tpot"].append(1000 * out.stats.seconds_per_output_token)
            got[name]["ttft"].append(1000 * out.stats.first_token_seconds)
    return {name: {k: float(np.median(v)) for k, v in t.items()} for name, t in got.items()}


def ms_per_token(
    runs: dict[str, tuple[ps.Engine, dict[str, object]]], prompt: str, n: int, repeats: int
) -> dict[str, float]:
    """Median milliseconds per generated token (prompt included) of each run; see `timings`."""
    return {name: t["per_token"] for name, t in timings(runs, prompt, n, repeats).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    eng = ps.Engine.load(ps.models.smollm2_135m_instruct())
    with tempfile.TemporaryDirectory() as d:
        write_adapter(Path(d), eng)
        eng.load_adapter(d, name="r16")
    prompt = eng.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}])
    n, r = args.new_tokens, args.repeats
    t = timings(
        {
            "base": (eng, {}),
            "greedy": (eng, {"adapter": "r16"}),
            "paired": (eng, {"adapter": "r16", "strategy": ps.CoLD()}),
            "naive": (eng, {"adapter": "r16", "strategy": ps.CoLD(paired=False)}),
        },
        prompt,
        n,
        r,
    )
    prompt_tokens = len(eng.tokenizer.encode(prompt))
    print(f"Q4_1 SmolLM2-135M, r=16 all-linear adapter, {prompt_tokens}-token prompt, {n} new tokens, ", end="")
    print(f"median of {r} rounds")
    print("| decoding | ms/token, prompt included | per output token (TPOT) | first token (TTFT) |")
    print("|---|---|---|---|")
    rows = [
        ("greedy, base model", "base", "base"),
        ("greedy, unmerged adapter", "greedy", "base"),
        ("CoLD, paired (one pass)", "paired", "greedy"),
        ("CoLD, naive (two passes)", "naive", "greedy"),
    ]
    for label, name, ref in rows:
        cells = []
        for k in ("per_token", "tpot", "ttft"):
            v = t[name][k]
            against = "" if name == ref else f" = {v / t[ref][k]:.2f}x {'base' if ref == 'base' else 'greedy+adapter'}"
            cells.append(f"{v:.2f}{against}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
