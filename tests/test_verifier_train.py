"""Training verifiers (methods prm and orm): the scored positions, the metrics, a run that learns,
the saved adapter and head scoring as the trained model did, and bad rows refused by name."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import peftscale as ps
import pytest
import torch
from peftscale.eval.stats import auc
from peftscale.train import verifier
from peftscale.train.config import ConfigError


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scored_positions_are_the_tokens_that_end_each_tag(gguf_tokenizer) -> None:
    steps = ["3 + 4 = 7", "7 * 2 = 14", "The answer is 14."]
    for tag in ("\n", "\n\n", " <step>"):
        e = verifier.tokenize_steps(gguf_tokenizer, "What is (3 + 4) * 2?", steps, [1.0, 0.5, 0.0], tag, 512)
        assert e is not None and e.labels == [1.0, 0.5, 0.0]
        text, ends = verifier.verifier_text(gguf_tokenizer, "What is (3 + 4) * 2?", steps, tag)
        offsets = gguf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for at, end in zip(e.positions, ends, strict=True):
            start, stop = offsets[at]
            assert start < end <= stop or (start < end and offsets[at + 1][0] >= end), (tag, at)
            # The text the scored token closes holds the whole step and its tag.
            assert text[:stop].endswith(tag) or stop > end
        assert e.input_ids[-1] == gguf_tokenizer(text, add_special_tokens=False)["input_ids"][e.positions[-1]]
    # Steps past max_length are dropped, the earlier ones kept.
    full = verifier.tokenize_steps(gguf_tokenizer, "Q", steps, [1.0, 1.0, 0.0], "\n", 512)
    assert full is not None
    cut = verifier.tokenize_steps(gguf_tokenizer, "Q", steps, [1.0, 1.0, 0.0], "\n", full.positions[1] + 1)
    assert cut is not None and cut.positions == full.positions[:2] and cut.labels == [1.0, 1.0]


def test_auc_is_the_pairwise_win_rate() -> None:
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([0.1, 0.2, 0.2, 0.5, 0.9]) for _ in range(30)]
        labels = [rng.random() < 0.4 for _ in range(30)]
        pos = [s for s, y in zip(scores, labels, strict=True) if y]
        neg = [s for s, y in zip(scores, labels, strict=True) if not y]
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
        assert auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert auc([0.1, 0.2], [True, True]) != auc([0.1, 0.2], [True, True])  # NaN


def _rows(n: int, seed: int) -> list[dict]:
    """Steps whose label is readable from their words: 'right' steps are good, 'wrong' ones bad."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        steps, labels = [], []
        for k in range(rng.randint(1, 3)):
            good = rng.random() < 0.5
            steps.append(f"step {k} is {'right' if good else 'wrong'}")
            labels.append(1.0 if good else 0.0)
        rows.append({"prompt": "Check the steps.", "completions": steps, "labels": labels})
    return rows


def test_prm_run_learns_and_its_saved_head_scores_as_trained(tiny_llama: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "steps.jsonl", _rows(160, seed=1))
    out = tmp_path / "prm"
    config = {
        "method": "prm",
        "model": str(tiny_llama),
        "data": {"path": str(data), "format": "stepwise", "eval_rows": 40},
        "lora": {"r": 8, "alpha": 16},
        "verifier": {"step_tag": "\n", "aggregation": "min"},
        "train": {"max_steps": 40, "batch_size": 8, "lr": 5e-3, "max_length": 128, "eval_every": 20, "save_every": 40},
        "output": str(out),
    }
    result = ps.train.run(config)
    assert result.eval_loss_after < result.eval_loss_before
    record = json.loads((out / "peftscale.json").read_text())
    evals = [h for h in record["log_history"] if "eval_step_auc" in h]
    assert evals[-1]["eval_step_auc"] >= 0.9, evals
    assert evals[-1]["eval_step_accuracy"] >= 0.8, evals
    meta = json.loads((out / verifier.CONFIG_FILE).read_text())
    assert meta == {
        "kind": "prm",
        "step_tag": "\n",
        "aggregation": "min",
        "hidden_size": 64,
        "head": verifier.HEAD_FILE,
    }

    # The saved adapter and head, loaded with peft and safetensors alone, score like the trained model.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    head = load_file(str(out / verifier.HEAD_FILE))
    steps = ["step 0 is right", "step 1 is wrong", "step 2 is right"]
    e = verifier.tokenize_steps(tok, "Check the steps.", steps, [1.0, 0.0, 1.0], "\n", 128)
    assert e is not None
    with torch.no_grad():
        hidden = model.get_base_model().model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
        scores = hidden[e.positions] @ head["weight"][0] + head["bias"][0]
    probs = torch.sigmoid(scores)
    assert probs[0] > 0.5 > probs[1] and probs[2] > 0.5, probs
    # The package's own loader and scorer give the same numbers, and rank unseen rows' steps.
    loaded, loaded_tok = verifier.load(out)
    assert verifier.score(loaded, loaded_tok, "Check the steps.", steps) == pytest.approx(probs.tolist(), abs=1e-5)
    held_out = verifier.evaluate(loaded, loaded_tok, _rows(40, seed=7))
    assert held_out["step_auc"] >= 0.9 and held_out["steps"] > 40, held_out

    # A head written for another hidden size is refused by name.
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(out / verifier.HEAD_FILE))
    with pytest.raises(ConfigError, match=r"expected weight \[1, 64\] and bias \[1\]"):
        verifier.load(out)
    with pytest.raises(ConfigError, match="is not a verifier folder"):
        verifier.load(tiny_llama)


