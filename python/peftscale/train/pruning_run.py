"""Method ``prune``: measure, prune, save the pruned model, then recover it with LoRA training."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftscale.provenance import content_hash
from peftscale.train import finetune, prune
from peftscale.train.base import load_model, load_tokenizer, resolve
from peftscale.train.config import TrainConfig
from peftscale.train.data import load_examples


def run(config: TrainConfig, resume: bool = False, callbacks: Sequence[Any] = ()) -> finetune.RunResult:
    """Prunes ``config.model`` as ``config.prune`` says into ``output/pruned`` (a Hugging Face folder),
    trains a recovery LoRA adapter on it into ``output``, and records parameters and the held-out
    perplexity before pruning, after it and after recovery in ``output/peftscale.json``."""
    from peft import PeftModel

    pc = config.prune
    output = Path(config.output)
    pruned_dir = output / "pruned"
    base = resolve(config.model)
    tokenizer = load_tokenizer(base)
    splits = load_examples(config.data, tokenizer, config.train.max_length)
    pad = tokenizer.pad_token_id
    held_out = prune.batches(splits.eval, pad)
    report: dict[str, Any] = {}
    if not (resume and (pruned_dir / "config.json").is_file()):
        model = load_model(base).eval()
        report["parameters_before"] = prune.parameter_count(model)
        report["perplexity_before"] = prune.perplexity(model, held_out)
        calibration = prune.batches(splits.train[: pc.calibration_rows], pad)
        if pc.layers:
            influence = prune.layer_influence(model, calibration)
            drop = sorted(int(i) for i in influence.argsort()[: pc.layers])
            prune.drop_layers(model, drop)
            report["layers_dropped"] = drop
        stats = prune.calibrate(model, calibration, pc.criterion)
        plan = prune.plan(model, pc.criterion, stats, pc.heads, pc.mlp)
        prune.apply(model, plan)
        model.zero_grad(set_to_none=True)
        report["parameters_after"] = prune.parameter_count(model)
        report["perplexity_pruned"] = prune.perplexity(model, held_out)
        report["heads_kept"] = plan.heads
        model.save_pretrained(str(pruned_dir))
        tokenizer.save_pretrained(str(pruned_dir))
        (pruned_dir / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
        del model
    else:
        report = json.loads((pruned_dir / "pruning.json").read_text())

    recovery = dataclasses.replace(config, method="lora", model=str(pruned_dir))
    result = finetune.run(recovery, resume=resume, callbacks=callbacks)
    recovered = PeftModel.from_pretrained(load_model(resolve(str(pruned_dir))), str(output)).eval()
    report["perplexity_recovered"] = prune.perplexity(recovered, held_out)

    finetune.amend_record(
        output,
        "prune",
        pruned_from={"path": str(base.path), "sha256": content_hash(base.path)},
        pruning={k: v for k, v in report.items() if k != "heads_kept"},
    )
    return result
