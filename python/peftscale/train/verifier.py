"""Verifiers: process reward models (PRM, a score after every step) and outcome reward models (ORM,
one score after the whole reply), trained on the policy's own base model as LoRA plus a value head.

A row of ``data: {format: stepwise}`` holds a prompt, the steps of a solution and a label in [0, 1]
per step (TRL's stepwise-supervised fields, with float labels; an ORM row has one step):

    {"prompt": "Mia has 12 apples. ...", "completions": ["12 + 5 = 17", "The answer is 17."], "labels": [1.0, 1.0]}

The text a verifier reads is the prompt as the chat template's user turn (with the generation prompt),
then each step followed by ``verifier.step_tag``; the value head, ``Linear(hidden, 1)`` over the final
normed hidden state, reads the token that ends each tag. The loss is binary cross-entropy on the soft
labels at those tokens only (TRL's PRMTrainer casts float labels to int; here they stay soft). The
held-out step AUC and accuracy (labels and scores split at 0.5) are logged at every evaluation.

The output folder holds the peft adapter, ``value_head.safetensors`` (``weight`` ``[1, hidden]`` and
``bias`` ``[1]``) and ``verifier.json`` (the kind, the tag and the aggregation of step scores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftscale.eval.stats import auc
from peftscale.train.config import ConfigError, DataConfig, TrainConfig
from peftscale.train.data import hold_out, read_rows

HEAD_FILE = "value_head.safetensors"
CONFIG_FILE = "verifier.json"
PAD = -100
"""Position and label of padding (no step there)."""


@dataclass(frozen=True)
class StepExample:
    input_ids: list[int]
    #: Index of the token that ends each step's tag.
    positions: list[int]
    labels: list[float]


def check_rows(rows: Sequence[dict[str, Any]], config: DataConfig, outcome: bool) -> None:
    """Refuses rows that are not stepwise rows, naming the row and the field."""
    name = Path(config.path).name
    for n, row in enumerate(rows, 1):
        where = f"{name} row {n}"
        if not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{where}: format 'stepwise' needs a string 'prompt'")
        steps, labels = row.get("completions"), row.get("labels")
        if not (isinstance(steps, list) and steps and all(isinstance(s, str) for s in steps)):
            raise ConfigError(f"{where}: 'completions' must be a non-empty list of strings (the steps)")
        if not (
            isinstance(labels, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in labels)
        ):
            raise ConfigError(f"{where}: 'labels' must be a list of numbers, one per step")
        if len(labels) != len(steps):
            raise ConfigError(f"{where}: {len(labels)} labels for {len(steps)} steps")
        bad = [x for x in labels if not (math.isfinite(x) and 0.0 <= x <= 1.0)]
        if bad:
            raise ConfigError(f"{where}: labels must lie in [0, 1], got {bad[0]}")
        if outcome and len(steps) != 1:
            raise ConfigError(f"{where}: an ORM row holds one completion (the whole reply), got {len(steps)}")


def verifier_text(tokenizer: Any, prompt: str, steps: Sequence[str], tag: str) -> tuple[str, list[int]]:
    """The text a verifier reads for ``steps`` after ``prompt``, and the character offset where each
    step's tag ends."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ends = []
    for step in steps:
        text += step + tag
        ends.append(len(text))
    return text, ends


def tokenize_steps(
    tokenizer: Any, prompt: str, steps: Sequence[str], labels: Sequence[float], tag: str, max_length: int
) -> StepExample | None:
    """Token ids and the scored positions of one row; steps whose tag ends past ``max_length`` tokens
    are dropped (None when none is left)."""
    text, ends = verifier_text(tokenizer, prompt, steps, tag)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    positions, kept = [], []
    for end, label in zip(ends, labels, strict=True):
        # The token holding the tag's last character (tokens may merge a tag with what follows).
        at = next(i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end)
        if at < max_length:
            positions.append(at)
            kept.append(float(label))
    if not positions:
        return None
    return StepExample(enc["input_ids"][: positions[-1] + 1], positions, kept)


