"""peftscale.eval end to end on the packaged model: records against the engine's own outputs,
per-question compute, resuming, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import peftscale as ps
import pytest
from peftscale.cli import main
from peftscale.eval.datasets import PACKAGED_DATA as DATA
from peftscale.eval.datasets import load_task
from peftscale.eval.prompts import build_prompt
from peftscale.eval.runner import _batchable, _check_adaptive_budgets

pytestmark = pytest.mark.integration

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "30"),
    ("Sara had 20 dollars and spent 8. How many dollars are left?", "12"),
]


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_records_are_the_engines_outputs_graded(smollm2_q: ps.Engine, data: Path, tmp_path: Path) -> None:
    out = ps.eval.run(
        dataset=str(data),
        strategies="greedy,sc@2",
        out=tmp_path / "run",
        max_new_tokens=24,
        batch_size=2,
        engine=smollm2_q,
        progress=False,
    )
    records = _records(out)
    assert [(r["strategy"], r["id"]) for r in records] == [
        (s, f"arith.jsonl:{i}") for s in ("greedy", "sc@2") for i in range(3)
    ]
    task = load_task(str(data))
    prompts = [build_prompt(smollm2_q, task, q) for q in task.questions]
    greedy = [r for r in records if r["strategy"] == "greedy"]
    for r, prompt, q in zip(greedy, prompts, task.questions, strict=True):
        alone = smollm2_q.generate(prompt, max_new_tokens=24)
        assert r["text"] == alone.text
        grade = ps.eval.grade_gsm8k(alone.text, q.gold)
        assert (r["prediction"], r["correct"]) == (grade.prediction, grade.correct)
        assert r["generated_tokens"] == len(alone.token_ids)
    # Questions batched in one call split its compute by their tokens: the shares add up to the call.
    pair = smollm2_q.generate(prompts[:2], max_new_tokens=24)
    assert sum(r["flops"] for r in greedy[:2]) == pytest.approx(pair[0].stats.flops, rel=1e-9)
    assert sum(r["tokens"] for r in greedy[:2]) == pytest.approx(pair[0].stats.tokens_forwarded, abs=1)
    # Searches of several questions share a call too: each answer is its own search's vote, its
    # tokens exactly what that search spent, and the call's FLOPs are split by those tokens.
    sc = [r for r in records if r["strategy"] == "sc@2"]
    strategy = ps.eval.parse_specs("sc@2")[0].strategy
    alone = [smollm2_q.generate(p, max_new_tokens=24, strategy=strategy) for p in prompts]
    assert [r["prediction"] for r in sc] == [o.answer for o in alone]
    assert [r["text"] for r in sc] == [o.text for o in alone]
    assert [r["tokens"] for r in sc] == [o.tokens_spent for o in alone]
    together = smollm2_q.generate(prompts[:2], max_new_tokens=24, strategy=strategy)
    assert sum(r["flops"] for r in sc[:2]) == pytest.approx(together[0].stats.flops, rel=1e-9)
    for r, o in zip(sc, alone, strict=True):
        assert r["flops"] == pytest.approx(o.stats.flops, rel=0.1)  # attention's share varies by length
    summary = json.loads((out / "summary.json").read_text())
    assert [s["strategy"] for s in summary["strategies"]] == ["greedy", "sc@2"]
    assert summary["strategies"][0]["correct"] == sum(r["correct"] for r in greedy)
    assert (out / "table.md").read_text().startswith("| strategy |")


def test_smaller_budgets_read_from_the_largest_run_equal_their_own_runs(
    smollm2_q: ps.Engine, data: Path, tmp_path: Path
) -> None:
    """sc@1..4 and bon@1..4 run 4 samples per question once; sc@1, sc@2 and bon@2 are read from
    their first samples. Each must be exactly what its own run gives."""
    out = ps.eval.run(
        dataset=str(data),
        strategies="sc@1..4,bon@2..4",
        out=tmp_path / "run",
        max_new_tokens=24,
        engine=smollm2_q,
        progress=False,
    )
    records = {(r["strategy"], r["id"]): r for r in _records(out)}
    assert {s for s, _ in records} == {"sc@1", "sc@2", "sc@4", "bon@2", "bon@4"}
    task = load_task(str(data))
    for spec in ps.eval.parse_specs("sc@1..4,bon@2..4"):
        for q in task.questions:
            r = records[(spec.label, q.id)]
            assert (r["shares_samples_of"] is None) == (spec.budget == 4)
            own = smollm2_q.generate(build_prompt(smollm2_q, task, q), max_new_tokens=24, strategy=spec.strategy)
            assert r["text"] == own.text, (spec.label, q.id)
            if spec.family == "sc":
                assert r["prediction"] == own.answer
            else:
                assert r["prediction"] == ps.eval.grade_gsm8k(own.text, q.gold).prediction
            if spec.budget < 4:
                # Its share of the larger run's compute: fewer tokens, same cost per token.
                parent = records[(r["shares_samples_of"], q.id)]
                assert 0 < r["tokens"] <= parent["tokens"]
                assert r["flops"] / r["tokens"] == pytest.approx(parent["flops"] / parent["tokens"], rel=0.05)


def test_an_interrupted_run_continues(smollm2_q: ps.Engine, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[str] = []

    def stop_after_first(record: ps.eval.Record) -> None:
        seen.append(record.id)
        raise KeyboardInterrupt

    kwargs = dict(dataset=str(data), strategies="greedy", max_new_tokens=16, batch_size=1, engine=smollm2_q)
    with pytest.raises(KeyboardInterrupt):
        ps.eval.run(out=out, progress=False, on_record=stop_after_first, **kwargs)
    first = _records(out)
    assert [r["id"] for r in first] == seen == ["arith.jsonl:0"]
    ps.eval.run(out=out, progress=False, on_record=lambda r: seen.append(r.id), **kwargs)
    records = _records(out)
    assert [r["id"] for r in records] == [f"arith.jsonl:{i}" for i in range(3)]
    assert records[0] == first[0]
    assert seen[1:] == ["arith.jsonl:1", "arith.jsonl:2"]  # the finished question did not run again
    with pytest.raises(ps.InvalidArgument, match="different evaluation.*max_new_tokens"):
        ps.eval.run(out=out, progress=False, **{**kwargs, "max_new_tokens": 8})


def test_the_command_line(smollm2_path: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["eval", "--dataset", str(data), "--slice", "0:2", "--strategies", "greedy", "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| greedy | 2 |" in printed
    assert main(["eval", "--dataset", str(data), "--strategies", "cold", "--out", str(out)]) == 1
    assert "needs an adapter" in capsys.readouterr().err


def test_game24_searches_use_the_models_own_judgement(smollm2_q: ps.Engine, tmp_path: Path) -> None:
    """Tree-of-Thought values states and MCTS rewards rollouts with the model's answers to the
    value question; the judge's own generations count in the question's compute."""
    from peftscale.eval import game24

    settings = game24.search_settings(smollm2_q, None)
    assert "{state}" in settings["tot"]["value_template"] and "<|im_start|>" in settings["tot"]["value_template"]
    judge = settings["mcts"]["reward"]
    state = "4 + 8 = 12 (left: 2 12)\n12 * 2 = 24 (left: 24)\nAnswer: (4 + 8) * 2 = 24"
    value = judge("", state)
    # The judge's reward is the mean score of the verdicts the engine gives to its question.
    question = game24.VALUE_QUESTION.replace("{state}", state)
    chat = smollm2_q.apply_chat_template([{"role": "user", "content": question}])
    asked = smollm2_q.generate(
        [chat] * 3,
        max_new_tokens=game24.VALUE_MAX_TOKENS,
        strategy=ps.Sampling(temperature=0.7, seed=0),
        stop=["\n"],
    )
    score = {"sure": 1.0, "likely": 0.5, "impossible": 0.0, None: 0.0}
    assert value == sum(score[game24.verdict(o.text or "")] for o in asked) / 3
    tokens, flops = judge.take_spent()
    assert tokens > 0 and flops > 0 and judge.take_spent() == (0, 0.0)
    # A judge that calls the engine is counted per call: such a search takes one question per call.
    mcts, tot = ps.eval.parse_specs("mcts@2,tot@2", overrides=settings)
    assert not _batchable(mcts) and _batchable(tot)

    out = ps.eval.run(
        dataset="game24",
        data_dir=str(DATA),
        slice="900:901",
        strategies="mcts@2",
        out=tmp_path / "g24",
        engine=smollm2_q,
        progress=False,
    )
    (record,) = _records(out)
    prompt = build_prompt(smollm2_q, load_task("game24", DATA), load_task("game24", DATA).questions[900])
    own = smollm2_q.generate(
        prompt,
        max_new_tokens=192,
        strategy=ps.MCTS(
            iterations=2,
            **{**settings["mcts"], "extract": ps.eval.extract_game24, "sampling": ps.Sampling(temperature=0.7, seed=0)},
        ),
    )
    assert record["text"] == own.text
    assert record["tokens"] > own.tokens_spent  # the judge's calls are counted too
    assert record["correct"] == ps.eval.grade_game24(own.text or "", "4 5 6 10").correct


def test_k_shot_prompts_put_worked_train_examples_first(smollm2_q: ps.Engine) -> None:
    task = load_task("gsm8k", DATA, shots=2)
    assert [s.id for s in task.shots] == ["gsm8k/train:0", "gsm8k/train:1"]
    q = task.questions[200]
    prompt = build_prompt(smollm2_q, task, q)
    messages = [
        {"role": "user", "content": task.shots[0].question},
        {"role": "assistant", "content": task.shots[0].solution.replace("<<48/2=24>>", "").replace("<<48+24=72>>", "")},
        {"role": "user", "content": task.shots[1].question},
    ]
    start = smollm2_q.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt.startswith(start)
    assert "<<" not in prompt  # calculator notes dropped, as in training
    assert prompt.endswith(smollm2_q.apply_chat_template([{"role": "user", "content": q.question}])[-200:])
    assert prompt.count("<|im_start|>user") == 3
    with pytest.raises(ps.InvalidArgument, match="placeholder"):
        build_prompt(smollm2_q, task, q, template="no placeholder")
    assert "Let's think step by step." in build_prompt(smollm2_q, task, q, template="cot")


def test_an_adaptive_budget_below_its_probes_fails_before_the_model_loads(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ps.InvalidArgument, match=r"adaptive@512 .* need 1024: use adaptive@1024"):
        ps.eval.run(dataset=str(data), strategies="greedy,adaptive@512", out=tmp_path / "run", max_new_tokens=256)
    assert not (tmp_path / "run" / "results.jsonl").exists()
    # The same budget pays for two probes.
    specs = ps.eval.parse_specs("adaptive@512", overrides={"adaptive": {"probe": 2}})
    _check_adaptive_budgets(specs, 256)


def test_adaptive_allocates_over_the_same_windows_when_a_run_resumes(
    smollm2_q: ps.Engine, data: Path, tmp_path: Path
) -> None:
    """Windows of two consecutive questions: [0, 1] and [2]. Interrupted after the first record and
    resumed, the run must give the records an uninterrupted run gives (before, the resumed run
    grouped the questions left, [1, 2], and spread the budget over another set)."""
    kwargs = dict(
        dataset=str(data), strategies="adaptive@96", max_new_tokens=16, group_size=2, engine=smollm2_q, progress=False
    )
    whole = _records(ps.eval.run(out=tmp_path / "whole", **kwargs))

    def stop(_record: ps.eval.Record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ps.eval.run(out=tmp_path / "resumed", on_record=stop, **kwargs)
    assert len(_records(tmp_path / "resumed")) == 1
    resumed = _records(ps.eval.run(out=tmp_path / "resumed", **kwargs))
    keep = ("id", "prediction", "text", "tokens", "samples", "samples_correct")
    assert [{k: r[k] for k in keep} for r in resumed] == [{k: r[k] for k in keep} for r in whole]
