"""peftscale against llama.cpp on the weight formats users bring, in one run on one machine.

Run:  python benches/bench_formats.py [--formats Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_1,F16,BF16] [--threads 2]

- Builds llama.cpp's own tools once from the source inside ``llama-cpp-python`` 0.3.36's sdist
  (``cmake -DGGML_NATIVE=ON``; targets ``llama-bench``, ``llama-batched-bench``, ``llama-quantize``,
  ``llama-perplexity`` for ``same_top1_against_llama.py``)
  into ``build/llama.cpp`` (a few minutes on two cores; never part of CI).
- Makes each format from the packaged SmolLM2-135M-Instruct with
  ``llama-quantize --allow-requantize`` (``F16`` too); ``BF16`` is a Hugging Face safetensors folder
  in bfloat16 (what PEFT training holds), written from the packaged model with transformers, and
  is compared with llama.cpp's F16 file.
- For each format, both engines on the same file, threads and machine: single-row decode of 128
  tokens (llama-bench ``tg128``), prefill of 1,000 tokens (``pp1000``), and aggregate decode of 16
  and 64 rows of one prompt (llama-batched-bench with ``-pps``; peftscale samples the rows from one
  shared prompt). For F16/BF16 also the bandwidth floor: weight bytes read per token over the
  all-core read bandwidth measured in the same run.
Figures are the best of ``--repeats``. Run it with nothing else on the cores, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import peftscale as ps

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "llama.cpp"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-perplexity")


def sh(cmd: list[str], **kw: object) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout  # type: ignore[call-overload]


def llama_tools() -> Path:
    """The directory holding llama.cpp's tools, built from the sdist on first use."""
    bin_dir = BUILD / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    src = BUILD / "src"
    if not (src / "CMakeLists.txt").exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        archive = BUILD / SDIST
        if not archive.exists():
            # The sdist from PyPI's simple index (pip download would build its metadata first).
            index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
            url = re.search(r'href="([^"#]*' + re.escape(SDIST) + ")", index)
            if url is None:
                sys.exit(f"{SDIST} not found on PyPI")
            urllib.request.urlretrieve(url.group(1), archive)
        with tarfile.open(archive) as tar:
            prefix = SDIST.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(src, members=members, filter="data")
    print("building llama.cpp's tools (a few minutes) ...", flush=True)
    cmake = [sys.executable, "-m", "cmake"] if not _has("cmake") else ["cmake"]
    flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"]
    sh([*cmake, "-S", str(src), "-B", str(BUILD / "cmake"), *flags])
    sh([*cmake, "--build", str(BUILD / "cmake"), "-j", str(os.cpu_count() or 2), "--target", *TOOLS])
    bin_dir.mkdir(exist_ok=True)
    for t in TOOLS:
        (bin_dir / t).unlink(missing_ok=True)
        (bin_dir / t).symlink_to(BUILD / "cmake" / "bin" / t)
    return bin_dir


def _has(cmd: str) -> bool:
    return subprocess.run(["which", cmd], capture_output=True).returncode == 0


def make_gguf(tools: Path, src: Path, fmt: str) -> Path:
    out = BUILD / "models" / f"smollm2-135m-{fmt}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        sh([str(tools / "llama-quantize"), "--allow-requantize", str(src), str(out), fmt])
    return out


def make_bf16_folder(src: Path) -> Path:
    out = BUILD / "models" / "smollm2-135m-bf16"
    if not (out / "model.safetensors").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        sys.path.insert(0, str(ROOT / "tests"))
        from test_half_weights import write_half_folder

        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        write_half_folder(model, tok, out, torch.bfloat16)
    return out


def llama_bench(tools: Path, model: Path, threads: int, repeats: int) -> tuple[float, float]:
    """llama.cpp's decode (tg128) and prefill (pp1000) tokens/s."""
    out = sh(
        [str(tools / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "1000", "-n", "128"]
        + ["-r", str(repeats), "-o", "json"]
    )
    rows = json.loads(out)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == 1000 and r["n_gen"] == 0)
    return tg, pp


