"""F16/BF16 weights kept in two bytes per weight on the CPU (``dtype="auto"``): the packaged model
written as a Hugging Face folder in each half precision (what PEFT training holds), against
transformers reading the same folder, and against the engine's own f32 copy of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peftscale as ps
import pytest

torch = pytest.importorskip("torch")

TEXT = (
    "Question: Natalia sold 48 clips in April and half as many in May. How many in total?\nAnswer: "
    "In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 clips in all. The quick brown fox jumps over "
    "the lazy dog. def fibonacci(n):\n    if n < 2:\n        return n\n"
)


def write_half_folder(hf_model, tokenizer, folder: Path, dtype) -> Path:
    """The model's weights (dequantized from the GGUF) saved as a safetensors folder in `dtype`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    import json

    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["bf16", "f16"])
def half_folder(request: pytest.FixtureRequest, hf_smollm2, tmp_path_factory: pytest.TempPathFactory):
    model, tok = hf_smollm2
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[request.param]
    folder = write_half_folder(model, tok, tmp_path_factory.mktemp(request.param), dtype)
    return request.param, folder, dtype


def test_half_weights_match_transformers_and_stay_half(half_folder, hf_smollm2) -> None:
    name, folder, dtype = half_folder
    _, tok = hf_smollm2
    from transformers import AutoModelForCausalLM

    # transformers on the same half-precision weights, computing in f32: the oracle.
    ref_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    fast = ps.Engine.load(folder)
    exact = ps.Engine.load(folder, dtype="f32")
    # Two bytes per weight, not an f32 copy.
    assert fast.weight_bytes <= 0.51 * exact.weight_bytes, (fast.weight_bytes, exact.weight_bytes)
    ids = tok.encode(TEXT)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    ours = fast.logits(ids)
    rel = float((np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())
    assert rel < 1e-4, (name, rel)
    assert np.array_equal(ours.argmax(axis=1), ref.argmax(axis=1)), name
    np.testing.assert_allclose(ours, exact.logits(ids), rtol=0, atol=1e-4 * float(np.abs(ref).max()))


def test_half_weights_rows_of_a_batch_equal_single_rows(half_folder) -> None:
    _, folder, _ = half_folder
    eng = ps.Engine.load(folder)
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    batch = eng.generate(prompts * 3, max_new_tokens=12, ignore_eos=True)
    for p, out in zip(prompts * 3, batch, strict=True):
        alone = eng.generate(p, max_new_tokens=12, ignore_eos=True)
        assert out.token_ids == alone.token_ids
        assert np.array_equal(np.asarray(out.logprobs), np.asarray(alone.logprobs)), p
    # Nine rows: the projections take their many-row tiles; one row its decode tiles.
    assert len(batch) == 9