class _Steps(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, examples: list[StepExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> StepExample:
        return self.examples[i]


class _Collate:
    """Pads a batch: ids with the pad token, positions and labels with :data:`PAD`."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[StepExample]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        steps = max(len(e.positions) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        positions = torch.full((len(batch), steps), PAD, dtype=torch.long)
        labels = torch.full((len(batch), steps), float(PAD))
        for b, e in enumerate(batch):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[b, : len(e.input_ids)] = 1
            positions[b, : len(e.positions)] = torch.tensor(e.positions)
            labels[b, : len(e.labels)] = torch.tensor(e.labels)
        return {"input_ids": ids, "attention_mask": mask, "positions": positions, "labels": labels}


class ValueHeadModel(torch.nn.Module):
    """A causal LM with LoRA (a peft model) and a value head over its final normed hidden states."""

    def __init__(self, lm: Any, meta: dict[str, Any]) -> None:
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, dtype=torch.float32)
        self.meta = meta

    @property
    def config(self) -> Any:
        return self.lm.config

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (what the LM head reads), LoRA applied."""
        causal = self.lm.get_base_model()
        body = getattr(causal, causal.base_model_prefix)
        return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Step scores (logits of the probability that a step is good) at ``positions`` (PAD for
        none), and with ``labels`` the mean binary cross-entropy over the real steps."""
        h = self.hidden(input_ids, attention_mask)
        at = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, h.size(-1))
        scores = self.head(h.gather(1, at).float()).squeeze(-1)
        out = {"logits": scores}
        if labels is not None:
            real = positions != PAD
            out["loss"] = torch.nn.functional.binary_cross_entropy_with_logits(scores[real], labels[real])
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The trained tensors only (LoRA and the head): checkpoints stay small, and the base's tied
        embeddings never reach a safetensors file."""
        full = super().state_dict(*args, **kwargs)
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in trained}

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        self.lm.save_pretrained(path)
        head = {"weight": self.head.weight.detach().float().contiguous(), "bias": self.head.bias.detach().float()}
        save_file(head, str(Path(path) / HEAD_FILE))
        meta = {**self.meta, "hidden_size": int(self.lm.config.hidden_size), "head": HEAD_FILE}
        (Path(path) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def step_metrics(eval_pred: Any) -> dict[str, float]:
    """Held-out step AUC and accuracy: labels and sigmoid scores split at 0.5 (AUC is NaN when the
    held-out steps are all of one class)."""
    scores, labels = (torch.as_tensor(x, dtype=torch.float64) for x in eval_pred)
    real = labels != PAD
    p = torch.sigmoid(scores[real])
    y = labels[real] >= 0.5
    return {"step_accuracy": float(((p >= 0.5) == y).double().mean()), "step_auc": auc(p.tolist(), y.tolist())}


def objective(config: TrainConfig) -> Any:
    """The verifier's :class:`~peftscale.train.finetune.Objective`."""
    from peftscale.train.finetune import Objective

    outcome = config.method == "orm"
    tag = config.verifier.step_tag

    def datasets(tokenizer: Any) -> tuple[Any, Any, int]:
        rows = read_rows(config.data)
        check_rows(rows, config.data, outcome)
        examples, dropped = [], 0
        for r in rows:
            e = tokenize_steps(tokenizer, r["prompt"], r["completions"], r["labels"], tag, config.train.max_length)
            if e is None:
                dropped += 1
            else:
                examples.append(e)
        train, held = hold_out(examples, config.data, config.train.max_length)
        return _Steps(train), _Steps(held) if held else None, dropped

    def wrap(model: Any) -> ValueHeadModel:
        meta = {"kind": config.method, "step_tag": tag, "aggregation": config.verifier.aggregation}
        return ValueHeadModel(_with_lora(model, config), meta)

    def collator(tokenizer: Any) -> _Collate:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return _Collate(int(pad))

    return Objective(datasets, wrap, collator, step_metrics)


def _with_lora(model: Any, config: TrainConfig) -> Any:
    """The verifier's trainable LoRA model: on every layer, on the layers above ``share_layers``
    only, or the policy's adapter with its bottom ``share_layers`` layers frozen."""
    import dataclasses

    from peftscale.train.finetune import _wrap

    share = config.verifier.share_layers
    depth = int(model.config.num_hidden_layers)
    if share >= depth:
        raise ConfigError(f"verifier.share_layers ({share}) leaves no layer to train: the model has {depth}")
    policy = config.verifier.policy_adapter
    if policy is None:
        if share == 0:
            return _wrap(model, config)
        top = dataclasses.replace(config.lora, layers=list(range(share, depth)))
        return _wrap(model, dataclasses.replace(config, lora=top))
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(policy), is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"verifier.policy_adapter {policy} does not fit the model: {e}") from None
    for name, param in wrapped.named_parameters():
        if "lora_" in name and _layer_index(name) < share:
            param.requires_grad_(False)
    return wrapped


def _layer_index(name: str) -> int:
    """The decoder layer a parameter name sits in (``...layers.7.mlp...``); -1 outside the layers."""
    parts = name.split(".")
    for at, part in enumerate(parts[:-1]):
        if part == "layers" and parts[at + 1].isdigit():
            return int(parts[at + 1])
    return -1


def run(config: TrainConfig, resume: bool = False, callbacks: Sequence[Any] = ()) -> Any:
    """Trains a verifier as the config says (methods ``prm`` and ``orm``)."""
    from peftscale.train import finetune

    return finetune.run(config, resume, callbacks, objective=objective(config))


def load(path: str | Path, base_model: str | Path | None = None) -> tuple[ValueHeadModel, Any]:
    """A trained verifier (f32, on the CPU, in eval mode) and its tokenizer, the training side's
    reference for its scores. The base model is the one its record names unless given."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from peftscale.provenance import RECORD
    from peftscale.train.base import load_model, load_tokenizer, resolve

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / HEAD_FILE).is_file():
        raise ConfigError(f"{path} is not a verifier folder: no {CONFIG_FILE} and {HEAD_FILE}")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if base_model is None:
        base_model = json.loads((path / RECORD).read_text())["base_model"]["path"]
    base = resolve(str(base_model))
    lm = PeftModel.from_pretrained(load_model(base, None), str(path))
    if int(lm.config.hidden_size) != int(meta["hidden_size"]):
        raise ConfigError(
            f"{path}: the head reads {meta['hidden_size']} values, the base model has {lm.config.hidden_size}"
        )
    model = ValueHeadModel(lm, {k: meta[k] for k in ("kind", "step_tag", "aggregation")})
    head = load_file(str(path / HEAD_FILE))
    hidden = int(lm.config.hidden_size)
    if tuple(head.get("weight", torch.empty(0)).shape) != (1, hidden) or tuple(
        head.get("bias", torch.empty(0)).shape
    ) != (1,):
        shapes = {k: list(v.shape) for k, v in head.items()}
        raise ConfigError(
            f"{path / HEAD_FILE}: expected weight [1, {hidden}] and bias [1] for this base model, got {shapes}"
        )
    with torch.no_grad():
        model.head.weight.copy_(head["weight"])
        model.head.bias.copy_(head["bias"])
    return model.eval(), load_tokenizer(base)


@torch.no_grad()
def score(model: ValueHeadModel, tokenizer: Any, prompt: str, steps: Sequence[str]) -> list[float]:
    """The probability the verifier gives each step of ``steps`` after ``prompt``."""
    e = tokenize_steps(tokenizer, prompt, steps, [0.0] * len(steps), model.meta["step_tag"], 1 << 30)
    if e is None:
        return []
    out = model(
        torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids), dtype=torch.long), torch.tensor([e.positions])
    )
    return torch.sigmoid(out["logits"][0]).tolist()


def aggregate(scores: Sequence[float], how: str) -> float:
    """One score for a solution from its step scores: the lowest, the product, or the last."""
    if not scores:
        raise ValueError("no step scores to aggregate")
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "last":
        return scores[-1]
    raise ValueError(f"unknown aggregation {how!r} (min, prod or last)")


def evaluate(model: ValueHeadModel, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Step AUC and accuracy of the verifier on stepwise rows (labels split at 0.5)."""
    scores: list[float] = []
    positive: list[bool] = []
    for r in rows:
        s = score(model, tokenizer, r["prompt"], r["completions"])
        scores += s
        positive += [x >= 0.5 for x in r["labels"][: len(s)]]
    right = sum((p >= 0.5) == y for p, y in zip(scores, positive, strict=True))
    return {"step_auc": auc(scores, positive), "step_accuracy": right / max(len(scores), 1), "steps": len(scores)}
