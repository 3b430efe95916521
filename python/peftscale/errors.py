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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`peftscale.Engine.generate`: still a ``KeyboardInterrupt`` (a program
    that does not catch it stops as before), carrying what the generation had when it was
    stopped: ``outputs`` is what ``generate`` would have returned, every unfinished row with
    ``finish_reason == "interrupted"`` and a search's best of what it finished (self-consistency:
    the vote over the samples that finished)."""

    def __init__(self, outputs: object) -> None:
        super().__init__("generation interrupted; its partial results are in .outputs")
        self.outputs = outputs


__all__ = [
    "AdapterError",
    "CallbackError",
    "ChatTemplateError",
    "ContextLengthError",
    "DeviceError",
    "EngineError",
    "InvalidArgument",
    "Interrupted",
    "ModelLoadError",
    "NumericalError",
    "PeftscaleError",
    "TokenizerError",
]
