"""Strategy specs on the command line: ``greedy,cold,sc@8,bon@1..16,beam@4,tot,mcts,adaptive``.

Grammar of one spec: ``[base:]NAME[@BUDGETS][+cold]``.

- ``NAME``: ``greedy``, ``sample``, ``cold``, ``sc`` (self-consistency), ``bon`` (best-of-N),
  ``beam``, ``tot`` (Tree-of-Thought, BFS), ``mcts`` or ``adaptive``; with a verifier
  (``--verifier``): ``bon-w`` (best-of-N ranked by the verifier), ``sc-w`` (votes weighted by
  the verifier: search-and-learn's weighted best-of-N), ``prm-beam`` (PRM-guided beam search)
  and ``dvts`` (diverse verifier tree search).
- ``BUDGETS``: one number (``sc@8``), the powers of two from a to b (``sc@1..16`` = 1, 2, 4, 8,
  16), every integer from a to b (``tot@1:5``). The budget is ``n`` for ``sc``, ``bon``,
  ``sc-w``, ``bon-w``, ``prm-beam`` and ``dvts`` (samples per step, ``beam_width`` 4 or ``n`` if
  smaller), ``num_beams`` for ``beam``, ``breadth`` for ``tot``, ``iterations`` for ``mcts`` and
  the mean generated tokens per question for ``adaptive``. With a verifier, ``tot`` values its
  states and ``mcts`` rewards its rollouts by it.
- ``+cold``: the strategy scores tokens with CoLD (needs an adapter).
- ``base:``: run without the adapter (``base:greedy`` beside ``greedy`` compares the two).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peftscale.errors import InvalidArgument
from peftscale.strategies import (
    DVTS,
    MCTS,
    Adaptive,
    BeamSearch,
    BestOfN,
    CoLD,
    Extract,
    Greedy,
    Sampling,
    SelfConsistency,
    Strategy,
    TreeOfThought,
    Verifier,
    VerifierBeamSearch,
)

__all__ = ["FAMILIES", "VERIFIER", "Spec", "parse_seeds", "parse_specs"]

FAMILIES = (
    "greedy",
    "sample",
    "cold",
    "sc",
    "bon",
    "beam",
    "tot",
    "mcts",
    "adaptive",
    "bon-w",
    "sc-w",
    "prm-beam",
    "dvts",
)
#: The strategies that need a verifier.
VERIFIED = ("bon-w", "sc-w", "prm-beam", "dvts")
#: The name an evaluation's verifier is loaded under.
VERIFIER = "eval-verifier"
_NO_BUDGET = ("greedy", "sample", "cold")
_DEFAULT_BUDGET = {
    "sc": 8,
    "bon": 8,
    "beam": 4,
    "tot": 3,
    "mcts": 16,
    "adaptive": 1024,
    "bon-w": 8,
    "sc-w": 8,
    "prm-beam": 8,
    "dvts": 8,
}
_SAMPLING = Sampling(temperature=0.7, seed=0)


@dataclass(frozen=True)
class Spec:
    """One strategy at one budget, ready to run."""

    #: How results name it: ``"sc@8"``, ``"sc@8+cold"``, ``"base:greedy"``.
    label: str
    #: The curve it belongs to in the plots: ``"sc"``, ``"sc+cold"``, ``"base:greedy"``.
    family: str
    budget: int | None
    strategy: Strategy
    #: Whether the run's adapter is used.
    uses_adapter: bool
    #: Adaptive allocation spreads ``budget`` tokens per question over a whole group of
    #: questions in one call; the others take one question per call (or a batch of them).
    per_group: bool = False
    #: For a smaller budget of a self-consistency or best-of-N sweep: the label of the sweep's
    #: largest budget, whose first ``budget`` samples are exactly the ones this budget would
    #: draw (sample ``i`` is seeded by ``(seed, i)`` whatever ``n`` is). Its result is read from
    #: that run instead of sampling again.
    shares_samples_of: str | None = None


def _budgets(text: str, spec: str) -> list[int]:
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split(".."))
            if lo < 1 or hi < lo:
                raise ValueError
            out, n = [], 1
            while n <= hi:
                if n >= lo:
                    out.append(n)
                n *= 2
            if not out:
                raise ValueError
            return out
        if ":" in text:
            lo, hi = (int(x) for x in text.split(":"))
            if lo < 1 or hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        n = int(text)
        if n < 1:
            raise ValueError
        return [n]
    except ValueError:
        raise InvalidArgument(
            f"invalid argument: budget in '{spec}' must be N, A..B (powers of two) or A:B (every integer), all >= 1"
        ) from None


def _build(
    name: str,
    budget: int | None,
    cold: CoLD | None,
    settings: CoLD,
    extract: Extract,
    overrides: Mapping[str, Mapping[str, Any]],
    has_verifier: bool = False,
) -> Strategy:
    extra = dict(overrides.get(name, {}))
    verifier = Verifier(VERIFIER)
    if has_verifier and name == "tot":
        # With a verifier, Tree-of-Thought values its states by it and MCTS rewards by it.
        extra = {"evaluator": verifier, **extra}
    if has_verifier and name == "mcts":
        extra = {"reward": verifier, **extra}
    if name == "greedy":
        return Greedy(**extra)
    if name == "sample":
        return dataclasses.replace(_SAMPLING, **extra)
    if name == "cold":
        return dataclasses.replace(settings, **extra)
    assert budget is not None
    # The spec's defaults, then the overrides on top (an override may replace any of them).
    if name == "sc":
        return SelfConsistency(**{"n": budget, "sampling": _SAMPLING, "extract": extract, "scorer": cold, **extra})
    if name == "bon":
        return BestOfN(**{"n": budget, "sampling": _SAMPLING, "scorer": cold or "mean_logprob", **extra})
    if name == "beam":
        return BeamSearch(**{"num_beams": budget, "scorer": cold, **extra})
    if name == "tot":
        return TreeOfThought(**{"breadth": budget, "sampling": _SAMPLING, "scorer": cold, **extra})
    if name == "mcts":
        return MCTS(**{"iterations": budget, "extract": extract, "sampling": _SAMPLING, "scorer": cold, **extra})
    if name == "adaptive":
        # budget_tokens is set per group by the runner (budget x the group's questions).
        return Adaptive(**{"sampling": _SAMPLING, "extract": extract, "scorer": cold, **extra})
    if name == "bon-w":
        return BestOfN(**{"n": budget, "sampling": _SAMPLING, "scorer": verifier, **extra})
    if name == "sc-w":
        fields = {"n": budget, "sampling": _SAMPLING, "extract": extract, "vote": "weighted", "scorer": verifier}
        return SelfConsistency(**{**fields, **extra})
    if name in ("prm-beam", "dvts"):
        kind = DVTS if name == "dvts" else VerifierBeamSearch
        fields = {"n": budget, "beam_width": min(4, budget), "sampling": _SAMPLING, "extract": extract}
        return kind(**{**fields, "verifier": verifier, **extra})
    raise AssertionError(name)


def _samples(strategy: Strategy) -> bool:
    """Whether the strategy draws at random (its results change with the seed)."""
    if isinstance(strategy, Sampling):
        return strategy.temperature > 0
    sampling = getattr(strategy, "sampling", None)
    return isinstance(sampling, Sampling) and sampling.temperature > 0


def _reseeded(strategy: Strategy, seed: int) -> Strategy:
    """``strategy`` drawing from ``seed`` instead of its own seed (0 keeps it as it is)."""
    if not seed:
        return strategy
    if isinstance(strategy, Sampling):
        return dataclasses.replace(strategy, seed=seed)
    return dataclasses.replace(strategy, sampling=dataclasses.replace(strategy.sampling, seed=seed))  # type: ignore[arg-type, attr-defined]


def parse_seeds(text: str | Sequence[int] | None) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``None``: just seed 0); each seed a whole number >= 0, once."""
    if text is None:
        return [0]
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        seeds = [int(x) for x in items if str(x).strip()]
    except ValueError:
        raise InvalidArgument(f"invalid argument: seeds must look like '0,1,2', got '{text}'") from None
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise InvalidArgument(f"invalid argument: seeds must be distinct whole numbers >= 0, got '{text}'")
    return seeds


