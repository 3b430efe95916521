"""The base model to train from: the packaged model, a GGUF file or a Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftscale import models
from peftscale.train.config import ConfigError, QuantConfig


@dataclass(frozen=True)
class BaseModel:
    #: The GGUF file or the Hugging Face folder.
    path: Path
    #: ``from_pretrained`` arguments that locate it.
    location: dict[str, str]


def resolve(model: str, config_dir: Path | None = None) -> BaseModel:
    if model == "packaged":
        path = models.smollm2_135m_instruct()
    else:
        path = Path(model).expanduser()
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
    if path.is_file() and path.suffix == ".gguf":
        location = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        return BaseModel(path=path, location=location)
    if path.is_dir() and (path / "config.json").is_file():
        return BaseModel(path=path, location={"pretrained_model_name_or_path": str(path)})
    raise ConfigError(
        f"model '{model}': expected 'packaged', a .gguf file or a Hugging Face folder with config.json; "
        f"{path} is neither"
    )


def load_tokenizer(base: BaseModel) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(**base.location)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "is_fast", False):
        # The loss mask maps reply spans to tokens through the fast tokenizers' offsets.
        raise ConfigError(f"the tokenizer of {base.path} has no fast (tokenizer.json) version, which training needs")
    if not tok.chat_template:
        raise ConfigError(f"the tokenizer of {base.path} has no chat template to format the training rows with")
    return tok


def load_model(base: BaseModel, quant: QuantConfig | None = None) -> Any:
    """The model in f32, or with its linear layers in 4 bits (bitsandbytes) for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quant is not None:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ConfigError(f"QLoRA needs bitsandbytes: pip install 'bitsandbytes>=0.47' ({e})") from None
        compute = quant.compute_dtype
        if compute == "auto":
            compute = "bfloat16" if torch.cuda.is_available() else "float32"
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute),
        )
        if "gguf_file" in base.location:
            # transformers dequantizes GGUF weights itself and cannot quantize them on the way in:
            # load them in f32 once, then hand that to bitsandbytes.
            return _check_4bit_shapes(_quantized_from_gguf(base, kwargs))
        return _check_4bit_shapes(AutoModelForCausalLM.from_pretrained(**base.location, **kwargs))
    model = AutoModelForCausalLM.from_pretrained(**base.location, **kwargs)
    return _plain_f32(model) if "gguf_file" in base.location else model


def _check_4bit_shapes(model: Any) -> Any:
    """bitsandbytes' CPU 4-bit kernels fail deep inside a forward pass (an opaque reshape error)
    on layers whose input size is not a multiple of their 64-value blocks: say so up front."""
    import torch

    if torch.cuda.is_available():
        return model
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit" and module.in_features % 64:
            raise ConfigError(
                f"QLoRA on the CPU needs every quantized layer's input size to be a multiple of 64 "
                f"(bitsandbytes' 4-bit blocks); {name} takes {module.in_features}. Use method: lora"
            )
    return model


def _plain_f32(model: Any) -> Any:
    """A GGUF-loaded model as the plain f32 model it is once dequantized.

    transformers marks it as quantized (by "gguf") and then refuses to save it or anything derived
    from it (a merged or pruned model), though its weights are ordinary f32 tensors.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _quantized_from_gguf(base: BaseModel, kwargs: dict[str, Any]) -> Any:
    import tempfile

    from transformers import AutoModelForCausalLM

    plain = load_model(base)
    with tempfile.TemporaryDirectory(prefix="peftscale-gguf-") as d:
        plain.save_pretrained(d)
        del plain
        return AutoModelForCausalLM.from_pretrained(d, **kwargs)
