"""Accuracy against compute: run decoding strategies over a data set and compare them.

>>> import peftscale as ps
>>> ps.eval.run(dataset="gsm8k", slice="200:210", strategies="greedy,sc@1..4",
...             out="runs/eval-demo")                                      # doctest: +SKIP
PosixPath('runs/eval-demo')

The same from the shell::

    peftscale eval --dataset gsm8k --slice 200:500 --adapter runs/gsm8k-lora \\
        --strategies base:greedy,greedy,cold,sc@1..16,bon@1..16,beam@4,tot,mcts,adaptive --out runs/eval

Strategy specs (:mod:`peftscale.eval.specs`): ``greedy``, ``sample``, ``cold``, ``sc@8``
(self-consistency), ``bon@8`` (best-of-N), ``beam@4``, ``tot@3`` (breadth), ``mcts@16``
(iterations), ``adaptive@512`` (tokens per question); ``@1..16`` sweeps powers of two, ``@1:5``
every integer; ``+cold`` scores tokens with CoLD; ``base:`` runs without the adapter.

The output folder holds ``results.jsonl`` (one line per strategy and question: prediction,
correctness, tokens, FLOPs, seconds), ``run.json`` (what produced them), ``summary.json``,
``table.md`` and the plots ``accuracy_flops.png`` / ``accuracy_seconds.png``. Rerunning into the
same folder skips the questions already answered, so an interrupted run continues; it refuses
when what produced them changed (the settings, the adapter's files, or a scorer's
``peftscale_fingerprint()``; see :func:`fingerprint`).
"""

from peftscale.eval.datasets import Question, Task, load_task, user_task
from peftscale.eval.grading import (
    Grade,
    check_game24,
    extract_boxed,
    extract_game24,
    extract_last_number,
    grade_game24,
    grade_gsm8k,
    grade_math,
    normalize_math,
)
from peftscale.eval.report import summarize
from peftscale.eval.runner import EvalConfig, Record, fingerprint, read_records, run
from peftscale.eval.specs import Spec, parse_specs
from peftscale.eval.stats import paired_difference, wilson_interval

__all__ = [
    "EvalConfig",
    "Grade",
    "Question",
    "Record",
    "Spec",
    "Task",
    "check_game24",
    "extract_boxed",
    "extract_game24",
    "extract_last_number",
    "fingerprint",
    "grade_game24",
    "grade_gsm8k",
    "grade_math",
    "load_task",
    "normalize_math",
    "paired_difference",
    "parse_specs",
    "read_records",
    "run",
    "summarize",
    "user_task",
    "wilson_interval",
]
