"""Decoding strategies: small frozen dataclasses converted once to their Rust twins.

Parameter names follow transformers' ``generate``. Values are validated by the engine, which
raises :class:`peftscale.InvalidArgument` naming the bad parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from peftscale.errors import InvalidArgument


def _non_negative(name: str, value: int) -> int:
    # Checked here: the engine takes these as unsigned integers, so a negative one would fail
    # in the conversion with a less readable message.
    if value < 0:
        raise InvalidArgument(f"invalid argument: {name} must be >= 0, got {value}")
    return int(value)


@dataclass(frozen=True)
class Greedy:
    """Pick the most likely token at every step."""

    repetition_penalty: float = 1.0

    def _core_kwargs(self) -> dict[str, Any]:
        return {
            "temperature": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "repetition_penalty": float(self.repetition_penalty),
            "seed": 0,
        }


@dataclass(frozen=True)
class Sampling:
    """Sample from the model's distribution after temperature, top-k, top-p and min-p.

    The same ``seed`` gives the same output for the same prompts, whatever the thread count.
    Row ``i`` of a batch draws from its own generator seeded by ``(seed, i)``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def _core_kwargs(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "top_k": _non_negative("top_k", self.top_k),
            "top_p": float(self.top_p),
            "min_p": float(self.min_p),
            "repetition_penalty": float(self.repetition_penalty),
            "seed": _non_negative("seed", self.seed),
        }


@dataclass(frozen=True)
class CoLD:
    """Contrastive LoRA Decoding (Heisler et al., KDD 2025): contrast the adapter ("expert")
    with its own base model at every step.

    With expert logits ``s_e`` and base logits ``s_b``, tokens below ``alpha`` times the expert's
    best probability are dropped, the rest are scored ``(1 + beta) * s_e - beta * s_b /
    base_temperature``, and the best (or, with ``sample=True``, a draw from
    ``softmax(score / temperature)``) is taken by both rows. ``beta=0`` is greedy decoding with
    the adapter. Needs ``adapter=`` in ``generate``. ``paired=False`` runs base and expert as two
    separate forward passes per step (the naive version, for comparison); the default runs them
    as two rows of one pass, reading the base weights once.
    """

    alpha: float = 0.1
    beta: float = 0.5
    base_temperature: float = 1.0
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    paired: bool = True

    def _core_kwargs(self) -> dict[str, Any]:
        return {
            **Greedy()._core_kwargs(),
            "cold": (
                float(self.alpha),
                float(self.beta),
                float(self.base_temperature),
                bool(self.sample),
                float(self.temperature),
                _non_negative("seed", self.seed),
                bool(self.paired),
            ),
        }


def _sampling_tuple(s: Sampling) -> tuple[float, int, float, float, float, int]:
    k = s._core_kwargs()
    return (k["temperature"], k["top_k"], k["top_p"], k["min_p"], k["repetition_penalty"], k["seed"])


def _cold_tuple(scorer: object) -> tuple[float, float, float, bool, float, int, bool] | None:
    return CoLD._core_kwargs(scorer)["cold"] if isinstance(scorer, CoLD) else None


def _no_effect(strategy: object, field: str, when: str) -> None:
    """Refuses a non-default ``field`` of ``strategy`` that has no effect ``when`` (a parameter is
    honoured or refused, never silently ignored)."""
    default = next(f.default for f in dataclasses.fields(strategy) if f.name == field)  # type: ignore[arg-type]
    value = getattr(strategy, field)
    if value != default:
        raise InvalidArgument(
            f"invalid argument: {type(strategy).__name__}.{field}={value!r} has no effect {when}; "
            "leave it at its default"
        )


def _search(kind: str, token_scorer: object = None, **fields: Any) -> dict[str, Any]:
    return {**Greedy()._core_kwargs(), "search": {"kind": kind, "cold": _cold_tuple(token_scorer), **fields}}


Scorer = Callable[[str, str], float]
"""``(prompt, completion) -> float``, higher is better (a verifier or a reward model)."""

BatchScorer = Callable[[str, list[str]], Sequence[float]]
"""``(prompt, [completion, ...]) -> [score, ...]``: every candidate of a step in one call."""

