"""Merged against unmerged LoRA adapters: decoding speed and what merging into Q4_1 costs in accuracy.

Run:  python benches/bench_merge.py [--adapter PEFT_FOLDER] [--new-tokens 128] [--repeats 9]

Without --adapter, a small LoRA is trained first with peft (about a minute: 24 AdamW steps teaching
the packaged model to answer "Q: What is a plus b?" with " The answer is N."), because merging
matters for trained updates, not random ones. The reference is the exact adapted model: the f32
engine with the adapter unmerged (tests/test_lora.py holds it to peft within 1e-4). Quality is
KL(reference || model) and top-1 agreement over GSM8K test texts; speed is greedy ms per token on
the quantized model.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import peftscale as ps

sys.path.insert(0, str(Path(__file__).parent))
from bench_cold import ms_per_token  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def train_adder(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ps.models.smollm2_135m_instruct()
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    rng = random.Random(1)
    pairs = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(96)]
    for step in range(24):
        loss = torch.tensor(0.0)
        for a, b in pairs[step * 4 : step * 4 + 4]:
            p_ids = tok.encode(f"Q: What is {a} plus {b}?\nA:")
            a_ids = tok.encode(f" The answer is {a + b}.\n")
            labels = torch.tensor([[-100] * len(p_ids) + a_ids])
            loss = loss + model(torch.tensor([p_ids + a_ids]), labels=labels).loss / 4
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def quality(ref: list[np.ndarray], outs: list[np.ndarray]) -> tuple[float, float]:
    kl, agree = [], []
    for r, o in zip(ref, outs, strict=True):
        lr, lo = log_softmax(r), log_softmax(o)
        kl.append((np.exp(lr) * (lr - lo)).sum(axis=1))
        agree.append(r.argmax(axis=1) == o.argmax(axis=1))
    return float(np.concatenate(kl).mean()), float(np.concatenate(agree).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    model = ps.models.smollm2_135m_instruct()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter
        if adapter is None:
            adapter = Path(tmp) / "adder"
            print("training a small LoRA with peft ...", flush=True)
            train_adder(adapter)
        exact = ps.Engine.load(model, dtype="f32")
        exact.load_adapter(adapter, name="a")
        q = ps.Engine.load(model)
        q.load_adapter(adapter, name="a")
        merged_q = ps.Engine.load(model)
        merged_q.merge_adapter(adapter)
        merged_f32 = ps.Engine.load(model, dtype="f32")
        merged_f32.merge_adapter(adapter)

        rows = [json.loads(line) for line in DATA.open()][: args.texts]
        seqs = [exact.tokenizer.encode(r["question"] + "\n" + r["answer"]) for r in rows]
        ref = exact.logits(seqs, adapter="a")
        positions = sum(map(len, seqs))
        print(f"Quality against the exact adapted model (f32, unmerged), {positions} positions of GSM8K test text")
        print("| model | KL(exact ‖ model) | top-1 agreement |")
        print("|---|---|---|")
        for name, outs in [
            ("f32, merged", merged_f32.logits(seqs)),
            ("Q4_1, base (no adapter)", q.logits(seqs)),
            ("Q4_1, adapter unmerged", q.logits(seqs, adapter="a")),
            ("Q4_1, adapter merged", merged_q.logits(seqs)),
        ]:
            kl, agree = quality(ref, outs)
            print(f"| {name} | {kl:.4f} | {100 * agree:.2f}% |")

        prompt = q.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}])
        n, r = args.new_tokens, args.repeats
        ms = ms_per_token({"base": (q, {}), "unmerged": (q, {"adapter": "a"}), "merged": (merged_q, {})}, prompt, n, r)
        base, unmerged, merged = ms["base"], ms["unmerged"], ms["merged"]
        print(f"\nQ4_1 greedy, {n} new tokens, median of {r} rounds")
        print("| decoding | ms/token | ratio to base |")
        print("|---|---|---|")
        print(f"| base model | {base:.2f} | 1.00x |")
        print(f"| adapter unmerged | {unmerged:.2f} | {unmerged / base:.2f}x |")
        print(f"| adapter merged | {merged:.2f} | {merged / base:.2f}x |")


if __name__ == "__main__":
    main()
