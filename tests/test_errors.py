"""Bad input gets a typed, readable error, never a panic, a hang or a wrong answer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peftscale as ps
import pytest
from safetensors.torch import load_file, save_file


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ps.ModelLoadError, match="no such file"):
        ps.Engine.load(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path: Path, smollm2_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    data = bytearray(smollm2_path.read_bytes()[:4096])
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    with pytest.raises(ps.ModelLoadError, match="not a GGUF file"):
        ps.Engine.load(bad)


@pytest.mark.parametrize("keep", [2, 100, 3_000_000, 90_000_000])
def test_truncated_gguf(tmp_path: Path, smollm2_path: Path, keep: int) -> None:
    bad = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as f:
        bad.write_bytes(f.read(keep))
    with pytest.raises(ps.ModelLoadError) as e:
        ps.Engine.load(bad)
    assert "truncated" in str(e.value) or "malformed" in str(e.value) or "shorter" in str(e.value)


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    """An i-quant file is refused as unsupported, by its type's name, not as a malformed file."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / "iq4_nl.gguf"
    writer = GGUFWriter(str(path), "llama")
    # IQ4_NL: 32 weights in 18 bytes, so a [64, 64] tensor is 64 rows of 36 bytes.
    raw = np.zeros((64, 36), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ps.ModelLoadError) as e:
        ps.Engine.load(path)
    message = str(e.value)
    assert re.search(r"tensor type IQ4_NL \(GGML type 20\) is not supported", message), message
    assert "malformed" not in message and "backtrace" not in message.lower(), message


def test_missing_tensor(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    st = folder / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, st)
    with pytest.raises(ps.ModelLoadError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        ps.Engine.load(folder)


def test_config_weight_shape_mismatch(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ps.ModelLoadError, match=r"has shape \[96, 64\], but the config implies \[128, 64\]"):
        ps.Engine.load(folder)


def test_malformed_safetensors(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ps.ModelLoadError, match="malformed safetensors"):
        ps.Engine.load(folder)


def test_unsupported_architecture(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ps.ModelLoadError, match="unsupported architecture"):
        ps.Engine.load(folder)


def test_bad_dtype(tiny_llama: Path) -> None:
    with pytest.raises(ps.InvalidArgument, match="dtype must be one of"):
        ps.Engine.load(tiny_llama, dtype="int3")  # type: ignore[arg-type]


def test_bad_kv_dtype(tiny_llama: Path) -> None:
    with pytest.raises(ps.InvalidArgument, match="kv_dtype must be one of"):
        ps.Engine.load(tiny_llama, kv_dtype="f8")  # type: ignore[arg-type]
    # The host pass (f32 activations) keeps its cache in f32 or f16 only.
    with pytest.raises(ps.InvalidArgument, match="kv_dtype bf16 is not available"):
        ps.Engine.load(tiny_llama, kv_dtype="bf16")


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "ascend"])
def test_devices_this_build_lacks_are_named(tiny_llama: Path, device: str) -> None:
    kind = device.split(":")[0]
    name = device if ":" in device else f"{device}:0"
    if kind not in ps.compiled_devices():
        missing = f"{name}.*`{kind}` feature"
    elif kind == "cuda":  # a CUDA build: this machine has no such GPU (or the check runs there)
        missing = f"{name}.*no CUDA device {name.split(':')[1]} could be opened"
    else:  # an Ascend build: no CANN runtime or NPU, or the model's path is missing there
        missing = f"{name}.*(Ascend|ACL|CPU or a CUDA GPU)"
    try:
        ps.Engine.load(tiny_llama, device=device)
    except ps.DeviceError as e:
        assert re.search(missing, str(e)), str(e)
    else:
        assert kind == "cuda" and "cuda" in ps.compiled_devices(), f"{device} loaded in a build without it"


@pytest.mark.parametrize("device", ["tpu", "gpu:0", "cuda:x", "cpu:1", ""])
def test_unknown_device_names(tiny_llama: Path, device: str) -> None:
    with pytest.raises(ps.InvalidArgument, match=f"unknown device `{device}`"):
        ps.Engine.load(tiny_llama, device=device)


def test_cpu_device_loads(tiny_llama: Path) -> None:
    assert ps.Engine.load(tiny_llama, device="cpu").config == ps.Engine.load(tiny_llama).config


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> ps.Engine:
    return ps.Engine.load(tiny_llama)


def test_empty_prompt(tiny: ps.Engine) -> None:
    with pytest.raises(ps.InvalidArgument, match="prompt is empty"):
        tiny.generate("")
    with pytest.raises(ps.InvalidArgument, match="prompt is empty"):
        tiny.generate([[1, 2], []])
    with pytest.raises(ps.InvalidArgument):
        tiny.generate([])


