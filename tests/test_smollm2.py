"""Integration tests on the packaged SmolLM2-135M-Instruct GGUF, with transformers as the oracle."""

from __future__ import annotations

import numpy as np
import peftscale as ps
import pytest
import torch

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1492, Columbus sailed the ocean blue; 3.14159 is pi and 1,000,000 is a million.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Café, naïve, 東京, emoji 🚀 and tabs\tand  double  spaces.",
    "<|im_start|>user\nHi there<|im_end|>\n",
]

# 500+ positions of mixed text for teacher-forced top-1 agreement between two paths.
AGREEMENT_TEXT = " ".join(TEXTS[:4]) + (
    " Photosynthesis converts light energy into chemical energy stored in glucose. The mitochondria"
    " is the powerhouse of the cell. Janet's ducks lay 16 eggs per day. She eats three for breakfast"
    " every morning and bakes muffins for her friends every day with four. She sells the remainder"
    " at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every"
    " day at the farmers' market? Let's think step by step. 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18 dollars."
    " import numpy as np\nx = np.arange(10)\nprint(x.sum())\n The Treaty of Westphalia (1648) ended the"
    " Thirty Years' War and established the principle of state sovereignty in Europe. Water boils at"
    " 100 degrees Celsius at sea level, but at lower temperatures at high altitudes because pressure"
    " is lower. The quick brown fox jumps over the lazy dog again and again, while the programmer"
    " debugs a recursive function that computes Fibonacci numbers inefficiently."
)

PROMPTS = [
    ("chat", "What is 12 times 7?"),
    ("chat", "Write a haiku about the sea."),
    (
        "chat",
        "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips did she sell?",
    ),
    ("plain", "The history of the Roman Empire"),
    ("plain", "def is_prime(n):"),
    ("plain", "Once upon a time, in a small village,"),
]


def test_tokenizer_matches_transformers(smollm2_f32: ps.Engine, hf_smollm2) -> None:
    _, tok = hf_smollm2
    for text in TEXTS:
        assert smollm2_f32.tokenizer.encode(text) == tok.encode(text), text
        ids = tok.encode(text)
        assert smollm2_f32.tokenizer.decode(ids) == tok.decode(ids)


def test_chat_template_matches_transformers(smollm2_f32: ps.Engine, hf_smollm2) -> None:
    _, tok = hf_smollm2
    msgs = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ]
    ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert smollm2_f32.apply_chat_template(msgs) == ref


def test_f32_logits_match_transformers_at_every_position(smollm2_f32: ps.Engine, hf_smollm2) -> None:
    model, tok = hf_smollm2
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        ours = smollm2_f32.logits(ids)
        assert ours.shape == ref.shape
        rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
        assert rel.max() < 1e-4, f"{text!r}: max relative error {rel.max():.2e}"


def _hf_greedy(model, ids: list[int], max_new_tokens: int, **extra) -> list[int]:
    """transformers' greedy continuation of ``ids``, never stopping at EOS."""
    x = torch.tensor([ids])
    with torch.no_grad():
        # An explicit mask: otherwise transformers masks the prompt's <|im_end|> (it is also the pad id).
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
            **extra,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_matches_transformers(smollm2_f32: ps.Engine, hf_smollm2) -> None:
    model, tok = hf_smollm2
    for kind, text in PROMPTS:
        prompt = smollm2_f32.apply_chat_template([{"role": "user", "content": text}]) if kind == "chat" else text
        ref = _hf_greedy(model, tok.encode(prompt), 64)
        out = smollm2_f32.generate(prompt, max_new_tokens=64, ignore_eos=True)
        assert out.token_ids == ref, f"{kind}: {text!r}"


def test_quantized_top1_agrees_with_f32(smollm2_q: ps.Engine, smollm2_f32: ps.Engine) -> None:
    """Teacher-forced top-1 agreement of the Q4_1 path with the f32 path over 500+ positions."""
    ids = smollm2_f32.tokenizer.encode(AGREEMENT_TEXT)
    ids = (ids * 3)[:520]
    a = smollm2_q.logits(ids).argmax(axis=1)
    b = smollm2_f32.logits(ids).argmax(axis=1)
    agreement = float((a == b).mean())
    print(f"quantized vs f32 top-1 agreement: {agreement:.4f} over {len(ids)} positions")
    assert len(ids) >= 500
    assert agreement >= 0.97
    # Measured with the quantized engine's default half-precision cache, against exact f32.
    assert (smollm2_q.kv_dtype, smollm2_f32.kv_dtype) == ("f16", "f32")


def test_batched_prompts_of_different_lengths_equal_single(smollm2_q: ps.Engine) -> None:
    prompts = [
        "Hi",
        smollm2_q.apply_chat_template([{"role": "user", "content": "Name three colours."}]),
        "The capital of France is",
    ]
    alone = [smollm2_q.generate(p, max_new_tokens=24).token_ids for p in prompts]
    together = smollm2_q.generate(prompts, max_new_tokens=24)
    assert [o.token_ids for o in together] == alone


def test_outputs_carry_text_logprobs_and_stats(smollm2_q: ps.Engine) -> None:
    out = smollm2_q.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], max_new_tokens=32
    )
    assert "Paris" in out.text
    assert out.finish_reason == "eos"
    assert len(out.logprobs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.logprobs)
    assert out.stats.tokens_forwarded == out.prompt_tokens + len(out.token_ids) - 1
    assert out.stats.flops > 2 * 100e6 * out.stats.tokens_forwarded
    assert out.stats.steps == len(out.token_ids)
    assert 0 < out.stats.first_token_seconds < out.stats.seconds
    later = (out.stats.seconds - out.stats.first_token_seconds) / (len(out.token_ids) - 1)
    assert out.stats.seconds_per_output_token == pytest.approx(later)
    assert out.text == smollm2_q.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_strings_even_across_tokens(smollm2_q: ps.Engine) -> None:
    prompt = "1, 2, 3, 4, 5, 6,"
    full = smollm2_q.generate(prompt, max_new_tokens=30, ignore_eos=True)
    assert " 9," in full.text
    # ", 9" is spelled by several tokens; the text is cut before it.
    out = smollm2_q.generate(prompt, max_new_tokens=30, stop=[" 9,"])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(" 9,")]
    assert len(out.token_ids) < len(full.token_ids)


def test_stream_yields_the_generated_text(smollm2_q: ps.Engine) -> None:
    prompt = smollm2_q.apply_chat_template([{"role": "user", "content": "Tell me about cats."}])
    pieces = list(smollm2_q.stream(prompt, max_new_tokens=40))
    assert len(pieces) > 5
    assert "".join(pieces) == smollm2_q.generate(prompt, max_new_tokens=40).text


def test_repetition_penalty_matches_transformers(smollm2_f32: ps.Engine, hf_smollm2) -> None:
    model, tok = hf_smollm2
    prompt = "List the days of the week: Monday, Tuesday,"
    ref = _hf_greedy(model, tok.encode(prompt), 32, repetition_penalty=1.3)
    out = smollm2_f32.generate(prompt, max_new_tokens=32, strategy=ps.Greedy(repetition_penalty=1.3), ignore_eos=True)
    assert out.token_ids == ref
    assert out.token_ids != smollm2_f32.generate(prompt, max_new_tokens=32, ignore_eos=True).token_ids
