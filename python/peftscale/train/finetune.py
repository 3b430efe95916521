"""LoRA, QLoRA and full fine-tuning through transformers' Trainer.

Trainer brings what a training run needs and peftscale does not rewrite: gradient accumulation,
schedulers, checkpoints and ``resume_from_checkpoint``, and DDP when started under ``torchrun`` or
``accelerate launch``. peftscale adds the data formatting, the config, the outputs the engine loads,
and the run's record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from peftscale._core import __version__
from peftscale.provenance import RECORD, content_hash
from peftscale.train.base import BaseModel, load_model, load_tokenizer, resolve
from peftscale.train.config import ConfigError, TrainConfig, as_dict
from peftscale.train.data import IGNORE, Example, load_examples


@dataclass(frozen=True)
class RunResult:
    output: Path
    steps: int
    #: Held-out loss before the first step and after the last (NaN without held-out rows).
    eval_loss_before: float
    eval_loss_after: float
    interrupted: bool


_OPTIMIZERS = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit"}


def _optimizer(name: str) -> str:
    if name == "paged_adamw8bit" and not torch.cuda.is_available():
        warnings.warn("paged optimizers need a GPU; using adamw8bit on the CPU", stacklevel=3)
        name = "adamw8bit"
    if name != "adamw":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"optimizer '{name}' needs bitsandbytes: pip install 'bitsandbytes>=0.50'") from None
    return _OPTIMIZERS[name]


class _Examples:
    """A map-style dataset over tokenized examples (what Trainer's data loader wants)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "attention_mask": [1] * len(ex.input_ids), "labels": ex.labels}


def _wrap(model: Any, config: TrainConfig) -> Any:
    """The trainable model: the base with LoRA (on a 4-bit base for QLoRA), or itself for full tuning."""
    if config.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    lc = config.lora
    targets = lc.target_modules
    if lc.layers is not None and targets == "all-linear":
        # peft takes a layer list only with named modules: every linear one below the LM head.
        targets = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lm_head" not in n
            }
        )
    try:
        lora = LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=targets,
            use_rslora=lc.use_rslora,
            use_dora=lc.use_dora,
            init_lora_weights=lc.init,  # type: ignore[arg-type]
            layers_to_transform=lc.layers,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError(f"lora: {e}") from None


@dataclass(frozen=True)
class Objective:
    """What a run trains: its data as Trainer's data sets, the trainable model around the loaded
    base, the batch collator, and the held-out metrics. Language modelling on the replies is the
    default; the verifiers bring their own (:mod:`peftscale.train.verifier`)."""

    #: ``(tokenizer) -> (train, held_out or None, rows dropped)``.
    datasets: Callable[[Any], tuple[Any, Any, int]]
    #: ``(base model) -> trainable model``.
    wrap: Callable[[Any], Any]
    collator: Callable[[Any], Any]
    compute_metrics: Callable[[Any], dict[str, float]] | None = None


def language_modelling(config: TrainConfig) -> Objective:
    """Cross-entropy on the assistant replies, LoRA/QLoRA or full (see :func:`_wrap`)."""

    def datasets(tokenizer: Any) -> tuple[Any, Any, int]:
        splits = load_examples(config.data, tokenizer, config.train.max_length)
        return _Examples(splits.train), _Examples(splits.eval) if splits.eval else None, splits.dropped

    def collator(tokenizer: Any) -> Any:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")

    return Objective(datasets, lambda model: _wrap(model, config), collator)


