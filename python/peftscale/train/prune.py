"""Structured pruning of Llama-family models: whole query heads and MLP channels, the same count in
every layer, so the result is a standard config that transformers and the engine both load.

Query heads are removed evenly from every grouped-query group (each KV head keeps the same number of
query heads), so ``num_key_value_heads`` stays and ``num_attention_heads`` shrinks; ``head_dim`` is
written into the config because it no longer equals ``hidden_size / num_attention_heads``.

Importance of a head (its rows of q_proj and columns of o_proj) or of an MLP channel (its rows of
gate_proj and up_proj and its column of down_proj):

- ``magnitude``: the sum of ``|W|`` over those weights;
- ``wanda``: activation-aware, ``Σ |W_ij|·‖X_j‖`` over the output projection's columns of the group,
  with ``‖X_j‖`` the norm of that input feature over the calibration tokens (structured Wanda, as in
  FLAP);
- ``taylor``: first-order Taylor, ``|Σ W·∂L/∂W|`` over the group's weights, with the gradient of the
  language-model loss on the calibration rows (as LLM-Pruner's element-wise first order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Criterion = Literal["magnitude", "wanda", "taylor"]


@dataclass(frozen=True)
class PrunePlan:
    #: Per layer, the query heads kept (indices into the original heads, ascending).
    heads: list[list[int]]
    #: Per layer, the MLP channels kept.
    channels: list[list[int]]


def _layers(model: Any) -> Any:
    return model.model.layers


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def keep_counts(config: Any, heads: float, mlp: float) -> tuple[int, int]:
    """Query heads per KV group and MLP channels kept for pruning fractions ``heads`` and ``mlp``."""
    group = config.num_attention_heads // config.num_key_value_heads
    per_group = max(1, round(group * (1.0 - heads)))
    channels = max(1, round(config.intermediate_size * (1.0 - mlp)))
    return per_group, channels


def head_scores(model: Any, criterion: Criterion, stats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, one importance score per query head."""
    hd = _head_dim(model.config)
    out = []
    for i, layer in enumerate(_layers(model)):
        q = layer.self_attn.q_proj.weight  # [heads*hd, hidden]
        o = layer.self_attn.o_proj.weight  # [hidden, heads*hd]
        if criterion == "magnitude":
            s = q.abs().sum(1).view(-1, hd).sum(1) + o.abs().sum(0).view(-1, hd).sum(1)
        elif criterion == "wanda":
            s = (o.abs() * stats[f"{i}.o_in"][None, :]).sum(0).view(-1, hd).sum(1)
        else:
            s = (_taylor(q).sum(1).view(-1, hd).sum(1) + _taylor(o).sum(0).view(-1, hd).sum(1)).abs()
        out.append(s.detach().float())
    return out


def channel_scores(model: Any, criterion: Criterion, stats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, one importance score per MLP channel."""
    out = []
    for i, layer in enumerate(_layers(model)):
        g, u, d = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        if criterion == "magnitude":
            s = g.abs().sum(1) + u.abs().sum(1) + d.abs().sum(0)
        elif criterion == "wanda":
            s = (d.abs() * stats[f"{i}.down_in"][None, :]).sum(0)
        else:
            s = (_taylor(g).sum(1) + _taylor(u).sum(1) + _taylor(d).sum(0)).abs()
        out.append(s.detach().float())
    return out


def _taylor(w: torch.nn.Parameter) -> torch.Tensor:
    if w.grad is None:
        raise RuntimeError("taylor scores need gradients: run calibrate(..., 'taylor') first")
    return w.detach() * w.grad


def calibrate(model: Any, batches: Sequence[dict[str, torch.Tensor]], criterion: Criterion) -> dict[str, torch.Tensor]:
    """What the criterion needs from calibration data: input norms of o_proj and down_proj
    (``wanda``), or the loss gradient left in each weight's ``.grad`` (``taylor``)."""
    stats: dict[str, torch.Tensor] = {}
    if criterion == "magnitude":
        return stats
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
        for batch in batches:
            (model(**batch).loss / len(batches)).backward()
        return stats
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str) -> Any:
        def add(module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        return add

    for i, layer in enumerate(_layers(model)):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(f"{i}.o_in")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook(f"{i}.down_in")))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def plan(model: Any, criterion: Criterion, stats: dict[str, torch.Tensor], heads: float, mlp: float) -> PrunePlan:
    cfg = model.config
    per_group, channels = keep_counts(cfg, heads, mlp)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kept_heads = []
    for s in head_scores(model, criterion, stats):
        keep = []
        for g in range(cfg.num_key_value_heads):
            ranked = torch.argsort(s[g * group : (g + 1) * group], descending=True, stable=True)[:per_group]
            keep.extend(sorted(g * group + int(r) for r in ranked))
        kept_heads.append(keep)
    kept_channels = [
        sorted(int(c) for c in torch.argsort(s, descending=True, stable=True)[:channels])
        for s in channel_scores(model, criterion, stats)
    ]
    return PrunePlan(heads=kept_heads, channels=kept_channels)


