"""LoRA adapters and CoLD on the packaged SmolLM2, against peft as the oracle."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import peftscale as ps
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Natalia sold 48 clips in April and half as many in May. How many in total?\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


def _scaled_init(model: torch.nn.Module, scale: float) -> None:
    """peft's init_lora_weights=False draws B like A; shrink B so the adapted model stays sane."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(scale)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, hf_smollm2) -> dict[str, tuple[Path, PeftModel]]:
    base, _ = hf_smollm2
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    full = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=ALL, init_lora_weights=False)
    )
    _scaled_init(full, 0.05)
    full.save_pretrained(root / "full")
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"down_proj": 24},
        layers_to_transform=list(range(0, 30, 2)),
        init_lora_weights=False,
    )
    sub = get_peft_model(copy.deepcopy(base), cfg)
    _scaled_init(sub, 0.05)
    sub.save_pretrained(root / "rslora")
    for m in (full, sub):
        m.eval()
    return {"full": (root / "full", full), "rslora": (root / "rslora", sub)}


@pytest.fixture(scope="module")
def eng(smollm2_path: Path, adapters) -> ps.Engine:
    e = ps.Engine.load(smollm2_path, dtype="f32")
    for name, (path, _) in adapters.items():
        e.load_adapter(path, name=name)
    return e


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float((np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


def _peft_logits(model: PeftModel, ids: list[int], adapter: bool = True) -> np.ndarray:
    with torch.no_grad():
        if adapter:
            return model(torch.tensor([ids])).logits[0].numpy()
        with model.disable_adapter():
            return model(torch.tensor([ids])).logits[0].numpy()


def test_adapter_logits_match_peft_at_every_position(eng: ps.Engine, adapters, hf_smollm2) -> None:
    _, tok = hf_smollm2
    assert eng.adapters == ["full", "rslora"]
    for name, (_, model) in adapters.items():
        for text in TEXTS:
            ids = tok.encode(text)
            assert _rel(eng.logits(ids, adapter=name), _peft_logits(model, ids)) < 1e-4, name
            assert _rel(eng.logits(ids), _peft_logits(model, ids, adapter=False)) < 1e-4


def test_rows_of_one_batch_use_different_adapters(eng: ps.Engine, adapters, hf_smollm2) -> None:
    _, tok = hf_smollm2
    seqs = [tok.encode(t) for t in TEXTS] + [tok.encode(TEXTS[0])]
    names = ["full", None, "rslora", "full"]
    outs = eng.logits(seqs, adapter=names)
    for ids, name, ours in zip(seqs, names, outs, strict=True):
        model = adapters[name or "full"][1]
        assert _rel(ours, _peft_logits(model, ids, adapter=name is not None)) < 1e-4


def test_bf16_stored_adapter_matches_peft(tmp_path: Path, smollm2_path: Path, adapters, hf_smollm2) -> None:
    base, tok = hf_smollm2
    src = adapters["rslora"][0]
    dst = tmp_path / "bf16"
    shutil.copytree(src, dst)
    weights = load_file(dst / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, dst / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(copy.deepcopy(base), dst).eval()
    e = ps.Engine.load(smollm2_path, dtype="f32")
    e.load_adapter(dst, name="bf16")
    ids = tok.encode(TEXTS[1])
    assert _rel(e.logits(ids, adapter="bf16"), _peft_logits(model, ids)) < 1e-4


def _cold_reference(model: PeftModel, ids: list[int], steps: int, alpha=0.1, beta=0.5, base_t=1.0) -> list[int]:
    """CoLD step by step with torch + peft: full recompute of both models at every step."""
    seq = list(ids)
    out = []
    for _ in range(steps):
        expert = torch.tensor(_peft_logits(model, seq)[-1])
        base = torch.tensor(_peft_logits(model, seq, adapter=False)[-1])
        keep = expert >= math.log(alpha) + expert.max()
        score = torch.where(keep, (1 + beta) * expert - beta * (base / base_t), torch.tensor(-math.inf))
        t = int(score.argmax())
        seq.append(t)
        out.append(t)
    return out


COLD_PROMPTS = [
    "The capital of France is",
    "Question: What is 7 times 8?\nAnswer:",
    "Once upon a time, in a small village,",
    "def add(a, b):\n",
    "The three primary colors are",
]


@pytest.mark.parametrize("prompt", COLD_PROMPTS)
def test_cold_matches_torch_reference(eng: ps.Engine, adapters, hf_smollm2, prompt: str) -> None:
    _, tok = hf_smollm2
    ids = tok.encode(prompt)
    ref = _cold_reference(adapters["full"][1], ids, 48)
    out = eng.generate(ids, max_new_tokens=48, adapter="full", strategy=ps.CoLD(), ignore_eos=True)
    assert out.token_ids == ref


def test_cold_beta_zero_is_greedy_with_the_adapter_and_naive_pairing_agrees(eng: ps.Engine) -> None:
    prompt = "The capital of France is"
    greedy = eng.generate(prompt, max_new_tokens=24, adapter="rslora", ignore_eos=True)
    plain = eng.generate(prompt, max_new_tokens=24, adapter="rslora", strategy=ps.CoLD(beta=0.0), ignore_eos=True)
    assert plain.token_ids == greedy.token_ids
    paired = eng.generate(prompt, max_new_tokens=24, adapter="full", strategy=ps.CoLD(), ignore_eos=True)
    naive = eng.generate(prompt, max_new_tokens=24, adapter="full", strategy=ps.CoLD(paired=False), ignore_eos=True)
    assert naive.token_ids == paired.token_ids
    assert naive.stats.forward_passes == 2 * paired.stats.forward_passes
    assert naive.stats.steps == paired.stats.steps == len(paired.token_ids)
    sampled = [
        eng.generate(prompt, max_new_tokens=12, adapter="full", strategy=ps.CoLD(sample=True, seed=s)).token_ids
        for s in (3, 3)
    ]
    assert sampled[0] == sampled[1]


# --- errors ------------------------------------------------------------------------------------


def _edited(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "c_attn"]}, "c_attn"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"rank_pattern": {"q_proj": 4}}, "rank"),
        ({"bias": "all"}, "bias"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"r": 0}, "`r`"),
        ({"target_modules": ["q_proj"]}, "does not target"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(
    eng: ps.Engine, adapters, tmp_path: Path, changes: dict, message: str
) -> None:
    bad = _edited(adapters["full"][0], tmp_path / "bad", **changes)
    with pytest.raises(ps.AdapterError, match=message):
        eng.load_adapter(bad, name="bad")
    assert "bad" not in eng.adapters


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.lm_head.lora_A.weight", "lm_head"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding"),
    ],
)
def test_unsupported_tensors_are_refused(eng: ps.Engine, adapters, tmp_path: Path, key: str, message: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(adapters["full"][0], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    weights[key] = torch.zeros(16, 576)
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(ps.AdapterError, match=message):
        eng.load_adapter(bad, name="bad")


def test_adapter_of_another_base_model_is_refused(eng: ps.Engine, tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "tiny")
    with pytest.raises(ps.AdapterError, match="different base model"):
        eng.load_adapter(tmp_path / "tiny", name="tiny")


def test_missing_files_and_bad_requests(eng: ps.Engine, adapters, tmp_path: Path) -> None:
    with pytest.raises(ps.AdapterError, match="not a folder"):
        eng.load_adapter(tmp_path / "nowhere", name="x")
    empty = tmp_path / "empty"
    shutil.copytree(adapters["full"][0], empty)
    (empty / "adapter_model.safetensors").unlink()
    with pytest.raises(ps.AdapterError, match="adapter_model.safetensors is missing"):
        eng.load_adapter(empty, name="x")
    with pytest.raises(ps.InvalidArgument, match="already loaded"):
        eng.load_adapter(adapters["full"][0], name="full")
    with pytest.raises(ps.InvalidArgument, match="no adapter named `nope`"):
        eng.generate("Hi", max_new_tokens=2, adapter="nope")
    with pytest.raises(ps.InvalidArgument, match="every prompt needs an adapter"):
        eng.generate("Hi", max_new_tokens=2, strategy=ps.CoLD())
    with pytest.raises(ps.InvalidArgument, match="alpha"):
        eng.generate("Hi", max_new_tokens=2, adapter="full", strategy=ps.CoLD(alpha=0.0))
    with pytest.raises(ps.InvalidArgument, match="2 adapters given for 1"):
        eng.logits([1, 2, 3], adapter=["full", None])


def test_an_adapter_named_twice_in_one_batch(eng: ps.Engine, adapters) -> None:
    """Rows naming the same adapter share it; the same folder under a second name is a second,
    equal adapter. Each row decodes as it would alone."""
    eng.load_adapter(adapters["full"][0], name="full-again")
    try:
        prompts = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[0]]
        names = ["full", "full", "full-again", None]
        together = eng.generate(prompts, max_new_tokens=12, adapter=names, ignore_eos=True)
        alone = [
            eng.generate(p, max_new_tokens=12, adapter=a, ignore_eos=True) for p, a in zip(prompts, names, strict=True)
        ]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        for t, a in zip(together, alone, strict=True):
            np.testing.assert_allclose(t.logprobs, a.logprobs, atol=1e-4)
        np.testing.assert_allclose(together[0].logprobs, together[2].logprobs, atol=1e-4)
        # The adapter is applied: the base row's probabilities differ.
        assert np.abs(np.array(together[0].logprobs) - np.array(together[3].logprobs)).max() > 1e-3
    finally:
        eng.unload_adapter("full-again")


def test_cold_departs_from_greedy_with_the_adapter(eng: ps.Engine) -> None:
    """The contrast must matter: on these prompts CoLD and plain expert greedy part ways."""
    outs = eng.generate(COLD_PROMPTS, max_new_tokens=48, adapter="full", strategy=ps.CoLD(), ignore_eos=True)
    greedy = eng.generate(COLD_PROMPTS, max_new_tokens=48, adapter="full", ignore_eos=True)
    assert sum(c.token_ids != g.token_ids for c, g in zip(outs, greedy, strict=True)) >= 2


@pytest.mark.parametrize("name", ["full", "rslora"])
def test_merged_adapter_matches_peft_merge_and_unload(smollm2_path: Path, adapters, hf_smollm2, name: str) -> None:
    _, tok = hf_smollm2
    path, model = adapters[name]
    merged = copy.deepcopy(model).merge_and_unload().eval()
    e = ps.Engine.load(smollm2_path, dtype="f32")
    ids = tok.encode(TEXTS[1])
    before = e.logits(ids)
    with pytest.raises(ps.AdapterError, match="not a folder"):
        e.merge_adapter(path / "nowhere")
    assert e.merged_adapters == [] and np.array_equal(e.logits(ids), before)

    e.merge_adapter(path)
    assert e.merged_adapters == [path]
    for text in TEXTS:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = merged(torch.tensor([ids])).logits[0].numpy()
        assert _rel(e.logits(ids), ref) < 1e-4, name


# Least top-1 agreement with peft: bf16's 8-bit mantissa alone costs the packaged model ~3% mean
# error and some of its top-1 picks.
HALF_PRECISION_TOP1 = {"f16": 0.95, "bf16": 0.8}
# An adapter may add at most this factor to the error the dtype's rounding gives the same text
# without it (measured in the same run, so the bound holds on whichever kernels this CPU runs).
ROUNDING_GROWTH = 2.5


@pytest.fixture(scope="module")
def strong_adapters(adapters, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PeftModel]]:
    """The two adapters with B four times larger: at the fixture's scale, an adapter's effect is
    no larger than bf16's rounding noise, so whether it was applied could not be told apart."""
    root = tmp_path_factory.mktemp("strong")
    out = {}
    for name, (_, model) in adapters.items():
        strong = copy.deepcopy(model)
        _scaled_init(strong, 4.0)
        strong.save_pretrained(root / name)
        out[name] = (root / name, strong.eval())
    return out


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_model_runs_adapters_unmerged_and_merged(
    smollm2_path: Path, strong_adapters, hf_smollm2, dtype: str
) -> None:
    """The tensor forward pass (the GPU's) applies adapters unmerged, rows of one batch each
    with its own adapter or none, and merging works there too: against peft in f32, an adapted
    row's error stays within what the dtype's rounding gives the base model on the same text,
    and is well under the adapter's own effect."""
    _, tok = hf_smollm2
    adapters = strong_adapters
    e = ps.Engine.load(smollm2_path, dtype=dtype)
    for name, (path, _) in adapters.items():
        e.load_adapter(path, name=name)
    seqs = [tok.encode(t) for t in TEXTS] + [tok.encode(TEXTS[1] + " " + TEXTS[0])]
    names = ["full", None, "rslora", "full"]

    def check(ours: np.ndarray, base: np.ndarray, model: PeftModel, ids: list[int], label: str) -> None:
        ref, ref_base = _peft_logits(model, ids), _peft_logits(model, ids, adapter=False)
        rounding = _mean_err(base, ref_base)
        err = _mean_err(ours, ref)
        assert err <= ROUNDING_GROWTH * rounding, (dtype, label, err, rounding)
        assert err < 0.5 * _mean_err(ref_base, ref), (dtype, label, err)
        assert np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)) >= HALF_PRECISION_TOP1[dtype], (dtype, label)

    bases = e.logits(seqs)
    for i, (name, ours) in enumerate(zip(names, e.logits(seqs, adapter=names), strict=True)):
        if name is None:
            ref = _peft_logits(adapters["full"][1], seqs[i], adapter=False)
            assert np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)) >= HALF_PRECISION_TOP1[dtype]
        else:
            check(ours, bases[i], adapters[name][1], seqs[i], f"row {i} {name}")

    ids = seqs[3]
    path, model = adapters["full"]
    base = e.logits(ids)
    e.merge_adapter(path)
    check(e.logits(ids), base, model, ids, "merged")