_B = TypeVar("_B", bound=Callable[..., Any])


def batched(fn: _B) -> _B:
    """Marks ``fn(prompt, completions) -> scores`` as a batched scorer: wherever a strategy takes a
    scorer, evaluator, weight or reward callable, it is then called once per step with every
    candidate of that step (all best-of-N samples, a round of self-consistency, a level of
    Tree-of-Thought, an iteration's MCTS rollouts) instead of once per candidate: a model-based
    verifier in Python batches its own forward pass over them.

    >>> @ps.batched
    ... def lengths(prompt: str, completions: list[str]) -> list[float]:
    ...     return [-len(c) for c in completions]
    >>> eng.generate(q, strategy=ps.BestOfN(n=8, scorer=lengths))  # doctest: +SKIP
    """
    fn.__peftscale_batch__ = True  # type: ignore[attr-defined]
    return fn


Extract = Literal["last_number", "boxed", "choice_letter"] | Callable[[str], "str | None"]

_SEARCH_SAMPLING = Sampling(temperature=0.7)


@dataclass(frozen=True)
class Verifier:
    """A verifier loaded with :meth:`Engine.load_verifier` under ``name``, as a strategy's scorer
    (:class:`BestOfN`), vote weight (:class:`SelfConsistency` with ``vote="weighted"``) or guide
    (:class:`VerifierBeamSearch`, :class:`DVTS`).

    Its rows run in the same forward passes as the samples it scores: the prompt is fed to it
    once, each completion is a fork of that sequence, and a completion's score is its step
    probabilities aggregated as the verifier's config says (``min``, ``prod`` or ``last``).
    """

    name: str = "verifier"

    def _core(self) -> dict[str, str]:
        return {"verifier": self.name}


