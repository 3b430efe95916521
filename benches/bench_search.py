"""Throughput of the search strategies on the packaged SmolLM2-135M (Q4_1), against peers in
the same run.

Run:  python benches/bench_search.py [--new-tokens 128] [--repeats 3]

- beam search, 4 beams: tokens/s (generated tokens of all beams) against transformers'
  ``generate(num_beams=4)`` on the same GGUF (dequantized to f32 by transformers) and prompt;
- best-of-16 and self-consistency@16: aggregate generated tokens/s against one greedy row;
- MCTS and Tree-of-Thought: the share of wall time spent outside forward passes.
Each figure is the best of ``--repeats`` runs. Name the CPU beside the figures (lscpu) and run it
with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import time

import peftscale as ps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.new_tokens
    path = ps.models.smollm2_135m_instruct()
    eng = ps.Engine.load(path)
    prompt = eng.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}])
    ids = eng.tokenizer.encode(prompt)

    def timed(strategy: ps.Strategy, **kw: object) -> tuple[float, ps.GenerationOutput]:
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = eng.generate(ids, max_new_tokens=n, strategy=strategy, **kw)
            s = time.perf_counter() - t
            if best is None or s < best[0]:
                best = (s, out)
        assert best is not None
        return best

    timed(ps.Greedy())  # warm-up
    greedy_s, greedy = timed(ps.Greedy(), ignore_eos=True)
    greedy_tps = len(greedy.token_ids) / greedy_s
    print(f"greedy: {greedy_tps:.1f} tokens/s")

    beam_s, beam = timed(ps.BeamSearch(num_beams=4), ignore_eos=True)
    beam_tokens = 4 * (beam.stats.forward_passes - 1) + 4
    beam_tps = beam_tokens / beam_s
    print(f"peftscale beam 4: {beam_tps:.1f} tokens/s ({beam_s:.2f} s, {beam.stats.forward_passes} passes)")

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf_s = float("inf")
    with torch.no_grad():
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.generate(
                torch.tensor([ids]), num_beams=4, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=2
            )
            hf_s = min(hf_s, time.perf_counter() - t)
    hf_tps = 4 * n / hf_s
    print(f"transformers beam 4: {hf_tps:.1f} tokens/s ({hf_s:.2f} s); ratio {beam_tps / hf_tps:.1f}x")

    sampling = ps.Sampling(temperature=0.7, seed=0)
    for name, strategy in [
        ("best-of-16", ps.BestOfN(n=16, sampling=sampling)),
        ("self-consistency@16", ps.SelfConsistency(n=16, sampling=sampling)),
    ]:
        s, out = timed(strategy, ignore_eos=True)
        tokens = sum(len(c.token_ids) for c in out.candidates)
        print(f"{name}: {tokens / s:.1f} tokens/s aggregate = {tokens / s / greedy_tps:.2f}x single greedy")

    q = eng.apply_chat_template([{"role": "user", "content": "What is 12 * 7? Think step by step."}])
    for name, strategy in [
        ("MCTS", ps.MCTS(iterations=6, expansions=3, max_step_tokens=24, sampling=sampling)),
        ("Tree-of-Thought", ps.TreeOfThought(proposals=3, breadth=2, depth=3, max_step_tokens=24, sampling=sampling)),
    ]:
        out = eng.generate(q, max_new_tokens=96, strategy=strategy)
        st = out.stats
        outside = 1 - st.forward_seconds / st.seconds
        print(
            f"{name}: {st.seconds:.2f} s, {st.forward_passes} passes, {outside:.1%} of wall time outside forward passes"
        )


if __name__ == "__main__":
    main()
