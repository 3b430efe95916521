"""The exceptions peftscale raises. Every one derives from :class:`PeftscaleError`."""

from peftscale._core import (
    AdapterError,
    CallbackError,
    ChatTemplateError,
    ContextLengthError,
    DeviceError,
    EngineError,
    InvalidArgument,
    ModelLoadError,
    NumericalError,
    PeftscaleError,
    TokenizerError,
)

__all__ = [
    "AdapterError",
    "CallbackError",
    "ChatTemplateError",
    "ContextLengthError",
    "DeviceError",
    "EngineError",
    "InvalidArgument",
    "ModelLoadError",
    "NumericalError",
    "PeftscaleError",
    "TokenizerError",
]
