"""The exceptions peftscale raises. Every one derives from :class:`PeftscaleError`."""

from peftscale._core import (
    ChatTemplateError,
    ContextLengthError,
    EngineError,
    InvalidArgument,
    ModelLoadError,
    NumericalError,
    PeftscaleError,
    TokenizerError,
)

__all__ = [
    "ChatTemplateError",
    "ContextLengthError",
    "EngineError",
    "InvalidArgument",
    "ModelLoadError",
    "NumericalError",
    "PeftscaleError",
    "TokenizerError",
]
