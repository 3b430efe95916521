"""Evaluation runs that stay honest across changes, users' own tasks, pass@k and seeds
(issue 31, items 8 and 9)."""

from __future__ import annotations

import itertools
import json
from math import comb
from pathlib import Path

import peftscale as ps
import pytest
from peftscale.eval.runner import EvalConfig, _check_run_file
from peftscale.eval.stats import pass_at_k

# ------------------------------------------------------------------ item 8: what a run depends on


class Verifier:
    """A scorer whose verdicts depend on an adapter folder and a threshold."""

    def __init__(self, adapter: Path, threshold: float = 0.5) -> None:
        self.adapter, self.threshold = adapter, threshold

    def __call__(self, prompt: str, completion: str) -> float:
        return 0.0

    def peftscale_fingerprint(self) -> str:
        return ps.eval.fingerprint(self.adapter, self.threshold)


class Anonymous:
    def __call__(self, prompt: str, completion: str) -> float:
        return 0.0


def _config(**kw: object) -> EvalConfig:
    return EvalConfig(dataset="gsm8k", strategies="bon@2", **kw)  # type: ignore[arg-type]


def test_a_changed_adapter_behind_a_scorer_refuses_the_rerun(tmp_path: Path) -> None:
    adapter = tmp_path / "verifier"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    config = _config(overrides={"bon": {"scorer": Verifier(adapter)}})
    out = tmp_path / "run"
    out.mkdir()
    _check_run_file(out, config)
    _check_run_file(out, _config(overrides={"bon": {"scorer": Verifier(adapter)}}))  # unchanged: resumes
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(ps.InvalidArgument, match="different evaluation.*overrides"):
        _check_run_file(out, _config(overrides={"bon": {"scorer": Verifier(adapter)}}))
    with pytest.raises(ps.InvalidArgument, match="different evaluation"):
        _check_run_file(out, _config(overrides={"bon": {"scorer": Verifier(adapter, threshold=0.9)}}))


def test_the_evaluated_adapter_is_recorded_by_content(tmp_path: Path) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"A")
    out = tmp_path / "run"
    out.mkdir()
    _check_run_file(out, _config(adapter=str(adapter)))
    assert json.loads((out / "run.json").read_text())["adapter_sha256"] == ps.eval.fingerprint(adapter)
    _check_run_file(out, _config(adapter=str(adapter)))
    (adapter / "adapter_model.safetensors").write_bytes(b"B")  # retrained in place
    with pytest.raises(ps.InvalidArgument, match="adapter_sha256"):
        _check_run_file(out, _config(adapter=str(adapter)))


def test_a_callable_that_cannot_be_identified_refuses_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    _check_run_file(out, _config(overrides={"bon": {"scorer": Anonymous()}}))  # a first run is fine
    with pytest.raises(ps.InvalidArgument, match="Anonymous.*peftscale_fingerprint"):
        _check_run_file(out, _config(overrides={"bon": {"scorer": Anonymous()}}))

    # A plain function is identified by its code: the same function resumes, another refuses.
    def length(prompt: str, completion: str) -> float:
        return float(len(completion))

    def shortness(prompt: str, completion: str) -> float:
        return -float(len(completion))

    fn_out = tmp_path / "fn"
    fn_out.mkdir()
    _check_run_file(fn_out, _config(overrides={"bon": {"scorer": length}}))
    _check_run_file(fn_out, _config(overrides={"bon": {"scorer": length}}))
    shortness.__qualname__ = length.__qualname__  # same name, other code
    with pytest.raises(ps.InvalidArgument, match="different evaluation"):
        _check_run_file(fn_out, _config(overrides={"bon": {"scorer": shortness}}))


# ------------------------------------------------------------------ item 9: pass@k


def test_pass_at_k_matches_the_closed_form_and_enumeration() -> None:
    for n, c, k in [(5, 2, 1), (5, 2, 2), (5, 2, 3), (8, 0, 4), (8, 8, 1), (10, 3, 10), (6, 1, 5)]:
        closed = 1 - comb(n - c, k) / comb(n, k)
        # Every k-subset of n samples of which the first c are right: the share holding one.
        subsets = list(itertools.combinations(range(n), k))
        enumerated = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(enumerated, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


# ------------------------------------------------------------------ item 9: users' own tasks, seeds

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "30"),
]


@pytest.mark.integration
def test_a_user_task_runs_with_its_own_grader_prompt_and_seeds(smollm2_q: ps.Engine, tmp_path: Path) -> None:
    graded: list[tuple[str, str]] = []

    def grader(text: str, gold: str) -> bool:
        graded.append((text, gold))
        return ps.extract_answer(text) == gold

    def prompt(question: str) -> str:
        return f"Answer with a number. {question}"

    task = ps.eval.user_task("arith", QUESTIONS, grader, prompt=prompt)
    out = ps.eval.run(
        dataset=task,
        strategies="greedy,sc@3",
        seeds="0,1",
        out=tmp_path / "run",
        max_new_tokens=24,
        engine=smollm2_q,
        progress=False,
    )
    records = ps.eval.read_records(out)
    assert {r["strategy"] for r in records} == {"greedy", "sc@3", "sc@3#seed1"}
    greedy = [r for r in records if r["strategy"] == "greedy"]
    for r, (question, gold) in zip(greedy, QUESTIONS, strict=True):
        chat = smollm2_q.apply_chat_template([{"role": "user", "content": prompt(question)}])
        alone = smollm2_q.generate(chat, max_new_tokens=24)
        assert r["text"] == alone.text
        assert r["correct"] == (ps.extract_answer(alone.text or "") == gold)
    assert graded, "the user's grader decides"
    # Each seed's samples: pass@k from the grader's verdict on each sample.
    for r in records:
        if r["strategy"].startswith("sc@3"):
            assert r["samples"] == 3 and 0 <= r["samples_correct"] <= 3
    summary = json.loads((out / "summary.json").read_text())
    rows = {s["strategy"]: s for s in summary["strategies"]}
    sc = [r for r in records if r["strategy"] == "sc@3"]
    assert rows["sc@3"]["pass_at_n"] == pytest.approx(sum(r["samples_correct"] > 0 for r in sc) / len(sc))
    assert rows["greedy"]["pass_at_1"] is None
    (spread,) = summary["seeds"]
    accs = [rows["sc@3"]["accuracy"], rows["sc@3#seed1"]["accuracy"]]
    assert spread["strategy"] == "sc@3" and spread["mean"] == pytest.approx(sum(accs) / 2)
    assert "Across seeds" in (out / "table.md").read_text()
    # The same task resumes; a task whose grader changed does not.
    ps.eval.run(
        dataset=task, strategies="greedy", out=tmp_path / "run", max_new_tokens=24, engine=smollm2_q, progress=False
    )

    def other_grader(text: str, gold: str) -> bool:
        return gold in text

    changed = ps.eval.user_task("arith", QUESTIONS, other_grader, prompt=prompt)
    with pytest.raises(ps.InvalidArgument, match="different evaluation.*dataset"):
        ps.eval.run(dataset=changed, strategies="greedy", out=tmp_path / "run", max_new_tokens=24, engine=smollm2_q)