def _random_adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from peftscale.train.base import load_model, resolve

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(load_model(resolve(str(base))), lora).save_pretrained(str(out))
    return out


def test_a_verifier_started_from_the_policy_shares_its_bottom_layers(tiny_llama: Path, tmp_path: Path) -> None:
    """``share_layers`` with ``policy_adapter``: the saved adapter's bottom layers are the policy's
    bit for bit, the layers above are trained; the engine then shares those layers with the
    policy's rows (and with no other policy), and its scores are still the torch verifier's."""
    from safetensors.torch import load_file
    from test_verifier_search import oracle_steps

    policy = _random_adapter(tiny_llama, tmp_path / "policy", seed=3)
    data = _write(tmp_path / "steps.jsonl", _rows(40, seed=2))
    config = {
        "method": "prm",
        "model": str(tiny_llama),
        "data": {"path": str(data), "format": "stepwise", "eval_rows": 8},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-3, "max_length": 128, "eval_every": 3, "save_every": 3},
    }
    out = tmp_path / "prm"
    ps.train.run({**config, "verifier": {"share_layers": 1, "policy_adapter": str(policy)}, "output": str(out)})
    mine = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(policy / "adapter_model.safetensors"))
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if ".layers.0." in k)
    assert any(not torch.equal(mine[k], theirs[k]) for k in theirs if ".layers.1." in k)

    # Without a policy adapter, the verifier's own LoRA sits on the layers above only.
    top = tmp_path / "top"
    ps.train.run({**config, "verifier": {"share_layers": 1}, "output": str(top)})
    keys = load_file(str(top / "adapter_model.safetensors"))
    assert keys and all(".layers.1." in k for k in keys)
    with pytest.raises(ConfigError, match=r"share_layers \(2\) leaves no layer to train: the model has 2"):
        ps.train.run({**config, "verifier": {"share_layers": 2}, "output": str(tmp_path / "none")})

    eng = ps.Engine.load(tiny_llama, dtype="f32")
    eng.load_adapter(policy, "policy")
    eng.load_adapter(_random_adapter(tiny_llama, tmp_path / "other", seed=4), "other")
    eng.load_verifier(out, "v")
    torch_verifier = (out, *verifier.load(out, base_model=tiny_llama))
    prompt = "Check the steps.\nstep 0 is right\n"
    ids = eng.tokenizer.encode(prompt)
    eos = eng.tokenizer.eos_token_ids
    strategy = ps.BestOfN(n=4, scorer=ps.Verifier("v"))
    shared = eng.generate(prompt, strategy=strategy, adapter="policy", max_new_tokens=12)
    assert shared.stats.trunk_tokens > 0
    for c in shared.candidates:
        assert c.step_scores == pytest.approx(oracle_steps(torch_verifier, ids, c.token_ids, eos), abs=1e-4)
    # Another policy computes differently on layer 0: nothing is shared, the scores still hold.
    for other in (None, "other"):
        out_other = eng.generate(prompt, strategy=strategy, adapter=other, max_new_tokens=12)
        assert out_other.stats.trunk_tokens == 0
        for c in out_other.candidates:
            assert c.step_scores == pytest.approx(oracle_steps(torch_verifier, ids, c.token_ids, eos), abs=1e-4)


def test_aggregations_are_the_closed_forms() -> None:
    s = [0.9, 0.5, 0.8]
    assert verifier.aggregate(s, "min") == 0.5
    assert verifier.aggregate(s, "prod") == pytest.approx(0.36)
    assert verifier.aggregate(s, "last") == 0.8
    with pytest.raises(ValueError, match="unknown aggregation"):
        verifier.aggregate(s, "mean")


@pytest.mark.parametrize(
    ("row", "method", "message"),
    [
        (
            {"prompt": "q", "completions": ["a", "b"], "labels": [1.0, 1.5]},
            "prm",
            r"labels must lie in \[0, 1\], got 1.5",
        ),
        ({"prompt": "q", "completions": ["a", "b"], "labels": [1.0]}, "prm", "1 labels for 2 steps"),
        ({"prompt": "q", "completions": [], "labels": []}, "prm", "non-empty list of strings"),
        ({"prompt": "q", "completions": ["a", "b"], "labels": [1.0, 0.0]}, "orm", "an ORM row holds one completion"),
        ({"completions": ["a"], "labels": [1.0]}, "prm", "needs a string 'prompt'"),
    ],
)
def test_bad_rows_are_refused_by_name(tiny_llama: Path, tmp_path: Path, row: dict, method: str, message: str) -> None:
    data = _write(tmp_path / "bad.jsonl", [row])
    config = {
        "method": method,
        "model": str(tiny_llama),
        "data": {"path": str(data), "format": "stepwise"},
        "output": str(tmp_path / "o"),
    }
    with pytest.raises(ConfigError, match=message):
        ps.train.run(config)


def test_verifier_methods_and_stepwise_data_go_together(tiny_llama: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", _rows(4, seed=0))
    with pytest.raises(ConfigError, match="methods prm and orm train on data of format 'stepwise'"):
        ps.train.load_config(
            {
                "method": "lora",
                "model": str(tiny_llama),
                "data": {"path": str(data), "format": "stepwise"},
                "output": "o",
            }
        )
    with pytest.raises(ConfigError, match="methods prm and orm train on data of format 'stepwise'"):
        ps.train.load_config({"method": "prm", "model": str(tiny_llama), "data": {"path": str(data)}, "output": "o"})