def _mean_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean absolute difference over the mean magnitude (half precision's rounding averages out)."""
    return float(np.abs(ours - ref).mean() / np.abs(ref).mean())


def test_merging_into_quantized_weights_keeps_their_format(smollm2_path: Path, adapters, tmp_path: Path) -> None:
    """Dequantize, add, requantize: a zero update gives back the very same Q4_1 blocks."""
    zero = tmp_path / "zero"
    shutil.copytree(adapters["full"][0], zero)
    weights = load_file(zero / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
        zero / "adapter_model.safetensors",
    )
    e = ps.Engine.load(smollm2_path)
    ids = e.tokenizer.encode(TEXTS[1])
    before = e.logits(ids)
    e.merge_adapter(zero)
    assert np.array_equal(e.logits(ids), before)
    e.merge_adapter(adapters["full"][0])
    assert not np.array_equal(e.logits(ids), before)


def test_a_prompt_is_shared_only_between_rows_with_the_same_adapter(eng: ps.Engine) -> None:
    prompt = eng.tokenizer.encode(TEXTS[0])
    names = ["full", None, "full", "rslora", None]
    outs = eng.generate([prompt] * 5, adapter=names, max_new_tokens=6, ignore_eos=True)
    # Three distinct (prompt, adapter) pairs run the prompt; every row then feeds 5 tokens.
    assert outs[0].stats.tokens_forwarded == 3 * len(prompt) + 5 * 5
    for name, out in zip(names, outs, strict=True):
        assert out.token_ids == eng.generate(prompt, adapter=name, max_new_tokens=6, ignore_eos=True).token_ids
