"""What a verifier costs beside the policy: 16 samples of one prompt decoded with and without a
verifier scoring every one of them, on the packaged SmolLM2-135M-Instruct (Q4_1).

Run:  python benches/bench_verifier.py --verifier runs/arith-prm [--n 16] [--new-tokens 128] [--rounds 5]

- ``plain``: ``BestOfN(n=16)`` ranked by mean log-probability, end-of-sequence ignored so that every
  sample runs ``--new-tokens`` tokens;
- ``verified``: the same samples (same seeds: the sampled tokens are identical) ranked by the
  verifier, whose rows run in the engine's batched passes: the prompt is fed to it once beside the
  policy's prefill, and each sample's tokens (plus its closing step tag) are fed in the pass after the
  sample ends. The verifier reads every generated token once, as a PRM scoring every step does.
  A verifier trained with ``share_layers: L`` (LoRA above layer L only) shares the bottom L layers
  with this base-model policy: the samples' rows keep their hidden states at layer L and the
  verifier's rows run the layers above only (``trunk_tokens`` counts the tokens that did).

Printed per round (alternated, plain then verified): seconds, forward passes and tokens forwarded;
then the median of the per-round ratios verified / plain. The ratio is the cost of one decode step of
``n`` policy rows plus the verifier's scoring of those ``n`` candidates' new tokens, amortized over the
generation. Run it with nothing else on the cores, and name the CPU beside the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import peftscale as ps

QUESTION = (
    "Mia has 24 apples. Then Mia gives away 9 apples. Then Mia buys 3 times as many apples as she has. "
    "How many apples does Mia have now?"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--verifier", required=True, help="a verifier folder (peftscale train, method prm)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    eng = ps.Engine.load(ps.models.smollm2_135m_instruct())
    eng.load_verifier(args.verifier, "v")
    prompt = eng.apply_chat_template([{"role": "user", "content": QUESTION}])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    kernels = ps.cpu_kernels(seconds=0.2)
    print(f"machine: {cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores, {kernels['isa']}")
    print(f"prompt tokens: {len(eng.tokenizer.encode(prompt))}, samples: {args.n}, new tokens each: {args.new_tokens}")
    plain = ps.BestOfN(n=args.n, sampling=ps.Sampling(temperature=0.8, seed=1))
    verified = ps.BestOfN(n=args.n, sampling=ps.Sampling(temperature=0.8, seed=1), scorer=ps.Verifier("v"))

    def run(strategy: ps.BestOfN) -> ps.GenerationOutput:
        out = eng.generate(prompt, strategy=strategy, max_new_tokens=args.new_tokens, ignore_eos=True)
        assert not isinstance(out, list)
        return out

    run(plain)  # warm-up
    ratios, pass_ratios = [], []
    print("| round | plain s | verified s | ratio | passes plain / verified | tokens plain / verified | shared |")
    print("|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        a, b = run(plain), run(verified)
        assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
        ratio = b.stats.seconds / a.stats.seconds
        ratios.append(ratio)
        pass_ratios.append(b.stats.forward_passes / a.stats.forward_passes)
        print(
            f"| {r} | {a.stats.seconds:.2f} | {b.stats.seconds:.2f} | {ratio:.2f} | "
            f"{a.stats.forward_passes} / {b.stats.forward_passes} | "
            f"{a.stats.tokens_forwarded} / {b.stats.tokens_forwarded} | {b.stats.trunk_tokens} |"
        )
    time_ratio, pass_ratio = statistics.median(ratios), statistics.median(pass_ratios)
    print(f"median verified / plain: {time_ratio:.2f}x time, {pass_ratio:.3f}x passes")


if __name__ == "__main__":
    main()