def test_prompt_longer_than_context(tiny: ps.Engine) -> None:
    with pytest.raises(ps.ContextLengthError, match="context of 128 tokens"):
        tiny.generate(list(range(1, 200)))
    with pytest.raises(ps.ContextLengthError):
        tiny.logits(list(range(1, 200)))
    # A prompt that fits stops at the context edge instead of overflowing.
    out = tiny.generate(list(range(1, 120)), max_new_tokens=50, ignore_eos=True)
    assert out.finish_reason == "context"
    assert out.prompt_tokens + len(out.token_ids) == 128


def test_token_ids_outside_vocabulary(tiny: ps.Engine) -> None:
    with pytest.raises(ps.InvalidArgument, match="outside the vocabulary"):
        tiny.logits([1, 2, 10**6])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(strategy=ps.Sampling(temperature=-0.5)), "temperature"),
        (dict(strategy=ps.Sampling(temperature=float("nan"))), "temperature"),
        (dict(strategy=ps.Sampling(top_p=0.0)), "top_p"),
        (dict(strategy=ps.Sampling(top_p=1.5)), "top_p"),
        (dict(strategy=ps.Sampling(min_p=2.0)), "min_p"),
        (dict(strategy=ps.Sampling(top_k=-1)), "top_k"),
        (dict(strategy=ps.Greedy(repetition_penalty=0.0)), "repetition_penalty"),
    ],
)
def test_impossible_parameters(tiny: ps.Engine, kwargs: dict, match: str) -> None:
    with pytest.raises(ps.InvalidArgument, match=match):
        tiny.generate("Hello", **kwargs)


def test_model_without_chat_template(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ps.ChatTemplateError, match="no chat template"):
        ps.Engine.load(folder).chat([{"role": "user", "content": "hi"}])


def test_nan_logits(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    st = folder / "model.safetensors"
    tensors = load_file(st)
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, st)
    with pytest.raises(ps.NumericalError, match="NaN"):
        ps.Engine.load(folder).generate([1, 2, 3], max_new_tokens=4)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"text": "hi"}], "message 0 must be a mapping with 'role' and 'content'"),
        ([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}], "message 1 has role 'wizard'"),
        ([{"role": "user", "content": 5}], "message 0 has a int content"),
        ([{"role": None, "content": "hi"}], "message 0 has a NoneType role"),
        ([], "non-empty list of messages"),
        ("hi", "non-empty list of messages"),
    ],
)
def test_bad_chat_messages(smollm2_q: ps.Engine, messages: object, match: str) -> None:
    with pytest.raises(ps.InvalidArgument, match=match):
        smollm2_q.chat(messages, max_new_tokens=2)  # type: ignore[arg-type]
    if isinstance(messages, list) and messages:
        with pytest.raises(ps.InvalidArgument, match=match):
            smollm2_q.apply_chat_template(messages)  # type: ignore[arg-type]


def test_a_template_that_renders_nothing(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy_folder(tiny_llama, tmp_path / "m")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}{% endif %}{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ps.ChatTemplateError, match="empty prompt"):
        ps.Engine.load(folder).chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("call", ["logits", "generate", "decode"])
def test_negative_and_non_integer_token_ids(tiny: ps.Engine, call: str) -> None:
    run = {
        "logits": lambda ids: tiny.logits(ids),
        "generate": lambda ids: tiny.generate([ids], max_new_tokens=2),
        "decode": lambda ids: tiny.tokenizer.decode(ids),
    }[call]
    with pytest.raises(ps.InvalidArgument, match="token id -1 is negative"):
        run([1, -1])
    with pytest.raises(ps.InvalidArgument, match="must be integers"):
        run([1, 2.5]) if call != "generate" else tiny.generate([[1, 2.5]], max_new_tokens=2)  # type: ignore[list-item]


def test_decoding_an_id_outside_the_tokenizer(tiny: ps.Engine) -> None:
    with pytest.raises(ps.InvalidArgument, match="outside the tokenizer's"):
        tiny.tokenizer.decode([1, 10**6])


def test_an_empty_stop_string(tiny: ps.Engine) -> None:
    with pytest.raises(ps.InvalidArgument, match="stop string 1 is empty"):
        tiny.generate("Hello", max_new_tokens=4, stop=["\n", ""])
    assert tiny.generate("Hello", max_new_tokens=4, stop=["\n"]).text is not None


def test_errors_share_one_base_class() -> None:
    for exc in (ps.ModelLoadError, ps.InvalidArgument, ps.ContextLengthError, ps.NumericalError, ps.TokenizerError):
        assert issubclass(exc, ps.PeftscaleError)
    assert issubclass(ps.ContextLengthError, ps.InvalidArgument)
