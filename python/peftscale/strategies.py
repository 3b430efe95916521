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


Strategy = Greedy | Sampling
