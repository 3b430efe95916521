"""This build of peftscale against another build (an earlier commit's wheel installed elsewhere), in
alternating runs on the same files: did a change make a format slower?

Run:
    git worktree add /tmp/old <commit> && (cd /tmp/old && maturin build --release -o /tmp/oldwheel)
    pip install --no-deps --target /tmp/oldsite /tmp/oldwheel/*.whl
    python benches/bench_against_build.py --other /tmp/oldsite FILE.gguf [FILE2.gguf ...]

Each file: single-row greedy decode of 128 tokens and prefill of 1,000 tokens, each build in its own
process, alternated ``--rounds`` times (this build, the other, this, the other, ...); the table gives
the best of each and the median of the per-round ratios. Run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MEASURE = r"""
import json, sys, time
import peftscale as ps
eng = ps.Engine.load(sys.argv[1])
ask = "Write a short story about a robot who learns to paint."
prompt = eng.apply_chat_template([{"role": "user", "content": ask}])
eng.generate(prompt, max_new_tokens=8, ignore_eos=True)
out = eng.generate(prompt, max_new_tokens=128, ignore_eos=True)
decode = len(out.token_ids) / out.stats.seconds
text = "The history of computing is a story of people finding ways to make machines do arithmetic faster. " * 60
ids = eng.tokenizer.encode(text)[:1000]
t = time.perf_counter()
eng.generate(ids, max_new_tokens=1)
print(json.dumps({"decode": decode, "prefill": len(ids) / (time.perf_counter() - t), "file": ps.__file__}))
"""


def measure(path: str, site: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", MEASURE, path], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="a site-packages folder holding the other build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    print("| file | this build decode / prefill | other build decode / prefill | this / other (median per round) |")
    print("|---|---|---|---|")
    for f in args.files:
        runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
        for _ in range(args.rounds):
            runs["this"].append(measure(f, None))
            runs["other"].append(measure(f, args.other))
        assert runs["this"][0]["file"] != runs["other"][0]["file"], "both runs imported the same build"
        best = {k: {m: max(r[m] for r in v) for m in ("decode", "prefill")} for k, v in runs.items()}
        ratio = {
            m: statistics.median(a[m] / b[m] for a, b in zip(runs["this"], runs["other"], strict=True))
            for m in ("decode", "prefill")
        }
        print(
            f"| {os.path.basename(f)} | {best['this']['decode']:.0f} / {best['this']['prefill']:.0f} | "
            f"{best['other']['decode']:.0f} / {best['other']['prefill']:.0f} | "
            f"{ratio['decode']:.3f} / {ratio['prefill']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