def _nests(name: str, strategy: Strategy) -> bool:
    """Whether smaller budgets can be read from the largest one's samples: self-consistency
    without early stopping (its votes then depend only on the samples) and best-of-N ranked by
    log-probabilities."""
    if name in ("sc", "sc-w"):
        return (
            isinstance(strategy, SelfConsistency)
            and strategy.stop_when_confident is None
            and not callable(strategy.scorer)
        )
    if name == "bon-w":
        # Each sample's verifier score is its own, whatever n is.
        return isinstance(strategy, BestOfN) and isinstance(strategy.scorer, Verifier)
    if name == "bon":
        return isinstance(strategy, BestOfN) and (
            isinstance(strategy.scorer, CoLD) or strategy.scorer in ("mean_logprob", "sum_logprob")
        )
    return False


def parse_specs(
    text: str,
    *,
    extract: Extract = "last_number",
    cold: CoLD | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    has_adapter: bool = False,
    has_verifier: bool = False,
    seeds: Sequence[int] = (0,),
) -> list[Spec]:
    """Every strategy and budget ``text`` names, in order, duplicates removed; strategies that
    sample run once per seed of ``seeds`` (a seed other than 0 labelled ``sc@8#seed1``).

    ``extract`` is the task's answer extractor (for votes and MCTS rewards); ``cold`` the CoLD
    settings that ``cold`` and ``+cold`` use (default ``CoLD()``); ``overrides`` per-family
    keyword arguments for the strategy dataclasses (``{"tot": {"generate": "propose"}}``).
    """
    overrides = overrides or {}
    unknown = set(overrides) - set(FAMILIES)
    if unknown:
        raise InvalidArgument(f"invalid argument: overrides for unknown strategies {sorted(unknown)}")
    specs: list[Spec] = []
    seen: set[str] = set()
    for raw in (s.strip() for s in text.split(",")):
        if not raw:
            continue
        base = raw.startswith("base:")
        body = raw.removeprefix("base:")
        body, plus, scorer = body.partition("+")
        if plus and scorer != "cold":
            raise InvalidArgument(f"invalid argument: '{raw}': the only scorer suffix is '+cold'")
        name, at, budget_text = body.partition("@")
        if name not in FAMILIES:
            known = ", ".join(FAMILIES)
            raise InvalidArgument(f"invalid argument: unknown strategy '{name}' in '{raw}' (known: {known})")
        if name in _NO_BUDGET and at:
            raise InvalidArgument(f"invalid argument: '{name}' takes no budget ('{raw}')")
        if plus and name in _NO_BUDGET:
            raise InvalidArgument(f"invalid argument: '{raw}': use 'cold' for CoLD decoding on its own")
        uses_cold = bool(plus) or name == "cold"
        if uses_cold and base:
            raise InvalidArgument(f"invalid argument: '{raw}': CoLD needs the adapter, not base:")
        if uses_cold and not has_adapter:
            raise InvalidArgument(f"invalid argument: '{raw}' uses CoLD, which needs an adapter (--adapter)")
        if name in VERIFIED and not has_verifier:
            raise InvalidArgument(f"invalid argument: '{raw}' needs a verifier (--verifier PATH)")
        if name in VERIFIED and plus:
            raise InvalidArgument(f"invalid argument: '{raw}': the verifier strategies do not take '+cold'")
        budgets: list[int | None] = (
            [None] if name in _NO_BUDGET else list(_budgets(budget_text, raw) if at else [_DEFAULT_BUDGET[name]])
        )
        family = ("base:" if base else "") + name + ("+cold" if plus else "")
        largest = f"{'base:' if base else ''}{name}@{max(b or 0 for b in budgets)}{'+cold' if plus else ''}"
        for b in budgets:
            label = family if b is None else f"{'base:' if base else ''}{name}@{b}{'+cold' if plus else ''}"
            if label in seen:
                continue
            seen.add(label)
            settings = cold or CoLD()
            try:
                strategy = _build(name, b, settings if plus else None, settings, extract, overrides, has_verifier)
            except TypeError as e:
                msg = f"invalid argument: a setting for {name!r} is not one of its fields ({e})"
                raise InvalidArgument(msg) from None
            for seed in seeds if _samples(strategy) else (0,):
                suffix = f"#seed{seed}" if seed else ""
                specs.append(
                    Spec(
                        label=label + suffix,
                        family=family,
                        budget=b,
                        strategy=_reseeded(strategy, seed),
                        uses_adapter=has_adapter and not base,
                        per_group=name == "adaptive",
                        shares_samples_of=largest + suffix if _nests(name, strategy) and label != largest else None,
                    )
                )
    if not specs:
        raise InvalidArgument("invalid argument: no strategies given (e.g. 'greedy,sc@8')")
    return specs
