"""Training examples: JSONL rows -> chat messages -> token ids with the loss on the replies only."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from peftscale.train.config import ConfigError, DataConfig

T = TypeVar("T")

IGNORE = -100
"""Label of positions that take no loss (prompt tokens, padding), as torch's cross-entropy expects."""

Messages = list[dict[str, str]]

_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


def without_calculator_notes(text: str) -> str:
    """GSM8K worked steps without the data set's calculator notes (``<<48/2=24>>``)."""
    return _CALCULATOR_NOTE.sub("", text)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    #: ``IGNORE`` on every token that is not part of an assistant reply.
    labels: list[int]


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    #: Rows dropped because truncation left them no reply token.
    dropped: int


def data_file(path: str | Path) -> Path:
    """``path``, or its gzip-compressed copy ``path.gz`` when only that exists (the data sets
    shipped with peftscale are compressed)."""
    path = Path(path)
    packed = path.with_name(path.name + ".gz")
    return packed if not path.exists() and packed.is_file() else path


def read_jsonl(path: str | Path, error: Callable[[str], Exception], limit: int = 0) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (plain, or gzip-compressed as ``*.gz``; ``x.jsonl`` is also
    found as ``x.jsonl.gz``), blank lines skipped, at most ``limit`` (0: all). A line that is not
    a JSON object raises ``error(message)``, the message naming the file and line."""
    rows = []
    path = data_file(path)
    opened = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
    with opened as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            if limit and len(rows) == limit:
                break
    return rows


def read_rows(config: DataConfig) -> list[dict[str, Any]]:
    rows = read_jsonl(config.path, ConfigError, config.limit)
    if not rows:
        raise ConfigError(f"{config.path} holds no rows")
    return rows


def to_messages(row: dict[str, Any], config: DataConfig, where: str) -> Messages:
    """One row as chat messages, in the format the config names."""

    def text(key: str) -> str:
        value = row.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: format '{config.format}' needs a string '{key}', got {value!r}")
        return value

    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    if config.format in ("gsm8k", "prompt_completion"):
        if config.format == "gsm8k":
            # The worked steps without the dataset's calculator notes ("<<48/2=24>>").
            prompt, reply = text("question"), without_calculator_notes(text("answer"))
        else:
            prompt, reply = text("prompt"), text("completion")
        return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: format 'chat' needs a non-empty 'messages' list")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f"{where}: every message needs string 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: no assistant message to learn from")
    return [*system, *({"role": m["role"], "content": m["content"]} for m in messages)]


def tokenize(messages: Messages, tokenizer: Any, max_length: int) -> Example:
    """Token ids of the rendered chat, labelled on each assistant reply and its end-of-turn marker.

    A reply's span is the difference between the chat rendered up to it (with the generation
    prompt) and rendered through it, so whatever the template puts around replies is handled.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
            spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"][:max_length]
    offsets: Sequence[tuple[int, int]] = enc["offset_mapping"][:max_length]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE for tok, (a, _) in zip(ids, offsets, strict=True)]
    return Example(input_ids=ids, labels=labels)


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_examples(config: DataConfig, tokenizer: Any, max_length: int) -> Splits:
    """Every row tokenized, shuffled with the config's seed, with ``eval_rows`` held out."""
    rows = read_rows(config)
    examples = []
    dropped = 0
    for n, row in enumerate(rows, 1):
        ex = tokenize(to_messages(row, config, f"{Path(config.path).name} row {n}"), tokenizer, max_length)
        if all(label == IGNORE for label in ex.labels):
            dropped += 1
        else:
            examples.append(ex)
    train, held_out = hold_out(examples, config, max_length)
    return Splits(train=train, eval=held_out, dropped=dropped)


def hold_out(items: list[T], config: DataConfig, max_length: int) -> tuple[list[T], list[T]]:
    """``items`` shuffled with the config's seed, then split into training rows and ``eval_rows``
    held-out rows (at most half); refuses a split that leaves nothing to train on."""
    items = list(items)
    random.Random(config.seed).shuffle(items)
    held = min(config.eval_rows, len(items) // 2)
    if len(items) == held:
        raise ConfigError(f"no training rows left in {config.path} (limit {config.limit}, max_length {max_length})")
    return items[held:], items[:held]