@dataclass(frozen=True)
class BeamSearch:
    """Beam search with transformers' semantics (``generate(num_beams=..., do_sample=False)``).

    Each step keeps the best ``max(2, 1 + n_eos) * num_beams`` continuations of all beams by
    summed log-probability; a continuation that ends (EOS, ``max_new_tokens``) among the best
    ``num_beams`` becomes a finished hypothesis scored ``sum_logprob / generated_len **
    length_penalty``. ``early_stopping``: ``True`` stops once ``num_beams`` hypotheses are
    finished, ``False`` (default) when the best running beam can no longer beat them at its
    current length, ``"never"`` only when no beam can. ``out`` is the best hypothesis and
    ``out.candidates`` the best ``num_return_sequences`` with transformers' ``sequences_scores``
    as ``score``. ``scorer=CoLD(...)`` ranks tokens by CoLD's contrastive log-scores (needs an
    adapter).
    """

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    scorer: CoLD | None = None

    def _core_kwargs(self) -> dict[str, Any]:
        if self.early_stopping not in (True, False, "never"):
            raise InvalidArgument(
                f"invalid argument: early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        early = "never" if self.early_stopping == "never" else ("true" if self.early_stopping else "false")
        return _search(
            "beam",
            self.scorer,
            num_beams=_non_negative("num_beams", self.num_beams),
            length_penalty=float(self.length_penalty),
            early_stopping=early,
            num_return_sequences=_non_negative("num_return_sequences", self.num_return_sequences),
        )


@dataclass(frozen=True)
class BestOfN:
    """Sample ``n`` completions (the prompt is run once and forked) and return the best.

    ``scorer``: ``"mean_logprob"`` (default), ``"sum_logprob"``, a callable ``(prompt, completion)
    -> float`` (it runs once per candidate after sampling), a loaded :class:`Verifier` (its rows
    share the samples' passes), or ``CoLD(...)``, which
    samples tokens from CoLD's contrastive scores and ranks by their mean log-score. Ties go to
    the candidate sampled first. ``out.candidates`` holds all ``n`` with their ``score``.
    """

    n: int = 8
    sampling: Sampling = _SEARCH_SAMPLING
    scorer: Literal["mean_logprob", "sum_logprob"] | Scorer | CoLD | Verifier = "mean_logprob"

    def _core_kwargs(self) -> dict[str, Any]:
        ranking: Any = "mean_logprob" if isinstance(self.scorer, CoLD) else self.scorer
        if isinstance(ranking, Verifier):
            ranking = ranking._core()
        return _search(
            "best_of_n",
            self.scorer,
            n=_non_negative("n", self.n),
            sampling=_sampling_tuple(self.sampling),
            scorer=ranking,
        )


@dataclass(frozen=True)
class SelfConsistency:
    """Sample ``n`` reasoning paths, extract each answer, vote (Wang et al. 2023).

    ``extract``: ``"last_number"``, ``"boxed"`` (last ``\\boxed{}``), ``"choice_letter"`` (A-J) or a
    callable ``str -> str | None``. ``vote="majority"`` counts answers; ``"weighted"`` weighs each
    path by its mean token probability, by ``scorer(prompt, completion)`` when ``scorer`` is a
    callable, or by a loaded :class:`Verifier`'s score (search-and-learn's weighted best-of-N).
    Ties go to the answer that was sampled first. With ``stop_when_confident=0.95`` it samples
    ``round_size`` paths at a time and stops once Adaptive-Consistency's Beta rule gives
    ``P(p_top > p_second) >= 0.95`` (capped at ``n``). ``out.answer`` is the winner, ``out.votes``
    the tally, ``out`` the first path that gave the winning answer.
    """

    n: int = 8
    sampling: Sampling = _SEARCH_SAMPLING
    extract: Extract = "last_number"
    vote: Literal["majority", "weighted"] = "majority"
    stop_when_confident: float | None = None
    round_size: int = 4
    scorer: Scorer | CoLD | Verifier | None = None

    def _core_kwargs(self) -> dict[str, Any]:
        weight = self.scorer if callable(self.scorer) and not isinstance(self.scorer, CoLD) else None
        verifier = self.scorer._core() if isinstance(self.scorer, Verifier) else None
        if (weight is not None or verifier is not None) and self.vote != "weighted":
            raise InvalidArgument(
                "invalid argument: SelfConsistency.scorer weighs the votes only with vote='weighted' "
                f"(vote={self.vote!r} counts each answer once)"
            )
        if self.stop_when_confident is None:
            _no_effect(self, "round_size", "without stop_when_confident (all n samples run as one round)")
        return _search(
            "self_consistency",
            self.scorer,
            n=_non_negative("n", self.n),
            sampling=_sampling_tuple(self.sampling),
            extract=self.extract,
            vote=self.vote,
            weight=weight,
            verifier=verifier,
            stop_when_confident=None if self.stop_when_confident is None else float(self.stop_when_confident),
            round_size=_non_negative("round_size", self.round_size),
        )


@dataclass(frozen=True)
class VerifierBeamSearch:
    """Step-level beam search guided by a process reward model, as search-and-learn runs it.

    Each step samples ``n`` next steps (text up to ``step_delimiter``; default: the verifier's
    own step tag) from the kept beams, the verifier scores every new step in the next forward
    pass, and the best ``n // beam_width`` beams (by their aggregated step scores) are each
    sampled ``beam_width`` times at the next step. A beam whose step ends the answer (end of
    sequence, a ``stop`` string, ``max_new_tokens``) is finished; after ``max_steps`` steps every
    beam is. ``out.answer`` is the weighted majority of the finished beams (each weighted by its
    score), ``out`` the best-scored beam with that answer, ``out.candidates`` every finished
    beam, best first. ``subtrees=True`` is DVTS (see :class:`DVTS`).
    """

    n: int = 8
    beam_width: int = 4
    verifier: Verifier = Verifier()
    step_delimiter: str | None = None
    max_steps: int = 16
    max_step_tokens: int = 96
    sampling: Sampling = _SEARCH_SAMPLING
    extract: Extract = "last_number"
    subtrees: bool = False
    scorer: CoLD | None = None

    def _core_kwargs(self) -> dict[str, Any]:
        if not isinstance(self.verifier, Verifier):
            raise InvalidArgument(
                f"invalid argument: verifier must be a peftscale.strategies.Verifier, got {self.verifier!r}"
            )
        return _search(
            "verifier_beam",
            self.scorer,
            n=_non_negative("n", self.n),
            beam_width=_non_negative("beam_width", self.beam_width),
            verifier=self.verifier._core(),
            step_delimiter=self.step_delimiter,
            max_steps=_non_negative("max_steps", self.max_steps),
            max_step_tokens=_non_negative("max_step_tokens", self.max_step_tokens),
            sampling=_sampling_tuple(self.sampling),
            extract=self.extract,
            subtrees=bool(self.subtrees),
        )


@dataclass(frozen=True)
class DVTS(VerifierBeamSearch):
    """Diverse verifier tree search (search-and-learn): the ``n`` samples of a step split into
    ``n // beam_width`` independent subtrees, each keeping only its best-scored sample, so that
    the finished beams explore different solutions rather than variants of one."""

    subtrees: bool = True


PROPOSE_TEMPLATE = "{problem}\nPossible next steps, one per line:\n"
"""The default propose prompt: ``{problem}`` is the prompt, ``{state}`` the steps so far."""

VALUE_TEMPLATE = (
    "Evaluate whether this partial solution can reach a correct answer "
    "(sure / likely / impossible).\nProblem: {problem}\nSteps so far:\n{state}\nJudgement:"
)
"""The default value prompt of the ``"self"`` evaluator."""


@dataclass(frozen=True)
class TreeOfThought:
    """Tree-of-Thought search (Yao et al. 2023) over steps separated by ``step_delimiter``.

    ``generate="sample"`` samples ``proposals`` next steps from each state's own (forked)
    sequence; ``"propose"`` asks the model for several next steps at once with
    ``propose_template`` (one per line). ``evaluator="self"`` asks the model ``value_samples``
    times with ``value_template`` for a one-line reply of at most ``value_max_tokens`` (room for
    reasoning before the verdict) and sums the last sure / likely / impossible of each reply as
    20 / 1 / 0.001, all states of a level in one batch; a callable ``(prompt, state) -> float``
    or a loaded :class:`Verifier` (each state valued by its steps' scores, aggregated as the
    verifier says; its rows share the search's passes) replaces it.
    ``search="bfs"`` keeps the best ``breadth`` states per level for ``depth`` levels;
    ``"dfs"`` follows the best child first and backtracks below ``value_threshold``.
    ``out.tree`` holds every state with its value. ``max_new_tokens`` bounds the whole path; a
    step that ends at EOS or at one of ``generate``'s stop strings ends its path. With
    ``extract`` (as in :class:`SelfConsistency`), ``out.answer`` is the chosen path's answer.
    """

    step_delimiter: str = "\n"
    proposals: int = 3
    breadth: int = 5
    depth: int = 4
    generate: Literal["sample", "propose"] = "sample"
    evaluator: Literal["self"] | Scorer | Verifier = "self"
    value_samples: int = 3
    value_max_tokens: int = 16
    search: Literal["bfs", "dfs"] = "bfs"
    value_threshold: float = 1.0
    max_step_tokens: int = 64
    sampling: Sampling = _SEARCH_SAMPLING
    propose_template: str = PROPOSE_TEMPLATE
    value_template: str = VALUE_TEMPLATE
    scorer: CoLD | None = None
    extract: Extract | None = None

    def _core_kwargs(self) -> dict[str, Any]:
        if self.generate != "propose":
            _no_effect(self, "propose_template", "with generate='sample'")
        if self.evaluator != "self":
            for field in ("value_samples", "value_max_tokens", "value_template"):
                _no_effect(self, field, "with a callable evaluator")
        if self.search != "dfs":
            _no_effect(self, "value_threshold", "with search='bfs' (only depth-first search backtracks)")
        return _search(
            "tot",
            self.scorer,
            step_delimiter=self.step_delimiter,
            proposals=_non_negative("proposals", self.proposals),
            breadth=_non_negative("breadth", self.breadth),
            depth=_non_negative("depth", self.depth),
            generate=self.generate,
            evaluator=self.evaluator._core() if isinstance(self.evaluator, Verifier) else self.evaluator,
            value_samples=_non_negative("value_samples", self.value_samples),
            value_max_tokens=_non_negative("value_max_tokens", self.value_max_tokens),
            search=self.search,
            value_threshold=float(self.value_threshold),
            max_step_tokens=_non_negative("max_step_tokens", self.max_step_tokens),
            sampling=_sampling_tuple(self.sampling),
            propose_template=self.propose_template,
            value_template=self.value_template,
            extract=self.extract,
        )


@dataclass(frozen=True)
class MCTS:
    """Monte Carlo Tree Search over reasoning steps (separated by ``step_delimiter``).

    Each iteration selects a leaf by PUCT (prior: the step's mean token probability, normalised
    over its siblings), samples ``expansions`` next steps from its forked sequence, evaluates
    each new step by a ``rollout`` to an answer scored by ``reward`` (``"self_consistency"``: the
    share of all rollouts so far with the same extracted answer; a callable ``(prompt,
    text) -> float``; or a loaded :class:`Verifier`, scoring path and rollout in the pass after
    the iteration's last rollout), and back-propagates the mean value. Returns the most visited path
    completed by its rollout, with ``out.tree`` (visits, values, priors per node).
    """

    iterations: int = 32
    expansions: int = 3
    c_puct: float = 1.0
    step_delimiter: str = "\n"
    max_depth: int = 8
    reward: Literal["self_consistency"] | Scorer | Verifier = "self_consistency"
    rollout: Literal["greedy", "sample"] = "greedy"
    extract: Extract = "last_number"
    max_step_tokens: int = 64
    sampling: Sampling = _SEARCH_SAMPLING
    scorer: CoLD | None = None

    def _core_kwargs(self) -> dict[str, Any]:
        return _search(
            "mcts",
            self.scorer,
            iterations=_non_negative("iterations", self.iterations),
            expansions=_non_negative("expansions", self.expansions),
            c_puct=float(self.c_puct),
            step_delimiter=self.step_delimiter,
            max_depth=_non_negative("max_depth", self.max_depth),
            reward=self.reward._core() if isinstance(self.reward, Verifier) else self.reward,
            rollout=self.rollout,
            extract=self.extract,
            max_step_tokens=_non_negative("max_step_tokens", self.max_step_tokens),
            sampling=_sampling_tuple(self.sampling),
        )


@dataclass(frozen=True)
class Adaptive:
    """Difficulty-adaptive compute over a list of prompts (after Snell et al. 2024).

    Spends ``probe`` samples on every question, estimates its difficulty from how much their
    extracted answers disagree, bins the questions by difficulty quantile (``bins``; by value:
    questions whose probes agree equally share a bin and get equal shares, whatever their order),
    and splits the rest of ``budget_tokens`` (generated tokens, probes included) over the
    unsettled ones, harder bins getting more samples (at most ``max_n`` per question). Questions
    whose probes all agree get no more samples than ``min_n`` (probes included; 0: none beyond
    the probes): their answer is taken as settled. Then each question votes.
    ``out.tokens_spent`` is its spend. The allocation is over the prompts of one ``generate``
    call: ``peftscale eval`` passes fixed windows of ``group_size`` consecutive questions.
    """

    budget_tokens: int = 4096
    probe: int = 4
    min_n: int = 0
    max_n: int = 32
    bins: int = 5
    sampling: Sampling = _SEARCH_SAMPLING
    extract: Extract = "last_number"
    scorer: CoLD | None = None

    def _core_kwargs(self) -> dict[str, Any]:
        return _search(
            "adaptive",
            self.scorer,
            budget_tokens=_non_negative("budget_tokens", self.budget_tokens),
            probe=_non_negative("probe", self.probe),
            min_n=_non_negative("min_n", self.min_n),
            max_n=_non_negative("max_n", self.max_n),
            bins=_non_negative("bins", self.bins),
            sampling=_sampling_tuple(self.sampling),
            extract=self.extract,
        )


Strategy = (
    Greedy
    | Sampling
    | CoLD
    | BeamSearch
    | BestOfN
    | SelfConsistency
    | TreeOfThought
    | MCTS
    | Adaptive
    | VerifierBeamSearch
)
