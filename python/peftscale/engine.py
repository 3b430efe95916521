"""The Python face of the Rust engine.

The engine decodes batches of prompts in one forward pass per step, releases the GIL while it
works, and raises typed :mod:`peftscale.errors` exceptions for bad input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from peftscale import _core, provenance
from peftscale.errors import Interrupted, InvalidArgument
from peftscale.strategies import Greedy, Strategy

DType = Literal["auto", "f32", "f16", "bf16"]
Prompt = str | Sequence[int]
Message = Mapping[str, str]


@dataclass(frozen=True)
class Stats:
    """The compute one ``generate`` call spent (shared by every output of the call)."""

    tokens_forwarded: int
    forward_passes: int
    #: Decoding steps (one new token for every active row each); the first also runs the prompts.
    steps: int
    flops: float
    seconds: float
    #: Time to the first new token: the prompts' forward pass and the first decoding step.
    first_token_seconds: float
    #: Time inside the model's forward passes (the rest is scoring, search and callbacks).
    forward_seconds: float = 0.0
    #: Tokens a verifier's rows took from the policy's rows at the layers both compute alike
    #: (counted in ``tokens_forwarded``; ``flops`` counts only the layers they ran).
    trunk_tokens: int = 0

    @property
    def seconds_per_output_token(self) -> float:
        """Mean seconds per decoding step after the first token (TPOT), 0.0 if there was none."""
        later = self.steps - 1
        return (self.seconds - self.first_token_seconds) / later if later > 0 else 0.0


FinishReason = Literal["eos", "stop", "length", "context", "timeout", "interrupted"]


@dataclass(frozen=True)
class Candidate:
    """One continuation a search considered (a beam hypothesis, a best-of-N sample, ...)."""

    text: str | None
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    #: The strategy's score: transformers' ``sequences_scores`` for beams, the scorer's value
    #: for best-of-N, the vote weight for self-consistency.
    score: float
    answer: str | None
    #: A verifier's probability for each step, for strategies guided or ranked by one.
    step_scores: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TreeNode:
    """A node of a Tree-of-Thought or MCTS search tree (node 0 is the prompt)."""

    parent: int | None
    depth: int
    text: str
    token_count: int
    visits: int
    #: MCTS: the mean back-propagated value; Tree-of-Thought: the evaluator's value.
    value: float
    prior: float
    terminal: bool
    rollout_tokens: int
    #: On the returned path (MCTS) or kept by the search (Tree-of-Thought).
    selected: bool


@dataclass(frozen=True)
class SearchTree:
    nodes: list[TreeNode]

    @property
    def max_depth(self) -> int:
        return max((n.depth for n in self.nodes), default=0)

    def children(self, node: int) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.parent == node]


@dataclass(frozen=True)
class GenerationOutput:
    """One generated continuation: the new part only, never the prompt.

    Search strategies add what they considered: ``candidates`` (beam hypotheses, samples),
    ``score``, ``answer`` and ``votes`` (self-consistency, adaptive), ``tree`` (Tree-of-Thought,
    MCTS) and ``tokens_spent`` (this prompt's share of ``stats.tokens_forwarded``).
    """

    text: str | None
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_tokens: int
    stats: Stats
    score: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    answer: str | None = None
    votes: dict[str, float] = field(default_factory=dict)
    tree: SearchTree | None = None
    tokens_spent: int = 0

    @classmethod
    def _from_core(cls, d: dict[str, Any]) -> GenerationOutput:
        tree = d.get("tree")
        return cls(
            text=d["text"],
            token_ids=list(d["token_ids"]),
            logprobs=list(d["logprobs"]),
            finish_reason=d["finish_reason"],
            prompt_tokens=d["prompt_tokens"],
            stats=Stats(**d["stats"]),
            score=d.get("score"),
            candidates=[Candidate(**c) for c in d.get("candidates", [])],
            answer=d.get("answer"),
            votes=dict(d.get("votes", [])),
            tree=None if tree is None else SearchTree([TreeNode(**n) for n in tree["nodes"]]),
            tokens_spent=d.get("tokens_spent", 0),
        )


class Tokenizer:
    """The model's tokenizer (from ``tokenizer.json`` or rebuilt from GGUF metadata)."""

    def __init__(self, core: _core.Engine) -> None:
        self._core = core

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS where the model's tokenizer adds one."""
        return self._core.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._core.decode(_token_ids(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._core.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        return self._core.eos_token_ids


class Engine:
    """A loaded model, ready to decode.

    Load it with :meth:`Engine.load` from a GGUF file or a Hugging Face folder
    (``config.json`` + ``*.safetensors``).
    """

    def __init__(self, core: _core.Engine, path: Path) -> None:
        self._core = core
        self.path = path
        self.tokenizer = Tokenizer(core)
        self._content_hash: str | None = None

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], dtype: DType = "auto", kv_dtype: DType = "auto", device: str = "cpu"
    ) -> Engine:
        """Load a model.

        ``dtype="auto"`` keeps weights as stored: GGUF blocks quantized, F16/BF16 (GGUF tensors or
        safetensors) in two bytes per weight, widened in the CPU kernels' registers, with f32
        activations; ``"f32"``, ``"f16"`` and ``"bf16"`` dequantize or convert every weight to that
        type (``"f16"``/``"bf16"`` also compute in it, through candle). ``PEFTSCALE_MAX_CPU_ISA``
        (``avx512``, ``avx2``, ``portable``) caps the instruction set of the CPU kernels.

        ``kv_dtype`` is the key/value cache's type. ``"auto"`` keeps it in f16 for quantized
        weights (as llama.cpp does: half the cache memory, and wide batches read half the bytes
        in attention; the rounding is far below the weights' own) and in the weights' dtype
        otherwise, so that an f32 model matches its reference exactly. ``"f32"`` or ``"f16"``
        choose it (``"bf16"`` too for f16/bf16 weights).

        ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"ascend"`` or ``"ascend:N"``. A CUDA
        build (``scripts/build-cuda.sh``) runs the model on an NVIDIA GPU through candle, adapters
        unmerged through the BGMV kernel of ``cuda/``; greedy decoding, sampling and greedy CoLD
        choose their tokens on the GPU, and the search strategies run unchanged on the host, each
        step's logits copied back in one transfer. A device the build or machine lacks (and,
        so far, any Ascend NPU for the model) raises :class:`DeviceError` naming what is missing
        (the build's feature, the runtime, the device); an unknown name raises
        :class:`InvalidArgument`.

        >>> eng = ps.Engine.load(ps.models.smollm2_135m_instruct())  # doctest: +SKIP
        >>> eng.kv_dtype                                              # doctest: +SKIP
        'f16'
        """
        p = Path(path)
        return cls(_core.Engine.load(p, dtype, kv_dtype, device), p)

    @property
    def config(self) -> dict[str, Any]:
        """The architecture: vocab size, layers, heads, context length, ..."""
        return self._core.config

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads."""
        return self._core.weight_bytes

    @property
    def kv_dtype(self) -> str:
        """The key/value cache's type: ``"f32"``, ``"f16"`` or ``"bf16"``."""
        return self._core.kv_dtype

    def load_adapter(self, path: str | os.PathLike[str], name: str = "default") -> None:
        """Load a peft LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

        The adapter stays unmerged: rows that name it in ``generate(..., adapter=name)`` or
        ``logits(..., adapter=name)`` get its low-rank update, every other row runs the base model,
        and several adapters can be loaded side by side. Raises :class:`peftscale.AdapterError`
        for adapters the engine cannot apply exactly (DoRA, ``modules_to_save``, embedding or
        head adapters, shapes of another base model, ...), and for an adapter whose peftscale
        training record names a different base model (by content hash) than this one.
        """
        self._check_trained_base(Path(path))
        self._core.load_adapter(Path(path), name)

    def _check_trained_base(self, adapter: Path) -> None:
        if provenance.recorded_base_hash(adapter) is None:
            return
        if self._content_hash is None:
            self._content_hash = provenance.content_hash(self.path)
        provenance.check_base(adapter, self.path, self._content_hash)

    def merge_adapter(self, path: str | os.PathLike[str]) -> None:
        """Merge a peft LoRA adapter folder into the weights, for plain speed.

        Every later call runs the adapted model at the base model's cost (no ``adapter=``
        needed), like peft's ``merge_and_unload``. A float base (``dtype="f32"``, ``"f16"``,
        ``"bf16"``) gets ``W + scale * B @ A``, exact up to its dtype. A quantized base (Q4_0,
        Q4_1, Q8_0) keeps its format: a LoRA update is usually smaller than the format's step,
        so each weight is rounded *stochastically* onto its block's grid, which keeps the update
        on average but adds rounding noise (see ``benches/RESULTS.md`` for the measured cost);
        serve the adapter unmerged (:meth:`load_adapter`) where exact adapter logits matter.
        Other quantized formats raise :class:`peftscale.InvalidArgument`. Merging cannot be
        undone; load the model again for the base weights.

        >>> eng = ps.Engine.load(ps.models.smollm2_135m_instruct(), dtype="f32")  # doctest: +SKIP
        >>> eng.merge_adapter("runs/gsm8k-lora")                     # doctest: +SKIP
        >>> eng.generate("Q: What is 2 plus 3?")                     # doctest: +SKIP
        """
        self._check_trained_base(Path(path))
        self._core.merge_adapter(Path(path))

    @property
    def merged_adapters(self) -> list[Path]:
        """The adapter folders merged into the weights, in order."""
        return list(self._core.merged_adapters)

    def unload_adapter(self, name: str) -> None:
        """Forget a loaded adapter."""
        self._core.unload_adapter(name)

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return self._core.adapter_names

    def load_verifier(self, path: str | os.PathLike[str], name: str = "verifier") -> None:
        """Load a verifier folder (a process or outcome reward model) under ``name``.

        A verifier is what ``peftscale train`` writes for ``method: prm`` or ``orm``: a peft LoRA
        adapter on this base model, ``value_head.safetensors`` (``Linear(hidden, 1)`` over the final
        normed hidden state) and ``verifier.json`` (its kind, step tag and aggregation). Its rows
        run in the same batched forward passes as the policy's, the LM head replaced by the value
        head. Raises :class:`peftscale.AdapterError` for a folder without a head or config, a head
        or record for another base model, and a step tag this tokenizer cannot read back.

        >>> eng.load_verifier("runs/arith-prm")                            # doctest: +SKIP
        >>> eng.score_steps("Mia has 3 apples ...", ["3 + 4 = 7", "The answer is 7."])  # doctest: +SKIP
        [0.91, 0.88]
        """
        self._check_trained_base(Path(path))
        self._core.load_verifier(Path(path), name)

    def unload_verifier(self, name: str) -> None:
        """Forget a loaded verifier."""
        self._core.unload_verifier(name)

    @property
    def verifiers(self) -> list[str]:
        """Names of the loaded verifiers."""
        return self._core.verifier_names

    def verifier_info(self, name: str = "verifier") -> dict[str, str]:
        """A loaded verifier's ``kind`` (``prm``/``orm``), ``step_tag`` and ``aggregation``."""
        kind, tag, aggregation = self._core.verifier_info(name)
        return {"kind": kind, "step_tag": tag, "aggregation": aggregation}

    def score_steps(self, prompt: str, steps: Sequence[str], *, verifier: str = "verifier") -> list[float]:
        """The probability the verifier gives each step of a solution, read as it was trained:
        ``prompt`` as the chat template's user turn, every step followed by the step tag, the head
        read at the token that ends each tag."""
        return self.score_steps_batch([(prompt, steps)], verifier=verifier)[0]

    def score_steps_batch(
        self, items: Sequence[tuple[str, Sequence[str]]], *, verifier: str = "verifier"
    ) -> list[list[float]]:
        """:meth:`score_steps` for many ``(prompt, steps)`` items in shared forward passes."""
        return self._core.score_steps(verifier, [(p, list(steps)) for p, steps in items])

    @overload
    def logits(self, token_ids: Sequence[int], *, adapter: str | None = ...) -> np.ndarray: ...

    @overload
    def logits(
        self, token_ids: Sequence[Sequence[int]], *, adapter: str | None | Sequence[str | None] = ...
    ) -> list[np.ndarray]: ...

    def logits(
        self,
        token_ids: Sequence[int] | Sequence[Sequence[int]],
        *,
        adapter: str | None | Sequence[str | None] = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Logits ``[len, vocab]`` (float32) at every position, from a fresh cache.

        ``token_ids`` is one sequence (returns one array) or a list of sequences (returns a list,
        all computed in one batched forward pass). ``adapter`` names a loaded adapter, ``None``
        for the base model, or gives one per sequence.
        """
        single = len(token_ids) > 0 and not isinstance(token_ids[0], Sequence | np.ndarray)
        seqs = [_token_ids(token_ids)] if single else [_token_ids(s) for s in token_ids]  # type: ignore[arg-type, union-attr]
        names = _per_row(adapter, len(seqs), "sequences")
        out = self._core.logits_batch(seqs, names)
        return out[0] if single else out

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's own chat template."""
        return self._core.apply_chat_template(_messages(messages), add_generation_prompt)

    @overload
    def generate(
        self,
        prompts: str,
        *,
        max_new_tokens: int = ...,
        strategy: Strategy | None = ...,
        stop: Sequence[str] | None = ...,
        ignore_eos: bool = ...,
        adapter: str | None = ...,
        timeout_s: float | None = ...,
    ) -> GenerationOutput: ...

    @overload
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = ...,
        strategy: Strategy | None = ...,
        stop: Sequence[str] | None = ...,
        ignore_eos: bool = ...,
        adapter: str | None | Sequence[str | None] = ...,
        timeout_s: float | None = ...,
    ) -> list[GenerationOutput] | GenerationOutput: ...

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        strategy: Strategy | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        adapter: str | None | Sequence[str | None] = None,
        timeout_s: float | None = None,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Continue one prompt or a batch of prompts.

        ``prompts`` is a string, a list of token ids, or a list of either; a single prompt
        returns one :class:`GenerationOutput`, a list returns a list. All prompts of a call are
        decoded together, one batched forward pass per step. Generation stops at an
        end-of-sequence token, at ``max_new_tokens``, or when the text contains one of ``stop``
        (the text is cut before it; ``token_ids`` keep the token that completed it).
        ``adapter`` names a loaded LoRA adapter for every prompt, or gives one per prompt
        (``None`` for the base model); :class:`peftscale.CoLD` needs one.

        ``timeout_s`` bounds the call's wall time: when it passes, decoding ends at the next step
        and every unfinished row keeps what it produced, with ``finish_reason == "timeout"`` (a
        search cut short returns the best of what it finished: self-consistency votes over the
        samples that finished). Ctrl-C raises :class:`peftscale.Interrupted` (a
        ``KeyboardInterrupt``) within one step, carrying the same partial results in ``.outputs``
        (``finish_reason == "interrupted"``); the engine stays usable.
        """
        ids, single = self._encode_prompts(prompts)
        kwargs = self._kwargs(max_new_tokens, strategy, stop, ignore_eos, timeout_s)
        gen = self._core.start(ids, adapters=_per_row(adapter, len(ids), "prompts"), **kwargs)
        try:
            gen.run()
        except KeyboardInterrupt:
            gen.finish_early("interrupted")
            outs = [GenerationOutput._from_core(d) for d in gen.outputs()]
            raise Interrupted(outs[0] if single else outs) from None
        outs = [GenerationOutput._from_core(d) for d in gen.outputs()]
        return outs[0] if single else outs

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
        strategy: Strategy | None = None,
        stop: Sequence[str] | None = None,
        adapter: str | None = None,
        timeout_s: float | None = None,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Answer one conversation (a list of ``{"role", "content"}``) or a list of them."""
        if isinstance(messages, str) or len(messages) == 0:
            raise InvalidArgument("invalid argument: a chat needs a non-empty list of messages (or of conversations)")
        if isinstance(messages[0], Mapping):
            return self.generate(
                self.apply_chat_template(messages),  # type: ignore[arg-type]
                max_new_tokens=max_new_tokens,
                strategy=strategy,
                stop=stop,
                adapter=adapter,
                timeout_s=timeout_s,
            )
        prompts = [self.apply_chat_template(conv) for conv in messages]  # type: ignore[arg-type]
        return self.generate(
            prompts, max_new_tokens=max_new_tokens, strategy=strategy, stop=stop, adapter=adapter, timeout_s=timeout_s
        )

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        strategy: Strategy | None = None,
        stop: Sequence[str] | None = None,
        adapter: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as it is decoded.

        Search strategies (beam search, best-of-N, ...) only know their answer at the end: they
        yield the chosen text once, when the search is over.
        """
        ids, _ = self._encode_prompts(prompt)
        kwargs = self._kwargs(max_new_tokens, strategy, stop, False, timeout_s)
        gen = self._core.start(ids, adapters=_per_row(adapter, 1, "prompts"), **kwargs)
        streamed = False
        while not gen.done:
            for _row, piece in gen.step():
                if piece:
                    streamed = True
                    yield piece
        if not streamed and "search" in kwargs:
            text = gen.outputs()[0]["text"]
            if text:
                yield text

    def _encode_prompts(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, str) or _is_ids(prompts):
            return [self._encode_one(prompts)], True  # type: ignore[arg-type]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise InvalidArgument("invalid argument: prompts must be a string, token ids, or a non-empty list")
        return [self._encode_one(p) for p in prompts], False

    def _encode_one(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if prompt == "":
                raise InvalidArgument("invalid argument: prompt is empty")
            return self.tokenizer.encode(prompt)
        return _token_ids(prompt)

    @staticmethod
    def _kwargs(
        max_new_tokens: int,
        strategy: Strategy | None,
        stop: Sequence[str] | None,
        ignore_eos: bool,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidArgument(f"invalid argument: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        strategy = strategy if strategy is not None else Greedy()
        if not hasattr(strategy, "_core_kwargs"):
            raise InvalidArgument(f"invalid argument: unknown strategy {strategy!r}")
        if timeout_s is not None and (
            isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 <= timeout_s < float("inf")
        ):
            raise InvalidArgument(f"invalid argument: timeout_s must be a number of seconds >= 0, got {timeout_s!r}")
        return {
            "max_new_tokens": max_new_tokens,
            "stop": list(stop or []),
            "ignore_eos": ignore_eos,
            "timeout_s": None if timeout_s is None else float(timeout_s),
            **strategy._core_kwargs(),
        }


def _per_row(adapter: str | None | Sequence[str | None], rows: int, what: str) -> list[str | None]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * rows
    names = list(adapter)
    if len(names) != rows:
        raise InvalidArgument(f"invalid argument: {len(names)} adapters given for {rows} {what}")
    return names


def _is_ids(x: object) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(t, (int, np.integer)) for t in x)
    )


def _messages(messages: Sequence[Message]) -> list[tuple[str, str]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise InvalidArgument("invalid argument: a chat needs a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidArgument(f"invalid argument: message {i} must be a mapping with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            raise InvalidArgument(
                f"invalid argument: message {i} has a {type(m[bad]).__name__} {bad}; role and content must be strings"
            )
        out.append((role, content))
    return out


def _token_ids(ids: Sequence[int]) -> list[int]:
    """Token ids as non-negative ints (the core checks them against the vocabulary)."""
    if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
        raise InvalidArgument(f"invalid argument: token ids must be a list of integers, got {ids!r}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InvalidArgument(f"invalid argument: token ids must be integers, got {t!r}")
        if t < 0:
            raise InvalidArgument(f"invalid argument: token id {t} is negative")
        out.append(int(t))
    return out
