"""End to end: train a tiny LoRA with peft on the packaged model, load it in the engine, decode with CoLD."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import peftscale as ps
import torch
from peft import LoraConfig, get_peft_model

FORMAT = "The answer is"


def _examples(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        out.append((f"Q: What is {a} plus {b}?\nA:", f" {FORMAT} {a + b}.\n"))
    return out


def test_trained_adapter_loads_and_decodes_with_cold(tmp_path: Path, smollm2_path: Path, hf_smollm2) -> None:
    base, tok = hf_smollm2
    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    data = _examples(64, seed=1)
    for step in range(24):
        batch = data[(step * 4) % 64 : (step * 4) % 64 + 4]
        loss = torch.tensor(0.0)
        for prompt, answer in batch:
            p_ids, a_ids = tok.encode(prompt), tok.encode(answer)
            ids = torch.tensor([p_ids + a_ids])
            labels = torch.tensor([[-100] * len(p_ids) + a_ids])  # loss on the completion only
            loss = loss + model(ids, labels=labels).loss / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "adder")

    # The engine applies the trained adapter as peft does.
    f32 = ps.Engine.load(smollm2_path, dtype="f32")
    f32.load_adapter(tmp_path / "adder", name="adder")
    ids = tok.encode("Q: What is 7 plus 5?\nA:")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = f32.logits(ids, adapter="adder")
    assert float((np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()) < 1e-4

    # On the quantized model, CoLD with the adapter answers in the trained format.
    eng = ps.Engine.load(smollm2_path)
    eng.load_adapter(tmp_path / "adder", name="adder")
    held_out = [p for p, _ in _examples(4, seed=99)]
    cold = eng.generate(held_out, max_new_tokens=12, adapter="adder", strategy=ps.CoLD(), stop=["\n"])
    base_out = eng.generate(held_out, max_new_tokens=12, stop=["\n"])
    assert all(o.text.strip().startswith(FORMAT) for o in cold), [o.text for o in cold]
    assert not all(o.text.strip().startswith(FORMAT) for o in base_out), "the base model already used the format"

    # Merged into the Q4_1 weights (requantized), plain greedy keeps the trained format.
    merged = ps.Engine.load(smollm2_path)
    merged.merge_adapter(tmp_path / "adder")
    greedy = merged.generate(held_out, max_new_tokens=12, stop=["\n"])
    assert all(o.text.strip().startswith(FORMAT) for o in greedy), [o.text for o in greedy]
