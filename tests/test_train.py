"""Training from a config (issue 4) on tiny random models: config errors, data formatting and the
loss mask, a LoRA run whose adapter peft and the engine both load, resume, Ctrl-C, QLoRA with an
8-bit optimizer, and a two-process DDP run under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import peftscale as ps
import pytest
import yaml
from conftest import build_tiny_model
from peftscale.provenance import RECORD, content_hash
from peftscale.train.config import ConfigError, DataConfig
from peftscale.train.data import IGNORE, load_examples, to_messages, tokenize

pytest.importorskip("peft")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task with a fixed answer format, which a few LoRA steps visibly learn."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with open(path, "w") as f:
        for i in range(80):
            a, b = i % 9, (i * 7) % 5
            prompt = f"What is {a} plus {b}?" if i % 4 else f"Quick question for you: what is {a} plus {b}?"
            f.write(json.dumps({"prompt": prompt, "completion": f"The answer is {a + b}."}) + "\n")
    return path


def config(model: Path, data: Path, output: Path, **train: object) -> dict:
    steps = {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "eval_every": 6, "save_every": 6, "log_every": 2}
    return {
        "method": "lora",
        "model": str(model),
        "data": {"path": str(data), "eval_rows": 12},
        "lora": {"r": 4, "alpha": 8},
        "train": {**steps, **train},
        "output": str(output),
    }


def adapter_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
        ({"train": {"max_step": 3}}, "unknown key 'train.max_step' (did you mean 'max_steps'?)"),
        ({"train": {"lr": "fast"}}, "'train.lr' must be a number"),
        ({"train": {"batch_size": 2.5}}, "'train.batch_size' must be an integer"),
        ({"train": {"max_steps": 0}}, "'train.max_steps' must be > 0"),
        ({"train": {"optimizer": "sgd"}}, "'train.optimizer' must be one of adamw, adamw8bit, paged_adamw8bit"),
        ({"method": "lora2"}, "'method' must be one of"),
        ({"lora": {"dropout": 1.5}}, "'lora.dropout' must be in [0, 1)"),
        ({"lora": {"target_modules": 3}}, "'lora.target_modules'"),
        ({"data": {"path": "missing.jsonl"}}, "data file not found"),
        ({"data": {"path": None}}, "'data.path' must be a path"),
        ({"model": "no/such/model"}, "expected 'packaged', a .gguf file or a Hugging Face folder"),
        ({"output": None}, "'output' must be a path"),
    ],
)
def test_config_errors_name_the_key(tiny_llama: Path, arithmetic: Path, tmp_path: Path, change, message) -> None:
    raw = config(tiny_llama, arithmetic, tmp_path / "out")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError) as e:
        ps.train.load_config(raw)
    assert message in str(e.value)
    assert isinstance(e.value, ps.PeftscaleError)


def test_config_file_defaults_paths_and_cli_errors(
    tiny_llama: Path, arithmetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(arithmetic, folder / "rows.jsonl")
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_llama), "data": {"path": "rows.jsonl"}, "output": "out"}))
    c = ps.train.load_config(path)
    assert c.data.path == folder / "rows.jsonl" and c.output == folder / "out"  # relative to the file
    assert (c.method, c.lora.r, c.train.optimizer, c.data.format) == ("lora", 16, "adamw", "prompt_completion")
    with pytest.raises(ConfigError, match="missing required key 'output'"):
        ps.train.load_config({"data": {"path": str(arithmetic)}})
    (folder / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        ps.train.load_config(folder / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        ps.train.load_config(folder / "absent.yaml")

    from peftscale.cli import main

    assert main(["train", str(path), "--set", "train.lr=-1"]) == 1
    assert "'train.lr' must be > 0" in capsys.readouterr().err
    # `peftscale prune` is the same config with method: prune (so the prune section is checked).
    assert main(["prune", str(path), "--set", "prune.heads=1.5"]) == 1
    assert "'prune.heads' must be in [0, 1)" in capsys.readouterr().err


def test_paged_optimizer_falls_back_on_the_cpu() -> None:
    from peftscale.train.finetune import _optimizer

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback")
    with pytest.warns(UserWarning, match="paged optimizers need a GPU"):
        assert _optimizer("paged_adamw8bit") == "adamw_bnb_8bit"
    assert _optimizer("adamw") == "adamw_torch"


# ---------------------------------------------------------------- data


def labelled_text(tok, ex) -> str:
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE])


def test_loss_is_on_the_replies_only(gguf_tokenizer, tmp_path: Path) -> None:
    tok = gguf_tokenizer
    pc = DataConfig(path=tmp_path, format="prompt_completion")
    ex = tokenize(to_messages({"prompt": "What is 2 plus 3?", "completion": "The answer is 5."}, pc, "row"), tok, 512)
    full = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "The answer is 5."}],
        tokenize=False,
    )
    assert tok.decode(ex.input_ids) == full
    assert labelled_text(tok, ex) == "The answer is 5.<|im_end|>\n"

    gsm = DataConfig(path=tmp_path, format="gsm8k")
    row = {"question": "Tom has 3 bags of 4 apples. How many?", "answer": "3*4=<<3*4=12>>12 apples.\n#### 12"}
    ex = tokenize(to_messages(row, gsm, "row"), tok, 512)
    assert labelled_text(tok, ex) == "3*4=12 apples.\n#### 12<|im_end|>\n"

    chat = DataConfig(path=tmp_path, format="chat", system_prompt="Be brief.")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Sum 1 and 1"},
        {"role": "assistant", "content": "2"},
    ]
    ex = tokenize(to_messages({"messages": messages}, chat, "row"), tok, 512)
    assert labelled_text(tok, ex) == "Hello.<|im_end|>\n2<|im_end|>\n"
    assert "Be brief." in tok.decode(ex.input_ids)

    with pytest.raises(ConfigError, match="format 'gsm8k' needs a string 'answer'"):
        to_messages({"question": "q"}, gsm, "row 7")
    with pytest.raises(ConfigError, match="no assistant message"):
        to_messages({"messages": [{"role": "user", "content": "x"}]}, chat, "row 1")


def test_split_is_seeded_disjoint_and_truncation_drops_replyless_rows(gguf_tokenizer, arithmetic: Path) -> None:
    def load(seed: int, max_length: int = 256):
        return load_examples(DataConfig(path=arithmetic, eval_rows=10, seed=seed), gguf_tokenizer, max_length)

    a, b, c = load(0), load(0), load(1)
    assert [e.input_ids for e in a.train] == [e.input_ids for e in b.train]
    assert [e.input_ids for e in a.train] != [e.input_ids for e in c.train]
    assert len(a.eval) == 10 and len(a.train) == 70 and a.dropped == 0
    # Cut right after the short prompts: the 20 long-prompt rows keep no reply token.
    prompt_len = min(sum(label == IGNORE for label in e.labels) for e in a.train)
    short = load(0, max_length=prompt_len + 1)
    assert short.dropped == 20 and len(short.train) + len(short.eval) == 60
    assert all(len(e.input_ids) == prompt_len + 1 and e.labels[-1] != IGNORE for e in short.train)
    with pytest.raises(ConfigError, match="no training rows left"):
        load(0, max_length=prompt_len)


# ---------------------------------------------------------------- runs


def test_lora_run_lowers_loss_and_peft_and_the_engine_load_it(tiny_llama: Path, arithmetic: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = ps.train.run({**config(tiny_llama, arithmetic, out), "merge": True})
    assert result.steps == 12 and not result.interrupted
    assert result.eval_loss_after < 0.9 * result.eval_loss_before, result
    record = json.loads((out / RECORD).read_text())
    assert record["base_model"]["sha256"] == content_hash(tiny_llama)
    assert record["metrics"]["eval_loss_before"] == pytest.approx(result.eval_loss_before)
    assert any("train_tokens_per_second" in h for h in record["log_history"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = [1, 42, 7, 300, 12, 5, 99]
    with torch.no_grad():
        want = peft_model(torch.tensor([ids])).logits[0].numpy()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor([ids])).logits[0].numpy(), want, rtol=1e-4, atol=1e-4)
    eng = ps.Engine.load(tiny_llama, dtype="f32")
    eng.load_adapter(out, name="sums")
    got = eng.logits(ids, adapter="sums")
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    # The adapter changed the model (so the comparison above is not base against base).
    assert np.abs(eng.logits(ids) - want).max() > 1e-3

    other = build_tiny_model(tmp_path / "other", "llama", seed=5)
    with pytest.raises(ps.AdapterError, match="trained from a different base model"):
        ps.Engine.load(other, dtype="f32").load_adapter(out)


def test_resume_reaches_the_uninterrupted_weights(tiny_llama: Path, arithmetic: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    ps.train.run(config(tiny_llama, arithmetic, straight, max_steps=8, save_every=4, eval_every=4))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    result = ps.train.run(config(tiny_llama, arithmetic, resumed, max_steps=8, save_every=4, eval_every=4), resume=True)
    assert result.steps == 8
    want, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    with pytest.raises(ConfigError, match="no checkpoint"):
        ps.train.run(config(tiny_llama, arithmetic, tmp_path / "fresh"), resume=True)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_ctrl_c_saves_a_usable_adapter(tiny_llama: Path, arithmetic: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config(tiny_llama, arithmetic, out, max_steps=100000, save_every=2)))
    proc = _cli(sys.executable, "-m", "peftscale", "train", str(path))
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "checkpoint-2").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "training did not reach step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, log
    record = json.loads((out / RECORD).read_text())
    assert record["interrupted"] is True and 2 <= record["steps"] < 100000
    # The interrupted step is checkpointed, and the message says how to continue from it.
    assert (out / "checkpoints" / f"checkpoint-{record['steps']}" / "optimizer.pt").exists()
    assert f"{path} --resume" in log, log
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_qlora_with_an_8bit_optimizer_runs_on_the_cpu(
    tiny_llama: Path, gguf_tokenizer, arithmetic: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    raw = config(tiny_llama, arithmetic, tmp_path / "q", max_steps=4, optimizer="adamw8bit", eval_every=4)
    raw["method"] = "qlora"
    # The tiny model's MLP width (96) does not fit bitsandbytes' CPU 4-bit blocks of 64.
    with pytest.raises(ConfigError, match="multiple of 64.*down_proj takes 96"):
        ps.train.run(raw)
    model = build_tiny_model(tmp_path / "tiny128", "llama", gguf_tokenizer, intermediate_size=128)
    raw["model"] = str(model)
    result = ps.train.run(raw)
    assert result.steps == 4 and np.isfinite(result.eval_loss_after)
    assert result.eval_loss_after < result.eval_loss_before
    record = json.loads((tmp_path / "q" / RECORD).read_text())
    assert record["method"] == "qlora" and record["config"]["quant"]["quant_type"] == "nf4"
    assert set(adapter_tensors(tmp_path / "q")) == set(adapter_tensors_names(tiny_llama))


def adapter_tensors_names(model: Path) -> list[str]:
    """The keys a peft r=4 all-linear adapter of the tiny Llama has."""
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    projections += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return [
        f"base_model.model.model.layers.{i}.{p}.lora_{ab}.weight"
        for i in range(2)
        for p in projections
        for ab in ("A", "B")
    ]


def test_torchrun_two_processes_train_one_adapter(tiny_llama: Path, arithmetic: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "ddp"
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config(tiny_llama, arithmetic, out, max_steps=4, eval_every=4)))
    proc = _cli(torchrun, "--standalone", "--nproc_per_node", "2", "-m", "peftscale", "train", str(path))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    record = json.loads((out / RECORD).read_text())
    assert record["processes"] == 2 and record["steps"] == 4
    assert set(adapter_tensors(out)) == set(adapter_tensors_names(tiny_llama))


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_pruned_model_loads_in_transformers_and_the_engine_alike(
    tiny_llama: Path, gguf_tokenizer, arithmetic: Path, tmp_path: Path, criterion: str
) -> None:
    from peftscale.train import prune
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    cfg = model.config
    splits = load_examples(DataConfig(path=arithmetic, eval_rows=8), gguf_tokenizer, 128)
    calibration = prune.batches(splits.train[:8], gguf_tokenizer.pad_token_id)
    stats = prune.calibrate(model, calibration, criterion)
    plan = prune.plan(model, criterion, stats, heads=0.5, mlp=0.25)
    # Every KV group keeps the same number of query heads: 1 of its 2.
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for heads in plan.heads:
        assert [h // group for h in heads] == list(range(cfg.num_key_value_heads))
    before = prune.parameter_count(model)
    prune.apply(model, plan)
    model.zero_grad(set_to_none=True)
    hd, h, layers = 16, cfg.hidden_size, cfg.num_hidden_layers
    removed_per_layer = 2 * (2 * hd * h) + 24 * 3 * h  # two heads (q rows, o columns), 24 of 96 channels
    assert prune.parameter_count(model) == before - layers * removed_per_layer
    model.save_pretrained(str(tmp_path / "pruned"))
    ids = [1, 42, 7, 300, 12, 5, 99, 3]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), dtype=torch.float32)
    assert (again.config.num_attention_heads, again.config.head_dim, again.config.intermediate_size) == (2, 16, 72)
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor([ids])).logits[0].numpy(), want)
    got = ps.Engine.load(tmp_path / "pruned", dtype="f32").logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_magnitude_pruning_keeps_the_strongest_heads_and_channels(tiny_llama: Path) -> None:
    from peftscale.train import prune
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[16:32] *= 10  # head 1 (group 0) and head 2 (group 1)
            layer.self_attn.q_proj.weight[32:48] *= 10
            layer.mlp.down_proj.weight[:, 90:] *= 10  # channels 90..95
    plan = prune.plan(model, "magnitude", {}, heads=0.5, mlp=0.9)
    assert plan.heads == [[1, 2]] * 2
    assert all(set(range(90, 96)) <= set(c) for c in plan.channels) and len(plan.channels[0]) == 10


def test_prune_method_reports_params_and_three_perplexities(tiny_llama: Path, arithmetic: Path, tmp_path: Path):
    raw = config(tiny_llama, arithmetic, tmp_path / "p", max_steps=10, eval_every=5, save_every=5)
    raw["method"] = "prune"
    raw["prune"] = {"heads": 0.5, "mlp": 0.25, "layers": 1, "criterion": "wanda", "calibration_rows": 8}
    result = ps.train.run(raw)
    record = json.loads((tmp_path / "p" / RECORD).read_text())
    p = record["pruning"]
    assert record["method"] == "prune" and p["layers_dropped"] in ([0], [1])
    assert p["parameters_after"] < p["parameters_before"]
    assert p["perplexity_recovered"] < p["perplexity_pruned"]
    assert record["base_model"]["sha256"] == content_hash(tmp_path / "p" / "pruned")
    assert record["pruned_from"]["sha256"] == content_hash(tiny_llama)
    assert result.eval_loss_after < result.eval_loss_before
    # The recovery adapter applies to the pruned model, in the engine too.
    eng = ps.Engine.load(tmp_path / "p" / "pruned", dtype="f32")
    eng.load_adapter(tmp_path / "p", name="recovery")
    assert eng.config["num_layers"] == 1 and eng.config["num_heads"] == 2


# ---------------------------------------------------------------- distillation


def test_divergences_follow_their_definitions() -> None:
    from peftscale.train.config import DistillConfig
    from peftscale.train.distill import divergence

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    ps_, pt = torch.softmax(s / 2, -1), torch.softmax(t / 2, -1)
    forward = (pt * (pt.log() - ps_.log())).sum(-1) * 4
    reverse = (ps_ * (ps_.log() - pt.log())).sum(-1) * 4
    m = 0.3 * pt + 0.7 * ps_
    jsd = (0.3 * (pt * (pt.log() - m.log())).sum(-1) + 0.7 * (ps_ * (ps_.log() - m.log())).sum(-1)) * 4
    for loss, beta, want in [
        ("forward_kl", 0.5, forward),
        ("reverse_kl", 0.5, reverse),
        ("jsd", 0.3, jsd),
        ("jsd", 0.0, forward),
        ("jsd", 1.0, reverse),
    ]:
        got = divergence(s, t, DistillConfig(loss=loss, beta=beta, temperature=2.0))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{loss} beta={beta}")
    assert divergence(s, s, DistillConfig(loss="jsd")).abs().max() < 1e-6


def test_distillation_lowers_kl_to_the_teacher(
    tiny_llama: Path, gguf_tokenizer, arithmetic: Path, tmp_path: Path
) -> None:
    student = build_tiny_model(tmp_path / "student", "llama", gguf_tokenizer, seed=3)
    raw = config(student, arithmetic, tmp_path / "d", max_steps=12, eval_every=6, save_every=6, lr=3e-3)
    raw["method"] = "distill"
    raw["distill"] = {"teacher": str(tiny_llama), "loss": "forward_kl", "student": "full"}
    ps.train.run(raw)
    record = json.loads((tmp_path / "d" / RECORD).read_text())
    d = record["distillation"]
    assert record["method"] == "distill" and record["teacher"]["sha256"] == content_hash(tiny_llama)
    assert d["kl_after"] < 0.95 * d["kl_before"], d

    # GKD's mix: JSD, some cross-entropy, half the batches on the student's own samples.
    raw["distill"] = {"teacher": str(tiny_llama), "loss": "jsd", "ce_weight": 0.2, "on_policy": 0.5}
    raw["distill"]["max_new_tokens"] = 16
    raw["train"] = {**raw["train"], "max_steps": 4, "log_every": 1}
    raw["output"] = str(tmp_path / "gkd")
    ps.train.run(raw)
    losses = [h["loss"] for h in json.loads((tmp_path / "gkd" / RECORD).read_text())["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))

    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny_llama, other_tok)
    tok = type(gguf_tokenizer).from_pretrained(str(other_tok))
    tok.add_tokens(["<not-in-the-student>"])
    tok.save_pretrained(str(other_tok))
    raw["distill"] = {"teacher": str(other_tok)}
    with pytest.raises(ConfigError, match="does not share the student's tokenizer"):
        ps.train.run(raw)