def llama_batched(tools: Path, model: Path, threads: int, rows: list[int]) -> dict[int, float]:
    """llama.cpp's aggregate decode tokens/s for each row count, one shared prompt of 128 tokens."""
    out = sh(
        [str(tools / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-tb", str(threads)]
        + ["-c", str(max(rows) * 256 + 256), "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "128"]
        + ["-npl", ",".join(map(str, rows)), "-pps", "--output-format", "jsonl"]
    )
    got = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            got[int(r["pl"])] = float(r["speed_tg"])
    return got


def ours(path: Path, dtype: str, rows: list[int], repeats: int) -> dict[str, float]:
    eng = ps.Engine.load(path, dtype=dtype)
    prompt = eng.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    )
    long_ids = (eng.tokenizer.encode(_long_text()) * 4)[:1000]
    eng.generate(prompt, max_new_tokens=8, ignore_eos=True)
    res = {"weight_bytes": float(eng.weight_bytes)}
    decode = 0.0
    for _ in range(repeats):
        out = eng.generate(prompt, max_new_tokens=128, ignore_eos=True)
        decode = max(decode, len(out.token_ids) / out.stats.seconds)
    res["decode"] = decode
    prefill = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        eng.generate(long_ids, max_new_tokens=1)
        prefill = max(prefill, len(long_ids) / (time.perf_counter() - t))
    res["prefill"] = prefill
    for n in rows:
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            outs = eng.generate(
                [prompt] * n, max_new_tokens=128, ignore_eos=True, strategy=ps.Sampling(temperature=0.8, top_k=50)
            )
            best = max(best, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
        res[f"rows{n}"] = best
    return res


def _long_text() -> str:
    return (
        "The history of computing is a story of people finding ways to make machines do arithmetic "
        "faster, then discovering that arithmetic was never the hard part. Early mechanical "
        "calculators, the punched-card tabulators of the census, and the first electronic computers "
        "each solved one bottleneck and exposed the next: memory, then programming, then the cost of "
        "moving data between the processor and its memory. "
    ) * 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_1,F16,BF16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="16,64")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",") if r]
    os.environ.setdefault("PEFTSCALE_NUM_THREADS", str(args.threads))
    tools = llama_tools()
    packaged = Path(ps.models.smollm2_135m_instruct())
    cpu = next((ln.split(":", 1)[1].strip() for ln in sh(["lscpu"]).splitlines() if ln.startswith("Model name")), "?")
    kernels = ps.cpu_kernels()
    print(f"CPU: {cpu}; {args.threads} threads each; peftscale kernels: {kernels['isa']}")
    sys.path.insert(0, str(ROOT / "benches"))
    from bench_greedy import read_bandwidth

    bandwidth = read_bandwidth(256 << 20, args.threads)
    print(f"all-core read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    header = ["format", "llama.cpp decode / prefill", "peftscale decode / prefill", "ratio decode / prefill"]
    header += [f"{n} rows: llama.cpp / peftscale (ratio)" for n in rows] + ["floor (tokens/s)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for fmt in [f for f in args.formats.split(",") if f]:
        if fmt == "Q4_1":
            file = packaged
        elif fmt == "BF16":
            file = make_gguf(tools, packaged, "F16")
        else:
            file = make_gguf(tools, packaged, fmt)
        l_tg, l_pp = llama_bench(tools, file, args.threads, args.repeats)
        l_rows = llama_batched(tools, file, args.threads, rows)
        if fmt == "BF16":
            r = ours(make_bf16_folder(packaged), "auto", rows, args.repeats)
        else:
            r = ours(file, "auto", rows, args.repeats)
        cells = [
            fmt + (" (peftscale: safetensors; llama.cpp: F16 GGUF)" if fmt == "BF16" else ""),
            f"{l_tg:.0f} / {l_pp:.0f}",
            f"{r['decode']:.0f} / {r['prefill']:.0f}",
            f"**{r['decode'] / l_tg:.2f}x / {r['prefill'] / l_pp:.2f}x**",
        ]
        for n in rows:
            ln = l_rows.get(n, float("nan"))
            cells.append(f"{ln:.0f} / {r[f'rows{n}']:.0f} ({r[f'rows{n}'] / ln:.2f}x)")
        floor = bandwidth / r["weight_bytes"]
        cells.append(f"{floor:.0f} (decode at {r['decode'] / floor:.2f} of it)")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
