"""Teacher-forced top-1 agreement of each weight format's fast path with the same file dequantized to
f32 (``dtype="f32"``), on the 520-position text of ``tests/test_smollm2.py``; and greedy text of
peftscale against llama.cpp's (``llama-simple``, built by ``bench_formats.py``) for 32 tokens.

Run:  python benches/format_agreement.py FILE.gguf [FILE2.gguf ...]
      (greedy against llama.cpp when build/llama.cpp/bin/llama-simple exists)

At each first difference from llama.cpp's greedy text it prints both engines' tokens and the margin
between them in peftscale's logits and in the same file's f32 dequantization: a near tie that the
exact model resolves peftscale's way is llama.cpp's own rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import peftscale as ps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_smollm2 import AGREEMENT_TEXT  # noqa: E402


def agreement(path: str, fast_dtype: str = "auto") -> float:
    fast = ps.Engine.load(path, dtype=fast_dtype)
    exact = ps.Engine.load(path, dtype="f32")
    ids = (exact.tokenizer.encode(AGREEMENT_TEXT) * 3)[:520]
    a = fast.logits(ids).argmax(axis=1)
    b = exact.logits(ids).argmax(axis=1)
    return float((a == b).mean())


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "Once upon a time, a robot",
    "The three primary colors are",
]
LLAMA_SIMPLE = Path(__file__).resolve().parent.parent / "build" / "llama.cpp" / "bin" / "llama-simple"


def greedy_against_llama(path: str, new_tokens: int = 32) -> None:
    fast = ps.Engine.load(path)
    exact = ps.Engine.load(path, dtype="f32")
    tok = fast.tokenizer
    same = 0
    for p in PROMPTS:
        ours = list(fast.generate(p, max_new_tokens=new_tokens, ignore_eos=True).token_ids)
        text = subprocess.run(
            [str(LLAMA_SIMPLE), "-m", path, "-n", str(new_tokens), p], capture_output=True, text=True, check=True
        ).stdout
        prompt_ids = tok.encode(p)
        theirs = tok.encode(text)[len(prompt_ids) :]
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        if k is None:
            same += 1
            continue
        ctx = prompt_ids + ours[:k]
        lf, le = fast.logits(ctx)[-1], exact.logits(ctx)[-1]
        a, b = ours[k], theirs[k]
        print(
            f"  {p!r} step {k}: peftscale {tok.decode([a])!r}, llama.cpp {tok.decode([b])!r}; "
            f"margin in peftscale's logits {lf[a] - lf[b]:+.3f}, in f32's {le[a] - le[b]:+.3f}"
        )
    print(f"{Path(path).name}: greedy text identical to llama.cpp's for {new_tokens} tokens: {same} of {len(PROMPTS)}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"{Path(p).name}: top-1 agreement with dtype='f32' {agreement(p):.4f} over 520 positions")
        if LLAMA_SIMPLE.exists():
            greedy_against_llama(p)
