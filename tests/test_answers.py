"""One answer rule for voting and grading (issue 31, item 1): a table of hand-written replies,
each held to the answer its rule specifies through the extractor the strategies vote with
(``ps.vote``, the code self-consistency runs) and through the graders of ``peftscale.eval``."""

from __future__ import annotations

import re
from pathlib import Path

import peftscale as ps
import pytest
from peftscale.eval import grading

ROOT = Path(__file__).resolve().parent.parent

# (reply, kind, the answer the rule specifies); None: the rule finds no answer.
CASES: list[tuple[str, str, str | None]] = [
    # numbers: separators, signs, decimals, fractions, percentages, units
    ("She pays $1,250 in all.", "last_number", "1250"),
    ("The total is 1,250,000 dollars.", "last_number", "1250000"),
    ("It drops by 7, so the change is -7.", "last_number", "-7"),
    ("Each costs $2.50.", "last_number", "2.5"),
    ("So the answer is 18.00", "last_number", "18"),
    ("x-5", "last_number", "5"),
    ("The result is 10 - 3 = 7", "last_number", "7"),
    ("Between 5-10 apples", "last_number", "10"),
    ("3/4", "last_number", "0.75"),
    ("She ate 2/6 of the pie", "last_number", "1/3"),
    ("answer: -3/4", "last_number", "-0.75"),
    ("The ratio is 7/0", "last_number", "0"),
    ("The pairs are 2,3", "last_number", "3"),
    ("1,2345", "last_number", "2345"),
    ("He has 1,234 apples and 5", "last_number", "5"),
    ("A 50% discount", "last_number", "50"),
    ("It is \u22124 degrees", "last_number", "-4"),
    ("temperature: -0.0", "last_number", "0"),
    ("about .5 liters", "last_number", "0.5"),
    ("Total: 007 items", "last_number", "7"),
    ("The answer is (-3)", "last_number", "-3"),
    ("= -12.50 dollars", "last_number", "-12.5"),
    ("He ran 3 km + 4 km = 7km", "last_number", "7"),
    ("It costs $ 15", "last_number", "15"),
    ("The answer is 4.\n", "last_number", "4"),
    ("12:30 pm", "last_number", "30"),
    ("He was born in 1990 and is 34", "last_number", "34"),
    ("#### 42\nI hope this helps in 2024.", "last_number", "2024"),
    ("3.5 hours, so 210 minutes.", "last_number", "210"),
    ("Water is H2O", "last_number", None),
    ("No number here.", "last_number", None),
    # MATH answers
    (r"so $\boxed{\dfrac{1}{2}}$.", "boxed", "0.5"),
    (r"\boxed{3/4}", "boxed", "0.75"),
    (r"\boxed{0.75}", "boxed", "0.75"),
    (r"\boxed{-\frac{2}{4}}", "boxed", "-0.5"),
    (r"\boxed{\frac{1}{3}}", "boxed", "1/3"),
    (r"\boxed{2.50}", "boxed", "2.5"),
    (r"\fbox{12}", "boxed", "12"),
    (r"The angle is \boxed{90^\circ}", "boxed", "90"),
    (r"\boxed{x = 5}", "boxed", "5"),
    (r"\boxed{12 \text{ cm}}", "boxed", "12"),
    (r"\boxed{\$12.50}", "boxed", "12.5"),
    (r"\boxed{50\%}", "boxed", "50"),
    (r"first \boxed{1} then \boxed{2}", "boxed", "2"),
    (r"\boxed{58,500}", "boxed", "58500"),
    (r"\boxed{-2,1}", "boxed", "-2,1"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", "boxed", r"(3,\frac{\pi}{2})"),
    ("The answer is 42.", "boxed", "42"),
    ("no answer here", "boxed", None),
    # multiple choice
    ("I pick (B), no (C).", "choice_letter", "C"),
    ("The answer is D.", "choice_letter", "D"),
    ("The answer is Dog", "choice_letter", None),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(("reply", "kind", "want"), CASES)
def test_voting_and_grading_read_the_same_answer(reply: str, kind: str, want: str | None) -> None:
    assert ps.extract_answer(reply, kind) == want  # type: ignore[arg-type]
    # The vote self-consistency takes: one reply is one vote for its answer, none abstains.
    assert ps.vote([reply], kind) == ([(want, 1.0)] if want is not None else [])  # type: ignore[arg-type]
    if kind == "last_number":
        graded = grading.grade_gsm8k(reply, want if want is not None else "1")
        assert graded.prediction == want
        assert graded.correct is (want is not None)
    elif kind == "boxed":
        graded = grading.grade_math(reply, want if want is not None else "1")
        assert graded.prediction == want
        assert graded.correct is (want is not None)


def test_equivalent_spellings_are_one_answer_in_a_vote() -> None:
    replies = [r"\boxed{\frac{1}{2}}", r"\boxed{1/2}", r"\boxed{3}", r"\boxed{0.5}", r"\boxed{\dfrac12}"]
    assert ps.vote(replies, "boxed") == [("0.5", 4.0), ("3", 1.0)]
    assert ps.vote(["it is 3/4", "so 0.75", "1"], "last_number") == [("0.75", 2.0), ("1", 1.0)]
    weighted = ps.vote(["1/2", "0.5", "7"], "last_number", weights=[0.2, 0.2, 0.5])
    assert weighted[0] == ("7", 0.5) and weighted[1][0] == "0.5"
    with pytest.raises(ps.InvalidArgument, match="weights"):
        ps.vote(["1"], weights=[1.0, 2.0])
    with pytest.raises(ps.InvalidArgument, match="extract must be"):
        ps.extract_answer("1", "first_number")  # type: ignore[arg-type]


def test_gold_answers_normalise_to_what_replies_extract_to() -> None:
    for gold, reply in [("1,250", "so 1250"), ("18.00", "18"), ("3/4", "0.75")]:
        assert ps.normalize_answer(gold) == ps.extract_answer(reply)
    for gold, reply in [(r"\frac12", r"\boxed{0.5}"), ("90", r"\boxed{90^\circ}")]:
        assert ps.normalize_answer(gold, "boxed") == ps.extract_answer(reply, "boxed")


def test_one_last_number_rule_in_the_code_base() -> None:
    """The rule lives in rust/core/src/search/extract.rs; no Python module reads numbers itself."""
    python = [p for p in (ROOT / "python").rglob("*.py")]
    pattern = re.compile(r"re\.compile\(.*\\d")
    offenders = [str(p) for p in python if "game24" not in p.name and pattern.search(p.read_text())]
    # Game of 24's expression reader is not an answer rule for numbers.
    assert [o for o in offenders if not o.endswith("grading.py")] == []
    grading_src = (ROOT / "python/peftscale/eval/grading.py").read_text()
    assert "_NUMBER" not in grading_src and "def parse_number" not in grading_src
    rust_rules = [p for p in (ROOT / "rust").rglob("*.rs") if "fn last_number" in p.read_text()]
    assert [p.name for p in rust_rules] == ["extract.rs"]
