"""The policy interface every generation module implements, and the pieces the adapters share.

A policy (:class:`Policy`) samples images with their clean latents, predicts the flow velocity the
learner trains, and moves its trainable tensors in and out (weight sync and checkpoints). Adapters:
:class:`learner.policy.DiffusersPolicy` (SD3 / FLUX pipelines) and the worlds' own (the shapes world's
``ShapesPolicy``). An :class:`Evaluator` scores a policy on held-out prompts (a world supplies one).

Conventions: ``x_t = (1 - t) x0 + t noise`` with ``t`` in (0, 1), velocity target ``noise - x0``;
``x0`` and ``x_t`` are ``[B, C, h, w]`` in the space the denoiser trains in, so per-pixel reward maps
at ``[h, w]`` line up with them. ``version`` counts weight changes (the learner bumps it after each
applied step; :meth:`TrainableState.load_trainable_state` sets it to the publisher's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config names -> dtypes

ADAPTER_NAME = "default"  # the peft adapter name of a LoRA policy

__all__ = ["ADAPTER_NAME", "DTYPES", "Conditioning", "Evaluator", "Policy", "PromptCache", "SampleBatch", "TrainableState", "resolve_device"]


@dataclass
class SampleBatch:
    """What :meth:`Policy.sample` returns: ``images`` uint8 ``[B, H, W, 3]`` and ``x0`` float32
    ``[B, C, h, w]`` (the space the denoiser trains in), both on the CPU, and the weight ``version``
    that produced them."""

    images: torch.Tensor
    x0: torch.Tensor
    version: int = 0


@dataclass
class Conditioning:
    """Frozen text-encoder outputs for a batch of prompts (on the policy's device and dtype)."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@runtime_checkable
class Policy(Protocol):
    """The generation module as the sampler and the learner see it."""

    device: torch.device
    version: int

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None) -> SampleBatch:
        """One image per (prompt, seed); each sample's initial noise comes from ``torch.Generator(seed)``."""

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Frozen text conditioning for ``prompts`` (cached)."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """Predicted velocity at ``x_t`` [B, C, h, w] and ``t`` [B]; differentiable in the trainable tensors."""

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by state-dict key."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters, in the order of :meth:`named_trainable_parameters`."""

    def trainable_state(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, {key: CPU tensor copy})`` of the trainable tensors."""

    def load_trainable_state(self, state: Mapping[str, torch.Tensor], version: int | None = None, *,
                             share: bool = False) -> None:
        """Copy ``state`` into the trainable tensors (names and shapes must match); ``share=True`` lets a
        policy that never writes its weights (a sampler's) use CPU tensors of the right dtype in place."""


@runtime_checkable
class Evaluator(Protocol):
    """Scores a policy on held-out prompts by a judge independent of the reward."""

    def evaluate(self, policy: Policy) -> dict[str, float]:
        """``{"overall": accuracy in [0, 1], <category>: accuracy, ..., "n": images}``."""


class TrainableState:
    """Trainable-state methods shared by the policy adapters; the class sets ``self._params`` (state-dict
    key -> trainable parameter) and ``self.version``."""

    _params: dict[str, torch.nn.Parameter]
    version: int

    @staticmethod
    def collect_trainable(module: torch.nn.Module, lora: bool) -> dict[str, torch.nn.Parameter]:
        """``module``'s parameters that require grad, by state-dict key: ``named_parameters`` names for
        full fine-tuning; for LoRA peft's ``get_peft_model_state_dict`` names (adapter name stripped,
        loadable by diffusers' LoRA loaders with a ``transformer.`` prefix)."""
        from peft import get_peft_model_state_dict

        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not lora:
            return named
        params = {n.replace(f".{ADAPTER_NAME}", ""): p for n, p in named.items()}
        peft_keys = set(get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME))
        if peft_keys != set(params):
            raise RuntimeError(f"LoRA parameter names disagree with peft's state dict: "
                               f"{sorted(peft_keys ^ set(params))[:5]}")
        return params

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by state-dict key (see :meth:`collect_trainable`)."""
        return dict(self._params)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params.values())

    def trainable_state(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, {key: CPU tensor copy})`` of the trainable tensors only."""
        return self.version, {k: p.detach().to("cpu", copy=True) for k, p in self._params.items()}

    @torch.no_grad()
    def load_trainable_state(self, state: Mapping[str, torch.Tensor], version: int | None = None, *,
                             share: bool = False) -> None:
        """Copy ``state`` into the trainable tensors; names and shapes must match exactly.

        ``share=True``: a CPU parameter whose new value is a CPU tensor of its dtype takes that tensor as its
        data instead of a copy (a sampler's zero-copy load of an object-store array, read-only memory that a
        policy used only for sampling never writes); other parameters are copied. Never for a policy that
        trains.

        Raises ``ValueError`` naming the first few missing, unexpected and mis-shaped keys.
        """
        missing = [k for k in self._params if k not in state]
        unexpected = [k for k in state if k not in self._params]
        bad = [f"{k}: got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, "
               f"want {tuple(self._params[k].shape)}"
               for k, v in state.items()
               if k in self._params and (not isinstance(v, torch.Tensor) or v.shape != self._params[k].shape)]
        if missing or unexpected or bad:
            parts = []
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
                if items:
                    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                    parts.append(f"{len(items)} {label}: {items[:5]}{more}")
            raise ValueError("trainable state does not match this policy: " + "; ".join(parts))
        for k, p in self._params.items():
            v = state[k]
            if share and p.device.type == "cpu" and v.device.type == "cpu" and v.dtype == p.dtype:
                p.data = v
            else:
                p.copy_(v)
        if version is not None:
            self.version = int(version)


class PromptCache:
    """``encode`` shared by the policy adapters: text-encoder outputs from a bounded LRU cache keyed by
    prompt text. The class sets ``self._cache`` (an ``OrderedDict``), ``self.cache_size``,
    ``self.cache_hits``, ``self.cache_misses`` and ``self.dtype``, and implements ``_encode_uncached``."""

    _cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]
    cache_size: int
    cache_hits: int
    cache_misses: int
    dtype: torch.dtype

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [B, L, D], pooled [B, P])`` for ``prompts``, straight from the text encoder(s)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text-encoder outputs for ``prompts``, from a bounded LRU cache keyed by prompt text."""
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self.cache_misses += len(missing)
        self.cache_hits += len(prompts) - len(missing)
        if missing:
            embeds, pooled = self._encode_uncached(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (embeds[i].to(self.dtype), pooled[i].to(self.dtype))
        for p in prompts:
            self._cache.move_to_end(p)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > max(self.cache_size, len(set(prompts))):
            self._cache.popitem(last=False)
        return Conditioning(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
