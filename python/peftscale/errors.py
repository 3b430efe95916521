"""The exceptions peftscale raises. Every one derives from :class:`PeftscaleError`."""

from peftscale._core import (
    AdapterError,
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
    "AdapterError",
    "ChatTemplateError",
    "ContextLengthError",
    "EngineError",
    "InvalidArgument",
    "ModelLoadError",
    "NumericalError",
    "PeftscaleError",
    "TokenizerError",
]
