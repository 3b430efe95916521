"""Decoding strategies: small frozen dataclasses converted once to their Rust twins.

Parameter names follow transformers' ``generate``. Values are validated by the engine, which
raises :class:`peftscale.InvalidArgument` naming the bad parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
        if self.top_k < 0:
            from peftscale.errors import InvalidArgument

            raise InvalidArgument(f"invalid argument: top_k must be >= 0, got {self.top_k}")
        if self.seed < 0:
            from peftscale.errors import InvalidArgument

            raise InvalidArgument(f"invalid argument: seed must be >= 0, got {self.seed}")
        return {
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            "top_p": float(self.top_p),
            "min_p": float(self.min_p),
            "repetition_penalty": float(self.repetition_penalty),
            "seed": int(self.seed),
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
        if self.seed < 0:
            from peftscale.errors import InvalidArgument

            raise InvalidArgument(f"invalid argument: seed must be >= 0, got {self.seed}")
        return {
            **Greedy()._core_kwargs(),
            "cold": (
                float(self.alpha),
                float(self.beta),
                float(self.base_temperature),
                bool(self.sample),
                float(self.temperature),
                int(self.seed),
                bool(self.paired),
            ),
        }


Strategy = Greedy | Sampling | CoLD
