"""Verifiers in the engine: the value head's scores equal the training side's torch model on the same
inputs, verifier rows share passes with policy rows without changing either, and bad verifier
folders are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peftscale as ps
import pytest
import torch
from peftscale.train import verifier

PROMPTS = [
    ("What is (3 + 4) * 2?", ["3 + 4 = 7", "7 * 2 = 14", "The answer is 14."]),
    ("Mia has 12 apples and gives away 5. How many are left?", ["12 - 5 = 7", "The answer is 7."]),
    ("Add 1 and 1.", ["1 + 1 = 2"]),
]


def build_verifier(
    base: Path,
    out: Path,
    tag: str = "\n",
    seed: int = 0,
    targets: tuple[str, ...] = (),
    layers: list[int] | None = None,
    head_std: float = 0.5,
) -> Path:
    """A verifier folder with a random (non-zero) LoRA and head on ``base`` (a Hugging Face folder
    or a GGUF file), saved as training saves one; its LoRA only on ``layers`` when given."""
    from peft import LoraConfig, get_peft_model
    from peftscale.train.base import load_model, resolve

    torch.manual_seed(seed)
    lm = load_model(resolve(str(base)))
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(targets) or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    model = verifier.ValueHeadModel(get_peft_model(lm, lora), {"kind": "prm", "step_tag": tag, "aggregation": "min"})
    with torch.no_grad():
        model.head.weight.normal_(0.0, head_std)
        model.head.bias.fill_(0.1)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_verifier(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_verifier(tiny_llama, tmp_path_factory.mktemp("verifier"))


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama: Path, tiny_verifier: Path) -> ps.Engine:
    eng = ps.Engine.load(tiny_llama, dtype="f32")
    eng.load_verifier(tiny_verifier)
    return eng


def _torch_verifier(path: Path, base: Path) -> tuple[verifier.ValueHeadModel, object]:
    return verifier.load(path, base_model=base)


def test_engine_scores_equal_the_training_side_model(tiny_llama: Path, tiny_verifier: Path, tiny_engine) -> None:
    model, tok = _torch_verifier(tiny_verifier, tiny_llama)
    engine_scores = tiny_engine.score_steps_batch(PROMPTS)
    for (prompt, steps), got in zip(PROMPTS, engine_scores, strict=True):
        want = verifier.score(model, tok, prompt, steps)
        assert len(got) == len(steps)
        assert got == pytest.approx(want, abs=1e-4), (prompt, got, want)
    # The scores vary with the text (a head that ignored its input would pass the above too).
    flat = [s for scores in engine_scores for s in scores]
    assert max(flat) - min(flat) > 0.05, flat
    assert tiny_engine.score_steps(*PROMPTS[0]) == pytest.approx(engine_scores[0], abs=1e-6)


def test_head_logits_at_every_position_equal_torch(tiny_llama: Path, tiny_verifier: Path, tiny_engine) -> None:
    model, tok = _torch_verifier(tiny_verifier, tiny_llama)
    ids = [tok("Hello there.\n1 + 1 = 2\n")["input_ids"], tok("Q\nA\n")["input_ids"]]
    got = tiny_engine._core.verifier_logits("verifier", ids)
    for seq, values in zip(ids, got, strict=True):
        with torch.no_grad():
            h = model.hidden(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
            want = model.head(h).squeeze(-1)
        assert values == pytest.approx(want.tolist(), abs=1e-4)


@pytest.mark.parametrize("tag", ["\n\n", " <step>"])
def test_other_tags_are_read_where_training_reads_them(tiny_llama: Path, tmp_path: Path, tag: str) -> None:
    path = build_verifier(tiny_llama, tmp_path / "v", tag=tag, seed=3)
    model, tok = _torch_verifier(path, tiny_llama)
    eng = ps.Engine.load(tiny_llama, dtype="f32")
    eng.load_verifier(path, "v")
    assert eng.verifier_info("v") == {"kind": "prm", "step_tag": tag, "aggregation": "min"}
    for prompt, steps in PROMPTS:
        want = verifier.score(model, tok, prompt, steps)
        assert eng.score_steps(prompt, steps, verifier="v") == pytest.approx(want, abs=1e-4)


def test_bad_verifier_folders_are_refused_by_name(tiny_llama: Path, tiny_verifier: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    eng = ps.Engine.load(tiny_llama, dtype="f32")
    # An ordinary adapter folder (no head, no verifier.json).
    no_head = tmp_path / "no_head"
    shutil.copytree(tiny_verifier, no_head)
    (no_head / verifier.HEAD_FILE).unlink()
    with pytest.raises(ps.AdapterError, match=r"not a verifier folder: value_head.safetensors is missing"):
        eng.load_verifier(no_head)
    # A head for another hidden size.
    other = tmp_path / "other"
    shutil.copytree(tiny_verifier, other)
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(other / verifier.HEAD_FILE))
    with pytest.raises(ps.AdapterError, match=r"expected weight \[1, 64\] and bias \[1\]"):
        eng.load_verifier(other)
    meta = json.loads((tiny_verifier / verifier.CONFIG_FILE).read_text())
    (other / verifier.CONFIG_FILE).write_text(json.dumps({**meta, "hidden_size": 32}))
    with pytest.raises(ps.AdapterError, match="trained on another base model"):
        eng.load_verifier(other)
    # An unknown aggregation, and an unknown verifier name.
    bad = tmp_path / "bad"
    shutil.copytree(tiny_verifier, bad)
    (bad / verifier.CONFIG_FILE).write_text(json.dumps({**meta, "aggregation": "mean"}))
    with pytest.raises(ps.AdapterError, match="aggregation must be 'min', 'prod' or 'last'"):
        eng.load_verifier(bad)
    with pytest.raises(ps.InvalidArgument, match="no verifier named `nope` is loaded"):
        eng.score_steps("q", ["a"], verifier="nope")
    eng.load_verifier(tiny_verifier)
    with pytest.raises(ps.InvalidArgument, match="already loaded"):
        eng.load_verifier(tiny_verifier)
    eng.unload_verifier("verifier")
    assert eng.verifiers == []


def test_a_tag_the_tokenizer_cannot_read_back_is_refused(tmp_path: Path, tiny_verifier: Path) -> None:
    """A word-level tokenizer without the tag's text maps it to its unknown token."""
    from conftest import build_tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = build_tiny_model(tmp_path / "base", vocab_size=64)
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "one", "two", "plus"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(base / "tokenizer.json"))
    folder = tmp_path / "v"
    shutil.copytree(tiny_verifier, folder)
    eng = ps.Engine.load(base, dtype="f32")
    with pytest.raises(ps.AdapterError, match='the step tag "\\\\n" is not text this model\'s tokenizer'):
        eng.load_verifier(folder)
