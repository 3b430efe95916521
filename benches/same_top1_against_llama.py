"""Top-1 agreement of each quantized file's fast path with the same file dequantized to f32, for
llama.cpp and peftscale on the same text and the same chunks: how much of the gap to f32 is the
8-bit quantization of the activations, which both engines do.

Run:  python benches/same_top1_against_llama.py [Q6_K Q8_0 Q4_K_M ...]

- Needs the files and tools `benches/bench_formats.py` makes (``build/llama.cpp``), plus
  ``llama-perplexity`` (``cmake --build <llama.cpp build> --target llama-perplexity``).
- The reference is the file dequantized to F32 by ``llama-quantize --allow-requantize ... F32``
  (made here on first use); llama.cpp's figure is ``llama-perplexity --kl-divergence``'s "Same top
  p" against that file's logits; peftscale's compares ``dtype="auto"`` with ``dtype="f32"``.
- Text: the first 60 GSM8K test questions and answers (shipped with peftscale), in chunks of 256
  tokens of which the second half is scored, as llama-perplexity scores them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import peftscale as ps
from peftscale.eval.datasets import PACKAGED_DATA
from peftscale.train.data import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "build" / "llama.cpp" / "models"
BIN = ROOT / "build" / "llama.cpp" / "bin"
CTX = 256


def main() -> None:
    formats = sys.argv[1:] or ["Q6_K", "Q8_0", "Q4_K_M"]
    perplexity = BIN / "llama-perplexity"
    if not perplexity.exists():
        sys.exit(f"{perplexity} is missing: build llama.cpp's llama-perplexity target (see the docstring)")
    rows = read_jsonl(PACKAGED_DATA / "gsm8k" / "test.jsonl", ValueError)[:60]
    text = "\n\n".join(r["question"] + "\n" + r["answer"] for r in rows)
    text_file = MODELS / "same_top1.txt"
    text_file.write_text(text)
    common = ["-f", str(text_file), "-c", str(CTX), "-b", str(CTX), "-t", "2"]
    for fmt in formats:
        q, ref = MODELS / f"smollm2-135m-{fmt}.gguf", MODELS / f"smollm2-135m-{fmt}-f32.gguf"
        if not ref.exists():
            subprocess.run(
                [str(BIN / "llama-quantize"), "--allow-requantize", str(q), str(ref), "F32"],
                capture_output=True,
                check=True,
            )
        base = MODELS / f"kl-base-{fmt}.bin"
        subprocess.run([str(perplexity), "-m", str(ref), *common, "--kl-divergence-base", str(base)], check=True,
                       capture_output=True)  # fmt: skip
        out = subprocess.run(
            [str(perplexity), "-m", str(q), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
            capture_output=True,
            text=True,
            check=True,
        )
        same = re.search(r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)", out.stdout + out.stderr)
        fast, exact = ps.Engine.load(q), ps.Engine.load(q, dtype="f32")
        ids = fast.tokenizer.encode(text)
        agree = total = 0
        for start in range(0, len(ids) - CTX + 1, CTX):
            chunk = ids[start : start + CTX]
            a = fast.logits(chunk).argmax(axis=1)[CTX // 2 : CTX - 1]
            b = exact.logits(chunk).argmax(axis=1)[CTX // 2 : CTX - 1]
            agree, total = agree + int((a == b).sum()), total + len(a)
        theirs = f"{same.group(1)} +- {same.group(2)} %" if same else "?"
        print(f"{fmt}: llama.cpp {theirs}; peftscale {100 * agree / total:.2f} % over {total} positions", flush=True)


if __name__ == "__main__":
    main()
