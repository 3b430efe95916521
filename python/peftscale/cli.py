"""The ``peftscale`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peftscale import models
from peftscale.engine import Engine
from peftscale.errors import InvalidArgument, PeftscaleError
from peftscale.strategies import Greedy, Sampling, Strategy

_DEVICE_HELP = "cpu, cuda or cuda:N (a CUDA build: scripts/build-cuda.sh)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: packaged SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "f32", "f16", "bf16"])
    p.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _add_question_args(p: argparse.ArgumentParser, adapter_help: str) -> None:
    """The model, its adapter, and the questions: what ``eval`` and ``label`` both read."""
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: packaged SmolLM2)")
    p.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    p.add_argument("--adapter", default=None, help=adapter_help)
    p.add_argument("--dataset", required=True, help="gsm8k | math500 | game24 | PATH.jsonl")
    p.add_argument("--slice", default=None, help="rows a:b of the data set (default: all)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="where gsm8k/, math500/, game24/ lie (default: the copies shipped with peftscale)",
    )
    p.add_argument("--fields", default=None, help="JSONL field names: question=q,answer=a")


def _engine(args: argparse.Namespace) -> Engine:
    path = args.model or models.smollm2_135m_instruct()
    return Engine.load(path, dtype=args.dtype, device=args.device)


def _strategy(args: argparse.Namespace) -> Strategy:
    if args.temperature == 0.0:
        return Greedy(repetition_penalty=args.repetition_penalty)
    return Sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    eng = _engine(args)
    prompt = args.prompt
    if args.chat:
        prompt = eng.apply_chat_template([{"role": "user", "content": prompt}])
    for piece in eng.stream(prompt, max_new_tokens=args.max_new_tokens, strategy=_strategy(args)):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    eng = _engine(args)
    history: list[dict[str, str]] = []
    print("Chatting with", args.model or "the packaged SmolLM2-135M-Instruct", "(empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        prompt = eng.apply_chat_template(history)
        reply = []
        for piece in eng.stream(prompt, max_new_tokens=args.max_new_tokens, strategy=_strategy(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from peftscale.eval import demo

    try:
        demo.run(args.out, quick=args.quick, data_dir=args.data_dir)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to continue from what is saved in {args.out}", file=sys.stderr)
        return 130
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from peftscale import train
    from peftscale.provenance import RECORD

    path = Path(args.config)
    raw = train.config.read_yaml(path)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise train.ConfigError(f"--set needs KEY=VALUE (e.g. train.max_steps=10), got '{item}'")
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise train.ConfigError(f"--set {key}: '{p}' is not a section")
        node[last] = yaml.safe_load(value)
    if args.command == "prune":
        raw["method"] = "prune"
    config = train.config.build(raw, path.parent)
    try:
        result = train.run(config, resume=args.resume)
    except KeyboardInterrupt:
        checkpoints = sorted(
            (config.output / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1])
        )
        print(f"interrupted: the adapter so far is in {config.output}", file=sys.stderr)
        if checkpoints:
            again = shlex.join(
                ["peftscale", args.command, str(args.config), *(x for s in args.set for x in ("--set", s))]
            )
            print(
                f"trainer state (optimizer, schedule, step) in {checkpoints[-1]}; continue with: {again} --resume",
                file=sys.stderr,
            )
        return 130
    print(
        f"done: {result.steps} steps, held-out loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}; "
        f"outputs in {result.output}"
    )
    record_path = result.output / RECORD
    if os.environ.get("RANK", "0") != "0" or not record_path.is_file():
        return 0  # under torchrun only the first process writes (and reports) the outputs
    record = json.loads(record_path.read_text())
    if "pruning" in record:
        p = record["pruning"]
        print(
            f"parameters {p['parameters_before']:,} -> {p['parameters_after']:,}; held-out perplexity "
            f"{p['perplexity_before']:.2f} before, {p['perplexity_pruned']:.2f} pruned, "
            f"{p['perplexity_recovered']:.2f} recovered"
        )
    if "distillation" in record:
        d = record["distillation"]
        print(f"KL(teacher||student) on held-out rows: {d['kl_before']:.4f} -> {d['kl_after']:.4f}")
    return 0


def _overrides(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``["tot.depth=3", "sc.vote=weighted"]`` -> ``{"tot": {"depth": 3}, "sc": {"vote": "weighted"}}``."""
    import ast

    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        family, dot, field = key.partition(".")
        if not (sep and dot and family and field):
            raise InvalidArgument(f"invalid argument: --set needs FAMILY.FIELD=VALUE (e.g. tot.depth=3), got '{item}'")
        try:
            value: object = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string
        out.setdefault(family, {})[field] = value
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from peftscale import eval as ev

    config = ev.EvalConfig(
        dataset=args.dataset,
        strategies=args.strategies,
        model=args.model,
        device=args.device,
        adapter=args.adapter,
        verifier=args.verifier,
        slice=args.slice,
        data_dir=args.data_dir,
        fields=args.fields,
        shots=args.shots,
        template=args.template,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        group_size=args.group_size,
        seeds=args.seeds,
        cold_alpha=args.cold_alpha,
        cold_beta=args.cold_beta,
        overrides=_overrides(args.set),
    )
    try:
        out = ev.run(config, args.out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: the finished questions are in {args.out}; rerun the command to continue", file=sys.stderr)
        return 130
    print((out / "table.md").read_text(), end="")
    print(f"results, summary and plots in {out}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from peftscale.eval.datasets import load_task, parse_slice
    from peftscale.eval.label import LabelSettings, label_questions

    settings = LabelSettings(
        n=args.n,
        solutions=args.solutions,
        temperature=args.temperature,
        top_k=args.top_k,
        delimiter=args.delimiter.encode().decode("unicode_escape"),
        max_new_tokens=args.max_new_tokens,
        label=args.label,
        seed=args.seed,
    )
    settings.check()
    task = load_task(args.dataset, args.data_dir, args.fields)
    questions = [task.questions[i] for i in parse_slice(args.slice, len(task.questions))]
    eng = Engine.load(args.model or models.smollm2_135m_instruct(), device=args.device)
    adapter = None
    if args.adapter:
        adapter = "policy"
        eng.load_adapter(args.adapter, name=adapter)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        def progress(qs):  # type: ignore[no-untyped-def]
            return tqdm(qs, desc="questions", unit="q")

    try:
        out = label_questions(eng, task, questions, settings, args.out, adapter=adapter, progress=progress)
    except KeyboardInterrupt:
        print(f"interrupted: the finished questions are in {args.out}; rerun the command to continue", file=sys.stderr)
        return 130
    print(f"step labels in {out}")
    return 0


def cmd_score_steps(args: argparse.Namespace) -> int:
    from peftscale.eval.step_quality import quality, read_rows, report, verifier_scores

    rows = read_rows(args.rows)
    if args.batch_size < 1:
        raise InvalidArgument(f"invalid argument: --batch-size must be >= 1, got {args.batch_size}")
    eng = Engine.load(args.model or models.smollm2_135m_instruct(), device=args.device)
    eng.load_verifier(args.verifier)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        def progress(batches):  # type: ignore[no-untyped-def]
            return tqdm(batches, desc="batches", unit="batch")

    q = quality(rows, verifier_scores(eng, rows, batch_size=args.batch_size, progress=progress))
    report(q, args.out, verifier=args.verifier, rows=args.rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftscale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)
    d = sub.add_parser(
        "demo", help="train a LoRA on GSM8K, then compare greedy, CoLD and test-time strategies (about 15 min)"
    )
    d.add_argument("--quick", action="store_true", help="a smaller run of about 3 minutes")
    d.add_argument("--out", default="runs/demo", help="output folder (rerun into it to continue)")
    d.add_argument("--data-dir", default=None, help="where gsm8k/ lies (default: the copies shipped with peftscale)")
    d.set_defaults(func=cmd_demo)
    for name, what in (
        ("train", "train from a YAML config (lora, qlora, full, prune, distill; see examples/)"),
        ("prune", "structured pruning + LoRA recovery: a train config with method: prune"),
    ):
        t = sub.add_parser(name, help=what)
        t.add_argument("config", help="the YAML config")
        t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the output")
        t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key: train.lr=1e-4")
        t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="accuracy against compute of decoding strategies on a data set")
    _add_question_args(e, "a peft LoRA adapter folder (needed by cold and +cold)")
    e.add_argument(
        "--strategies",
        default="greedy",
        help="comma-separated specs: greedy, sample, cold, sc@8, bon@1..16 (powers of two), beam@4, tot@1:5 "
        "(every integer), mcts@16, adaptive@512; with --verifier: bon-w@8, sc-w@8, prm-beam@8, dvts@8; "
        "'+cold' to score with CoLD; 'base:' to run without the adapter",
    )
    e.add_argument(
        "--verifier",
        default=None,
        help="a verifier folder (peftscale train, method prm or orm) for bon-w, sc-w, prm-beam and dvts",
    )
    e.add_argument("--out", required=True, help="output folder (rerun into it to continue an interrupted run)")
    e.add_argument("--shots", type=int, default=0, help="worked examples from the train split before each question")
    e.add_argument("--template", default=None, help="user turn: 'plain', 'cot' or a text with {question}")
    e.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default per data set)")
    e.add_argument("--batch-size", type=int, default=8, help="questions decoded together per call (searches included)")
    e.add_argument(
        "--group-size", type=int, default=16, help="adaptive allocation's window: consecutive questions per call"
    )
    e.add_argument(
        "--seeds", default=None, help="run strategies that sample once per seed (0,1,2); the table shows the spread"
    )
    e.add_argument("--cold-alpha", type=float, default=0.1)
    e.add_argument("--cold-beta", type=float, default=0.5)
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FAMILY.FIELD=VALUE",
        help="a strategy field for every budget of a family: tot.depth=3, sc.vote=weighted, mcts.c_puct=1.5",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    lb = sub.add_parser("label", help="step labels for a verifier from the model's own rollouts (Math-Shepherd)")
    _add_question_args(lb, "a peft LoRA adapter folder for the policy")
    lb.add_argument("--n", type=int, default=8, help="completions sampled from each step prefix")
    lb.add_argument("--solutions", type=int, default=1, help="solutions sampled per question, each labelled")
    lb.add_argument("--temperature", type=float, default=0.8)
    lb.add_argument("--top-k", type=int, default=50)
    lb.add_argument("--delimiter", default="\\n", help="where a solution splits into steps (escapes such as \\n read)")
    lb.add_argument("--max-new-tokens", type=int, default=256)
    lb.add_argument(
        "--label",
        default="soft",
        choices=["soft", "hard", "exact"],
        help="share of right completions, or any; exact: the task's own step oracle (game24), no rollouts",
    )
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("--out", required=True, help="a JSONL file (rerun into it to continue)")
    lb.add_argument("--no-progress", action="store_true", help="no progress bar")
    lb.set_defaults(func=cmd_label)
    sc = sub.add_parser("score-steps", help="a verifier's step AUC and accuracy on held-out stepwise rows")
    sc.add_argument("--verifier", required=True, help="a verifier folder (peftscale train, method prm or orm)")
    sc.add_argument("--rows", required=True, help="stepwise JSONL rows: prompt, completions, labels (and kind)")
    sc.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: packaged SmolLM2)")
    sc.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    sc.add_argument("--batch-size", type=int, default=32, help="rows scored together per call")
    sc.add_argument("--out", default=None, help="write the figures as JSON here too")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.set_defaults(func=cmd_score_steps)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PeftscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