def apply(model: Any, p: PrunePlan) -> Any:
    """Slices the model's weights in place to the kept heads and channels and updates its config."""
    cfg = model.config
    hd = _head_dim(cfg)
    for layer, heads, channels in zip(_layers(model), p.heads, p.channels, strict=True):
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        attn = layer.self_attn
        attn.q_proj = _slice_linear(attn.q_proj, rows=rows)
        attn.o_proj = _slice_linear(attn.o_proj, cols=rows)
        if hasattr(attn, "num_heads"):
            attn.num_heads = len(heads)
        attn.num_key_value_groups = len(heads) // cfg.num_key_value_heads
        ch = torch.tensor(channels)
        mlp = layer.mlp
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=ch)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=ch)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=ch)
    cfg.head_dim = hd
    cfg.num_attention_heads = len(p.heads[0])
    cfg.intermediate_size = len(p.channels[0])
    return model


def _slice_linear(lin: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> Any:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_influence(model: Any, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per layer, ``1 - cos(input, output)`` of its hidden states averaged over the calibration
    tokens: how much the layer changes what passes through it (ShortGPT's block influence)."""
    layers = _layers(model)
    totals = torch.zeros(len(layers))
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    hooks = []

    def before(i: int) -> Any:
        def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return keep

    def after(i: int) -> Any:
        def measure(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs[i].float(), out.detach().float(), dim=-1)
            totals[i] += (1.0 - cos).sum()

        return measure

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(after(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                count += int(batch["input_ids"].numel())
    finally:
        for h in hooks:
            h.remove()
    return totals / max(count, 1)


def drop_layers(model: Any, drop: Sequence[int]) -> Any:
    """Removes decoder layers ``drop`` and renumbers the rest (their cache slots follow the index)."""
    gone = set(drop)
    kept = [layer for i, layer in enumerate(_layers(model)) if i not in gone]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    model.model.layers = torch.nn.ModuleList(kept)
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in gone]
    cfg.num_hidden_layers = len(kept)
    return model


def batches(examples: Sequence[Any], pad_id: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches with labels (``-100`` on padding and prompts) and attention masks."""
    out = []
    for at in range(0, len(examples), size):
        part = examples[at : at + size]
        width = max(len(e.input_ids) for e in part)
        ids = torch.full((len(part), width), pad_id)
        labels = torch.full((len(part), width), -100)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, e in enumerate(part):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids)
            labels[r, :n] = torch.tensor(e.labels)
            mask[r, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def perplexity(model: Any, data: Sequence[dict[str, torch.Tensor]]) -> float:
    """exp of the mean negative log-likelihood of the labelled tokens (the replies)."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            used = target != -100
            nll -= float(picked[used].sum())
            tokens += int(used.sum())
    return float(torch.exp(torch.tensor(nll / max(tokens, 1))))
