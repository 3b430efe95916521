"""What an output was trained from: the base model's content hash, recorded by the trainer and
checked by the engine before it applies an adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from peftscale.errors import AdapterError

RECORD = "peftscale.json"
"""The file, in every training output folder, that records its base model, config and losses."""


def content_hash(path: Path) -> str:
    """sha256 of a model's weights: a GGUF file, or a folder's ``config.json`` and weight files."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".gguf")
        )
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def recorded_base_hash(adapter: Path) -> str | None:
    """The base model hash a peftscale training run recorded beside an adapter, if any."""
    try:
        record = json.loads((adapter / RECORD).read_text())
    except (OSError, ValueError):
        return None
    value = record.get("base_model", {}).get("sha256") if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def check_base(adapter: Path, model: Path, model_hash: str) -> None:
    """Raises AdapterError when the adapter's record names a different base than ``model``."""
    recorded = recorded_base_hash(adapter)
    if recorded is not None and recorded != model_hash:
        raise AdapterError(
            f"adapter {adapter} was trained from a different base model than {model} "
            f"(sha256 {recorded[:12]}... recorded in {RECORD}, {model_hash[:12]}... loaded); "
            "load the model it was trained from"
        )