def run(
    config: TrainConfig,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    make_trainer: Callable[..., Trainer] = Trainer,
    objective: Objective | None = None,
) -> RunResult:
    """Trains as the config says and writes the outputs into ``config.output``.

    ``resume`` continues from the newest checkpoint in ``output/checkpoints``; ``callbacks`` are
    added to the Trainer's (transformers ``TrainerCallback`` objects); ``make_trainer`` builds the
    Trainer from Trainer's arguments (distillation brings one with its own loss); ``objective`` is
    what is trained (language modelling on the replies by default). Ctrl-C stops the run after
    saving what it has (the adapter, or the model, with ``"interrupted": true`` in its record) and
    then raises ``KeyboardInterrupt``.
    """
    t = config.train
    objective = objective or language_modelling(config)
    base = resolve(config.model)
    tokenizer = load_tokenizer(base)
    train_set, eval_set, dropped = objective.datasets(tokenizer)
    model = load_model(base, config.quant if config.method == "qlora" else None)
    if t.gradient_checkpointing and config.method != "qlora":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = objective.wrap(model)

    output = Path(config.output)
    checkpoints = output / "checkpoints"
    if resume and not any(checkpoints.glob("checkpoint-*")):
        raise ConfigError(f"--resume: no checkpoint in {checkpoints}")
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=_optimizer(t.optimizer),
        logging_steps=t.log_every,
        eval_strategy="steps" if eval_set else "no",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=2,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and _world_size() > 1 else None,
        report_to=[],
        remove_unused_columns=False,
        # Logs train_tokens_per_second beside the loss.
        include_num_input_tokens_seen=True,
        eval_on_start=bool(eval_set) and not resume,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    stop = _StopOnInterrupt()
    trainer = make_trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=objective.collator(tokenizer),
        callbacks=[stop, *callbacks],
        compute_metrics=objective.compute_metrics,
    )
    main = trainer.is_world_process_zero()
    if main and dropped:
        warnings.warn(f"{dropped} rows had no reply token left within max_length={t.max_length}", stacklevel=2)

    with stop.catching_sigint():
        trainer.train(resume_from_checkpoint=True if resume else None)
    interrupted = stop.requested
    after = float(trainer.evaluate()["eval_loss"]) if eval_set and not interrupted else float("nan")
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    before = recorded(output, "metrics", "eval_loss_before") if resume else (evals[0] if evals else float("nan"))
    result = RunResult(output, trainer.state.global_step, before, after, interrupted)
    if main:
        _save(trainer, tokenizer, config, base, result)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _world_size() -> int:
    """Processes of this run, as torchrun and accelerate launch announce them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def recorded(output: Path, section: str, key: str) -> float:
    """A figure of an earlier run's record in ``output``, NaN where there is none."""
    try:
        return float(json.loads((output / RECORD).read_text())[section][key])
    except (OSError, KeyError, ValueError, TypeError):
        return float("nan")


def _save(trainer: Any, tokenizer: Any, config: TrainConfig, base: BaseModel, result: RunResult) -> None:
    output = result.output
    output.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    if config.merge and config.method != "full":
        merged = model.merge_and_unload()
        merged.save_pretrained(str(output / "merged"))
        tokenizer.save_pretrained(str(output / "merged"))
    history = trainer.state.log_history
    record = {
        "peftscale_version": __version__,
        "method": config.method,
        "base_model": {"path": str(base.path), "sha256": content_hash(base.path)},
        "steps": result.steps,
        "processes": _world_size(),
        "interrupted": result.interrupted,
        "metrics": {
            "eval_loss_before": finite_or_none(result.eval_loss_before),
            "eval_loss_after": finite_or_none(result.eval_loss_after),
        },
        "config": as_dict(config),
        "log_history": history,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (output / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    plot_losses(history, output / "loss.png")


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def amend_record(output: Path, method: str, **sections: Any) -> None:
    """Rewrites the run's record in ``output`` as a ``method`` run with ``sections`` added (the
    pruning and distillation runs report on top of the training run they wrap)."""
    path = output / RECORD
    record = json.loads(path.read_text())
    record["method"] = record["config"]["method"] = method
    record.update(sections)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def plot_losses(history: list[dict[str, Any]], path: Path) -> bool:
    """Training and held-out loss against the step, as a PNG; False (and a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss curve written", stacklevel=2)
        return False
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "training"), (held, "held-out")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class _StopOnInterrupt(TrainerCallback):
    """The first Ctrl-C ends training after the current optimizer step, saving that step's weights
    and a checkpoint to resume from; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def catching_sigint(self) -> Iterator[None]:
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: stopping after this step and saving (Ctrl-C again to quit now)", flush=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_training_stop = True
            # A checkpoint of this step (optimizer, schedule, RNG) is what --resume continues from.
            control.should_save = True
