"""Bagel's understanding module as an in-process judge backend (``judge.backend: bagel``).

The judge runs the understanding path of the *same* Bagel the policy trains: the SigLIP-NaViT tower
reads the generated image, the understanding experts read the request and write the answer, in
Bagel's own layout (:func:`bagel.packing.pack_understanding`: image, request, answer). The scorer actor
builds its own copy from the same source as the policy (``judge.pretrained`` = ``policy.pretrained``,
loaded understanding-only; or the tiny model of the same ``tiny_seed``; the bundle's ``prepare`` step
refuses a mismatch). No weight sync is needed: the policy trains only generation-side tensors and the
understanding path of a Bagel uses none of them (image and text tokens are routed to the
understanding experts), so this copy *is* the policy's understanding module at every version.

Modes (the same protocol as every backend, read by :mod:`rewards.parse`):

- ``text``: greedy decoding (sampling at ``temperature > 0`` from the judge's own seeded generator)
  until ``<|im_end|>`` or ``max_tokens``;
- ``logprob``: the probes of :data:`rewards.judge.PROBE_TREE`, read from the next-token logits after
  the assistant prefix, restricted to the allowed characters and renormalised;
- ``structured``: :class:`rewards.judge_hf.SchemaDecoder`, the in-process schema-directed decoder.

Grounding (``regions.proposer: grounding``) goes through :meth:`rewards.judge.BaseJudge.complete`, so
Bagel's own answer proposes the boxes. Every step re-runs the whole sequence (the package's packed
training forward; its KV-cached inference path needs flash-attn): fine for the tiny model; for the real
checkpoint the OpenAI backend pointed at vLLM serving BAGEL-7B-MoT (its ``BagelForConditionalGeneration``,
understanding only) is the fast path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bagel.backend import resolve_attention
from bagel.model import BagelParts, build_tiny_bagel, load_bagel, understanding_logits, vit_embeddings
from bagel.packing import grid_position_ids, pack_understanding, patchify
from core.config import BagelJudgeConfig
from learner.base import resolve_device
from rewards.judge import BaseJudge, Completion, PreparedImage
from rewards.judge_hf import SchemaDecoder

__all__ = ["BagelJudge", "vit_input", "vit_size"]

log = logging.getLogger("srum.judge.bagel")
MIN_VIT_SIDE = 224  # Bagel's ViT transform: short side at least 224 ...
# ... long side at most patch * vit_max_num_patch_per_side (980 for BAGEL-7B-MoT), sides multiples of the patch


def vit_size(width: int, height: int, patch: int, max_side: int, min_side: int) -> tuple[int, int]:
    """(width, height) for the ViT: scaled so the long side is at most ``max_side`` and the short side at
    least ``min_side`` (the long-side cap wins), each rounded to a multiple of ``patch``."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = max(min(max_side / max(width, height), 1.0), min_side / min(width, height))
    scale = min(scale, max_side / max(width, height))

    def side(v: int) -> int:
        return max(patch, min(max_side // patch * patch, int(round(v * scale / patch)) * patch))

    return side(width), side(height)


def vit_input(image: PreparedImage, patch: int, max_per_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [T, P*P*3] in [-1, 1], position ids [T])`` of one image for the SigLIP-NaViT tower."""
    from PIL import Image

    max_side = patch * max_per_side
    w, h = vit_size(*image.size, patch, max_side, min(MIN_VIT_SIDE, max_side))
    pil = image.pil if image.size == (w, h) else image.pil.resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    pixels = patchify((x - 0.5) / 0.5, patch)[0]
    return pixels, grid_position_ids(h // patch, w // patch, max_per_side)


class _Context:
    """One request: the image's ViT embeddings (computed once) and the request's tokens; answers are
    continued from an assistant prefix. Duck-types the context :class:`SchemaDecoder` drives."""

    def __init__(self, judge: BagelJudge, image: PreparedImage, text: str):
        self.judge = judge
        parts = judge.parts
        patch = int(parts.config.vision_config.patch_size)
        pixels, pos = vit_input(image, patch, int(parts.config.vit_max_num_patch_per_side))
        self.vit = vit_embeddings(parts, pixels.to(judge.device, judge.dtype), pos.to(judge.device),
                                  [pixels.shape[0]])
        self.request = judge.tokenizer.encode(text, add_special_tokens=False)
        if len(self.request) > judge.cfg.max_request_tokens:
            raise ValueError(f"judge request of {len(self.request)} tokens exceeds judge.max_request_tokens "
                             f"({judge.cfg.max_request_tokens})")
        self.prompt_len = pixels.shape[0] + 2 + len(self.request) + 2

    def _ids(self, prefix: str) -> list[int]:
        return self.judge.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []

    def _logits(self, answer: Sequence[int]) -> torch.Tensor:
        packed = pack_understanding(self.vit.shape[0], self.request, answer, self.judge.parts.tokens)
        return understanding_logits(self.judge.parts, packed, self.vit, self.judge.attention)

    @torch.no_grad()
    def next_logprobs(self, prefix: str) -> torch.Tensor:
        """log p(next token | image, request, assistant prefix) over the vocabulary."""
        return torch.log_softmax(self._logits(self._ids(prefix)), dim=-1)

    @torch.no_grad()
    def generate(self, prefix: str, max_new_tokens: int, stop: str = "") -> tuple[str, int]:
        """Continue the answer after ``prefix``: up to ``max_new_tokens`` tokens, ending at ``<|im_end|>`` or
        once any character of ``stop`` appears; returns (new text, tokens generated)."""
        answer = self._ids(prefix)
        start, eos = len(answer), self.judge.parts.tokens.eos
        tok = self.judge.tokenizer
        for _ in range(max(1, max_new_tokens)):
            nxt = self.judge.pick(self._logits(answer))
            if nxt == eos:
                break
            answer.append(nxt)
            if stop and any(c in tok.decode(answer[start:]) for c in stop):
                break
        new = answer[start:]
        return tok.decode(new, skip_special_tokens=True), len(new)


class BagelJudge(BaseJudge):
    """Judge running Bagel's understanding module in this process (see module docstring)."""

    backend = "bagel"

    def __init__(self, cfg: BagelJudgeConfig, parts: BagelParts | None = None):
        super().__init__(cfg)
        self.parts = parts
        self.device = resolve_device(cfg.device)
        self.dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda") \
            else torch.float32
        self.attention = resolve_attention(cfg.attention, self.device)
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._char_ids: dict[str, int] = {}
        self._rng = torch.Generator("cpu").manual_seed(0)
        if parts is not None:
            self._adopt(parts)

    def _adopt(self, parts: BagelParts) -> None:
        """Use ``parts`` (on the judge's device and dtype); its understanding side is frozen already."""
        self.parts = parts.to(self.device, self.dtype)

    @property
    def tokenizer(self) -> Any:
        return self.parts.tokenizer

    def load(self) -> None:
        """Build / load the understanding model once (thread-safe)."""
        with self._load_lock:
            if self.parts is not None:
                return
            if self.cfg.pretrained:
                log.info("loading Bagel understanding from %s on %s", self.cfg.pretrained, self.device)
                self._adopt(load_bagel(self.cfg.pretrained, stage=1))
            else:
                self._adopt(build_tiny_bagel(self.cfg.tiny_seed))

    def pick(self, logits: torch.Tensor) -> int:
        """The next token: greedy at temperature 0, else sampled from the judge's seeded generator."""
        temp = float(self.cfg.temperature)
        if temp <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / temp, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._rng))

    def char_id(self, ch: str) -> int:
        """Token id of the single character ``ch`` (it must be one token)."""
        if ch not in self._char_ids:
            ids = self.tokenizer.encode(ch, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"character {ch!r} is not a single token for this tokenizer ({ids})")
            self._char_ids[ch] = ids[0]
        return self._char_ids[ch]

    async def check_health(self) -> None:
        await asyncio.to_thread(self.load)

    async def _run(self, fn: Any) -> Any:
        def call() -> Any:
            self.load()
            with self._run_lock:
                return fn()

        return await asyncio.to_thread(call)

    async def _chat(self, image: PreparedImage, text: str, max_tokens: int,
                    schema: dict[str, Any] | None = None) -> Completion:
        def work() -> Completion:
            ctx = _Context(self, image, text)
            if schema is None:
                out, n = ctx.generate("", max_tokens)
                return Completion(out, ctx.prompt_len, n)
            dec = SchemaDecoder(ctx, max_tokens)
            dec.value(schema, "")
            return Completion(dec.out, ctx.prompt_len, dec.tokens)

        return await self._run(work)

    async def _next_probs(self, image: PreparedImage, text: str, assistant_prefix: str,
                          chars: Sequence[str]) -> tuple[dict[str, float], Completion, bool]:
        def work() -> tuple[dict[str, float], Completion, bool]:
            ctx = _Context(self, image, text)
            logp = ctx.next_logprobs(assistant_prefix)
            probs = {c: float(torch.exp(logp[self.char_id(c)])) for c in chars}
            return probs, Completion("", ctx.prompt_len, 1), False

        return await self._run(work)

    def _transport_counters(self) -> dict[str, Any]:
        return {"device": str(self.device), "loaded": self.parts is not None,
                "source": None if self.parts is None else self.parts.source}
