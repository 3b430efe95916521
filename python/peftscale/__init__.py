"""peftscale: train small language models cheaply, then make them reason better at test time.

>>> import peftscale as ps
>>> eng = ps.Engine.load(ps.models.smollm2_135m_instruct())          # doctest: +SKIP
>>> eng.generate("The capital of France is", max_new_tokens=8).text  # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from peftscale import models
from peftscale._core import __version__
from peftscale.answers import extract_answer, normalize_answer, vote
from peftscale.engine import Candidate, Engine, GenerationOutput, SearchTree, Stats, Tokenizer, TreeNode
from peftscale.errors import (
    AdapterError,
    CallbackError,
    ChatTemplateError,
    ContextLengthError,
    DeviceError,
    EngineError,
    Interrupted,
    InvalidArgument,
    ModelLoadError,
    NumericalError,
    PeftscaleError,
    TokenizerError,
)
from peftscale.kernels import CpuKernels, cold_top_k, compiled_devices, cpu_kernels, sample_tokens
from peftscale.strategies import (
    DVTS,
    MCTS,
    Adaptive,
    BeamSearch,
    BestOfN,
    CoLD,
    Greedy,
    Sampling,
    SelfConsistency,
    Strategy,
    TreeOfThought,
    Verifier,
    VerifierBeamSearch,
    batched,
)

if TYPE_CHECKING:
    from peftscale import eval, train

__all__ = [
    "DVTS",
    "MCTS",
    "Adaptive",
    "AdapterError",
    "BeamSearch",
    "BestOfN",
    "CallbackError",
    "Candidate",
    "SearchTree",
    "SelfConsistency",
    "TreeNode",
    "TreeOfThought",
    "Verifier",
    "VerifierBeamSearch",
    "ChatTemplateError",
    "CoLD",
    "ContextLengthError",
    "DeviceError",
    "CpuKernels",
    "Engine",
    "EngineError",
    "GenerationOutput",
    "Greedy",
    "Interrupted",
    "InvalidArgument",
    "ModelLoadError",
    "NumericalError",
    "PeftscaleError",
    "Sampling",
    "Stats",
    "Strategy",
    "Tokenizer",
    "TokenizerError",
    "__version__",
    "batched",
    "cold_top_k",
    "compiled_devices",
    "cpu_kernels",
    "extract_answer",
    "normalize_answer",
    "vote",
    "sample_tokens",
    "eval",
    "models",
    "train",
]


def __getattr__(name: str) -> object:
    # The training stack (torch, transformers, peft) and the evaluation load only when asked for.
    if name in ("train", "eval"):
        import importlib

        return importlib.import_module(f"peftscale.{name}")
    raise AttributeError(f"module 'peftscale' has no attribute '{name}'")
