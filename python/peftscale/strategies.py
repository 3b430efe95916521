"""Decoding strategies: small frozen dataclasses converted once to their Rust twins.

Parameter names follow transformers' ``generate``. Values are validated by the engine, which
raises :class:`peftscale.InvalidArgument` naming the bad parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


Strategy = Greedy | Sampling | CoLD
