"""Bagel's generation module behind srum's policy interface (:class:`learner.base.Policy`).

Sampling follows Bagel's own text-to-image inference: each sample's initial noise is a ``[C, h, w]``
latent drawn from ``torch.Generator(seed)``, the Euler schedule runs from t = 1 to 0 over
``num_inference_steps`` steps of a shifted linear schedule (``sample_shift``, Bagel: 3.0), and with
``guidance`` > 1 the text-unconditional branch (the image split alone) is combined as
``v = u + s (c - u)`` while ``lo < t <= hi`` (``cfg_interval``), then renormalised to at most the
conditional velocity's norm (``cfg_renorm_type`` global: over each image's tokens; channel: per token;
the factor is floored at ``cfg_renorm_min``). Bagel's image-CFG branch is the same context as the
conditional one in text-to-image (no input image), so it is not offered: scale ``s_img`` would only
act as a text scale ``1 + s_img (s - 1)``. Bagel's "think" (CoT) mode is not implemented.

``x0`` is the VAE latent ``[B, C, h, w]`` (``h = H / 8``), the grid the reward maps live on; packing
into ``p x p`` latent tokens happens inside :meth:`BagelPolicy.velocity`. Conditioning
(:meth:`BagelPolicy.encode`) is the framed prompt ``[<|im_start|>, prompt, <|im_end|>]`` as input
embeddings of the frozen token table, ``embeds [B, L, D]``, with ``pooled [B, L]`` the mask of real
tokens (Bagel has no pooled text embedding); the text itself runs through the (frozen) understanding
experts inside the shared forward.

Training: the learner trains the conditional velocity (no CFG). Trainable: LoRA (``lora_rank > 0``, peft
injected into ``lora_target_modules``, which the config restricts to generation modules) or, for full
training, every generation-side parameter (``*_moe_gen`` experts and norms, ``vae2llm``, ``llm2vae``,
``time_embedder``); the understanding experts, the ViT and the autoencoder stay frozen, which
:meth:`BagelPolicy.__init__` checks. Trainable tensors are float32 master weights; a bfloat16 model
runs its forward under autocast. NaViT packing is not bit-for-bit batch-invariant: compare velocities
of the same batch in the same order.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from bagel.backend import resolve_attention
from bagel.model import BagelParts, build_tiny_bagel, generation_velocity, load_bagel
from bagel.packing import grid_position_ids, pack_generation, patchify, unpatchify
from core.config import BagelPolicyConfig
from learner.base import ADAPTER_NAME, DTYPES, Conditioning, SampleBatch, TrainableState, resolve_device

__all__ = ["BagelPolicy", "is_generation_param", "sampling_schedule"]

GEN_PREFIXES = ("model.vae2llm.", "model.llm2vae.", "model.time_embedder.")


def is_generation_param(name: str) -> bool:
    """True for a parameter of Bagel's generation side (the ``*_moe_gen`` experts and the flow head)."""
    return "_moe_gen" in name or name.startswith(GEN_PREFIXES)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0: ``linspace`` shifted as ``s t / (1 + (s - 1) t)`` (Bagel's schedule)."""
    if steps < 1 or shift <= 0:
        raise ValueError(f"need steps >= 1 and shift > 0, got {steps}, {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def renormalise(guided: torch.Tensor, cond: torch.Tensor, kind: str, floor: float) -> torch.Tensor:
    """Scale CFG velocities ``[B, N, P]`` to at most the conditional norm (per image or per token)."""
    if kind not in ("global", "channel"):
        raise ValueError(f"cfg_renorm_type must be 'global' or 'channel', got {kind!r}")
    dims = (1, 2) if kind == "global" else (2,)
    scale = cond.norm(dim=dims, keepdim=True) / (guided.norm(dim=dims, keepdim=True) + 1e-8)
    return guided * scale.clamp(min=floor, max=1.0)


class BagelPolicy(TrainableState):
    """Adapter around a Bagel model's generation side (see module docstring)."""

    def __init__(self, parts: BagelParts, cfg: BagelPolicyConfig, *, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, cache_size: int = 512) -> None:
        if parts.vae is None:
            raise ValueError("BagelPolicy needs a generation model (stage 2) with its autoencoder")
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.attention = resolve_attention(cfg.attention, self.device)
        self.version = 0
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self.parts = parts.to(self.device, dtype)
        self.model = parts.model
        self.lora = cfg.lora_rank > 0
        self._make_trainable(seed)
        self._params = self.collect_trainable(self.model, lora=self.lora)
        frozen_breach = [n for n in self._params if not is_generation_param(n)]
        if frozen_breach:
            raise ValueError(f"only Bagel's generation side may train, but {frozen_breach[:5]} would")
        if not self._params:
            raise ValueError(f"nothing to train: LoRA targets {cfg.lora_target_modules} match no module")
        for p in self._params.values():  # float32 master weights
            p.data = p.data.float()
        cfg_m = parts.config
        self.patch = int(cfg_m.latent_patch_size)
        self.max_latent = int(cfg_m.max_latent_size)
        self.channels = parts.latent_channels
        self.down = parts.vae_downsample

    def _make_trainable(self, seed: int) -> None:
        self.model.requires_grad_(False)
        if self.lora:
            from peft import LoraConfig, inject_adapter_in_model

            with torch.random.fork_rng(devices=[]):  # LoRA A is random (B is zero): seeded, global RNG untouched
                torch.manual_seed(seed)
                inject_adapter_in_model(LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha,
                                                   target_modules=list(self.cfg.lora_target_modules),
                                                   init_lora_weights=True), self.model, adapter_name=ADAPTER_NAME)
        else:
            for name, p in self.model.named_parameters():
                if is_generation_param(name) and "latent_pos_embed" not in name:
                    p.requires_grad_(True)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: BagelPolicyConfig, seed: int = 0) -> BagelPolicy:
        """``pretrained`` -> :func:`bagel.model.load_bagel`; else the tiny Bagel of ``tiny_seed``.
        ``seed`` seeds the LoRA initialisation only (the weights come from the checkpoint / tiny_seed)."""
        if cfg.pretrained:
            parts = load_bagel(cfg.pretrained, stage=2)
        elif cfg.tiny:
            parts = build_tiny_bagel(cfg.tiny_seed)
        else:
            raise ValueError("policy: set policy.pretrained (a local Bagel checkpoint dir) or policy.tiny=true")
        return cls(parts, cfg, device=resolve_device(cfg.device), dtype=DTYPES[cfg.dtype], seed=seed)

    # ------------------------------------------------------------------------------ conditioning
    def prompt_ids(self, prompt: str) -> list[int]:
        """Framed prompt ids ``[<|im_start|>, prompt (at most max_prompt_tokens), <|im_end|>]`` (LRU-cached)."""
        if prompt in self._ids:
            self.cache_hits += 1
            self._ids.move_to_end(prompt)
            return self._ids[prompt]
        self.cache_misses += 1
        tok = self.parts.tokens
        body = self.parts.tokenizer.encode(prompt, add_special_tokens=False)[: self.cfg.max_prompt_tokens]
        ids = [tok.bos, *body, tok.eos]
        self._ids[prompt] = ids
        while len(self._ids) > self.cache_size:
            self._ids.popitem(last=False)
        return ids

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """``embeds [B, L, D]`` input embeddings of the framed prompts (padded), ``pooled [B, L]`` their mask."""
        rows = [self.prompt_ids(p) for p in prompts]
        if not rows:
            raise ValueError("encode needs at least one prompt")
        longest = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), longest, device=self.device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, device=self.device)
            mask[i, : len(r)] = 1.0
        embeds = self.parts.language_model.model.embed_tokens(ids) * mask[..., None].to(self.dtype)
        return Conditioning(embeds=embeds, pooled=mask)

    # --------------------------------------------------------------------------------- the model
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _grid(self, h: int, w: int) -> tuple[int, int]:
        if h % self.patch or w % self.patch:
            raise ValueError(f"latent grid {h}x{w} is not a multiple of the latent patch {self.patch}")
        return h // self.patch, w // self.patch

    def _tokens_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                         unconditional: bool = False) -> torch.Tensor:
        """Velocity tokens ``[B, N, P]`` at ``x [B, C, h, w]``, ``t [B]``; ``unconditional`` = the CFG branch."""
        b, _, h, w = x.shape
        rows, cols = self._grid(h, w)
        n = rows * cols
        lens = [int(v) for v in cond.pooled.sum(dim=1).tolist()]
        packed = pack_generation([None] * b if unconditional else lens, n, self.parts.tokens)
        embeds = None if unconditional else torch.cat([cond.embeds[i, :k] for i, k in enumerate(lens)])
        tokens = patchify(x, self.patch).reshape(b * n, -1)
        pos = grid_position_ids(rows, cols, self.max_latent).to(self.device).repeat(b)
        t_tok = t.to(self.device, torch.float32).repeat_interleave(n)
        with self._autocast():
            v = generation_velocity(self.parts, packed, embeds, tokens, t_tok, pos, self.attention)
        return v.float().reshape(b, n, -1)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """Conditional velocity (noise - x0) at ``x_t [B, C, h, w]`` and ``t [B]``; float32 ``[B, C, h, w]`` on
        the policy device, differentiable in the trainable tensors (no CFG: what the learner trains)."""
        if cond is None:
            if prompts is None:
                raise ValueError("velocity needs prompts or cond")
            cond = self.encode(prompts)
        b, c, h, w = x_t.shape
        if cond.embeds.shape[0] != b or t.shape != (b,) or c != self.channels:
            raise ValueError(f"batch mismatch: x_t {tuple(x_t.shape)} (want {self.channels} channels), "
                             f"t {tuple(t.shape)}, conditioning {tuple(cond.embeds.shape)}")
        v = self._tokens_velocity(x_t.to(self.device, torch.float32), t, cond)
        return unpatchify(v, self.patch, c, h, w)

    # -------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, h, w]`` -> uint8 images ``[B, H, W, 3]`` on CPU (Bagel's ``x * 0.5 + 0.5``)."""
        img = self.parts.vae.decode(x0.to(self.device, self.dtype)).float()
        img = (img * 0.5 + 0.5).clamp(0, 1)
        return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """``[B, C, H/8, W/8]`` float32 noise, sample i from ``torch.Generator('cpu').manual_seed(seeds[i])``."""
        if height % (self.down * self.patch) or width % (self.down * self.patch):
            raise ValueError(f"image {height}x{width} must be a multiple of {self.down * self.patch}")
        shape = (self.channels, height // self.down, width // self.down)
        return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])

    def _guided(self, x: torch.Tensor, t: float, cond: Conditioning, guidance: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t)
        c = self._tokens_velocity(x, tt, cond)
        lo, hi = self.cfg.cfg_interval
        if guidance <= 1.0 or not lo < t <= hi:
            return c
        u = self._tokens_velocity(x, tt, cond, unconditional=True)
        return renormalise(u + guidance * (c - u), c, self.cfg.cfg_renorm_type, self.cfg.cfg_renorm_min)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None, height: int | None = None, width: int | None = None) -> SampleBatch:
        """One image per (prompt, seed) (module docstring); reproducible per seed."""
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds")
        steps = steps or self.cfg.num_inference_steps
        guidance = self.cfg.guidance_scale if guidance is None else float(guidance)
        height, width = height or self.cfg.height, width or self.cfg.width
        cond = self.encode(prompts)
        x = self.initial_noise(seeds, height, width).to(self.device)
        b, c, h, w = x.shape
        times = sampling_schedule(steps, self.cfg.sample_shift)
        for i in range(steps):
            v = self._guided(x, float(times[i]), cond, guidance)
            x = x - float(times[i] - times[i + 1]) * unpatchify(v, self.patch, c, h, w)
        return SampleBatch(images=self.decode(x), x0=x.float().cpu(), version=self.version)

    def counters(self) -> dict[str, Any]:
        return {"prompt_cache_hits": self.cache_hits, "prompt_cache_misses": self.cache_misses,
                "attention": self.attention, "trainable": sum(p.numel() for p in self._params.values())}
