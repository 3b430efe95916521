"""Method ``distill``: train a student towards a teacher's token distributions (forward KL, reverse
KL or generalised JSD at a temperature), mixed with cross-entropy, optionally on the student's own
generations (on-policy, as in GKD: Agarwal et al., 2024)."""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from peftscale.provenance import content_hash
from peftscale.train import finetune
from peftscale.train.base import BaseModel, load_model, load_tokenizer, resolve
from peftscale.train.config import ConfigError, DistillConfig, TrainConfig
from peftscale.train.data import IGNORE, Example, load_examples
from peftscale.train.prune import batches


def divergence(student: torch.Tensor, teacher: torch.Tensor, dc: DistillConfig) -> torch.Tensor:
    """Per-position divergence between ``[..., vocab]`` logits at ``dc.temperature``, scaled by
    T² so that its gradients keep their size as T changes (Hinton et al.)."""
    t = dc.temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    b = dc.beta
    if dc.loss == "forward_kl" or (dc.loss == "jsd" and b == 0.0):
        d = kl(log_t, log_s)
    elif dc.loss == "reverse_kl" or b == 1.0:
        d = kl(log_s, log_t)
    else:
        # GKD's generalised JSD: beta·KL(T‖M) + (1 - beta)·KL(S‖M) with M = beta·T + (1 - beta)·S;
        # its limits beta -> 0 and 1 are taken as forward and reverse KL (as TRL does).
        log_m = torch.logsumexp(torch.stack([log_t + math.log(b), log_s + math.log1p(-b)]), dim=0)
        d = b * kl(log_t, log_m) + (1 - b) * kl(log_s, log_m)
    return d * t * t


def _reply_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a labelled reply token (where the logits are scored)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


class DistillTrainer(Trainer):
    """A Trainer whose loss is ``ce_weight·CE + (1 - ce_weight)·divergence(student, teacher)`` on
    the reply positions."""

    def __init__(self, *args: Any, teacher: Any, distill: DistillConfig, pad_token_id: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill = distill
        self.pad_token_id = pad_token_id

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, **kw: Any):
        dc = self.distill
        if model.training and dc.on_policy > 0 and random.random() < dc.on_policy:
            inputs = self._on_policy(model, inputs)
        out = model(**inputs)
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            # Trainer places the student; the teacher follows it on first use.
            self.teacher = self.teacher.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        mask = _reply_mask(inputs["labels"])
        div = divergence(out.logits[mask], teacher_logits[mask], dc).mean()
        loss = dc.ce_weight * out.loss + (1.0 - dc.ce_weight) * div if dc.ce_weight > 0 else div
        return (loss, out) if return_outputs else loss

    def _on_policy(self, model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with every reply replaced by the student's own sampled continuation."""
        rows = []
        unwrapped = self.accelerator.unwrap_model(model)
        for ids, labels, mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"], strict=True):
            labelled = (labels != IGNORE).nonzero()
            start = int(labelled[0]) if len(labelled) else int(mask.sum())
            prompt = ids[:start].unsqueeze(0)
            room = getattr(unwrapped.config, "max_position_embeddings", start + self.distill.max_new_tokens) - start
            with torch.no_grad():
                gen = unwrapped.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    max_new_tokens=max(1, min(self.distill.max_new_tokens, room)),
                    pad_token_id=self.pad_token_id,
                )[0]
            reply = gen[start:].tolist()
            rows.append(Example(ids[:start].tolist() + reply, [IGNORE] * start + reply))
        return {k: v.to(inputs["input_ids"].device) for k, v in batches(rows, self.pad_token_id, len(rows))[0].items()}


def load_teacher(teacher_base: BaseModel, adapter: Path | None, student_tokenizer: Any) -> Any:
    tok = load_tokenizer(teacher_base)
    if tok.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"teacher {teacher_base.path} does not share the student's tokenizer (vocabularies differ)")
    teacher = load_model(teacher_base)
    if adapter is not None:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, str(adapter))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def mean_kl(teacher: Any, student: Any, data: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean KL(teacher‖student) per reply position at temperature 1 (the acceptance measure)."""
    total, n = 0.0, 0
    plain = DistillConfig(loss="forward_kl", temperature=1.0)
    with torch.no_grad():
        for batch in data:
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = _reply_mask(batch["labels"])
            d = divergence(student(**kw).logits[mask], teacher(**kw).logits[mask], plain)
            total += float(d.sum())
            n += int(mask.sum())
    return total / max(n, 1)


def run(config: TrainConfig, resume: bool = False, callbacks: Sequence[Any] = ()) -> finetune.RunResult:
    """Distils the teacher into ``config.model``; records KL(teacher‖student) on the held-out rows
    before and after in ``output/peftscale.json``."""
    dc = config.distill
    student_base = resolve(config.model)
    teacher_base = resolve(dc.teacher)
    tokenizer = load_tokenizer(student_base)
    teacher = load_teacher(teacher_base, dc.teacher_adapter, tokenizer)
    splits = load_examples(config.data, tokenizer, config.train.max_length)
    held_out = batches(splits.eval, tokenizer.pad_token_id)
    output = Path(config.output)
    # On resume, read before the training run below rewrites the record.
    if resume:
        kl_before = finetune.recorded(output, "distillation", "kl_before")
    else:
        kl_before = mean_kl(teacher, load_model(student_base).eval(), held_out)

    make_trainer = functools.partial(DistillTrainer, teacher=teacher, distill=dc, pad_token_id=tokenizer.pad_token_id)
    method = "lora" if dc.student == "lora" else "full"
    result = finetune.run(dataclasses.replace(config, method=method), resume, callbacks, make_trainer=make_trainer)

    if dc.student == "lora":
        from peft import PeftModel

        student = PeftModel.from_pretrained(load_model(student_base), str(output)).eval()
    else:
        student = load_model(resolve(str(output))).eval()
    finetune.amend_record(
        output,
        "distill",
        teacher={
            "path": str(teacher_base.path),
            "sha256": content_hash(teacher_base.path),
            "adapter": dc.teacher_adapter,
        },
        distillation={
            "kl_before": finetune.finite_or_none(kl_before),
            "kl_after": mean_kl(teacher, student, held_out),
        },
    )
    return result
