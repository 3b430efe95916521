"""Training from one config: LoRA, QLoRA (4-bit NF4 base), full fine-tuning, structured pruning
with LoRA recovery, distillation from a teacher, and verifiers (process and outcome reward models:
LoRA plus a value head, :mod:`peftscale.train.verifier`).

>>> import peftscale as ps
>>> config = ps.train.load_config("examples/lora-gsm8k.yaml")   # doctest: +SKIP
>>> result = ps.train.run(config)                               # doctest: +SKIP
>>> result.eval_loss_before, result.eval_loss_after             # doctest: +SKIP

The same from the shell: ``peftscale train examples/lora-gsm8k.yaml`` (``--resume`` to continue
from the newest checkpoint). The output folder holds a peft adapter that both ``PeftModel`` and
``ps.Engine.load_adapter`` load, ``peftscale.json`` (the base model's path and sha256, the config,
the losses) and ``loss.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftscale.train.config import ConfigError, TrainConfig, load_config

if TYPE_CHECKING:
    from pathlib import Path

    from peftscale.train.finetune import RunResult

__all__ = ["ConfigError", "RunResult", "TrainConfig", "load_config", "run"]


def run(
    config: TrainConfig | str | Path | dict[str, Any], resume: bool = False, callbacks: Sequence[Any] = ()
) -> RunResult:
    """Runs the training a config describes (a ``TrainConfig``, a YAML path or a dict).

    ``resume`` continues from the newest checkpoint; ``callbacks`` are transformers
    ``TrainerCallback`` objects added to the run.
    """
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    if config.method == "prune":
        from peftscale.train import pruning_run

        return pruning_run.run(config, resume=resume, callbacks=callbacks)
    if config.method in ("prm", "orm"):
        from peftscale.train import verifier

        return verifier.run(config, resume=resume, callbacks=callbacks)
    if config.method == "distill":
        from peftscale.train import distill

        return distill.run(config, resume=resume, callbacks=callbacks)
    from peftscale.train import finetune

    return finetune.run(config, resume=resume, callbacks=callbacks)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from peftscale.train.finetune import RunResult

        return RunResult
    raise AttributeError(name)
