"""The generation module behind a narrow interface: sample, velocity, trainable state in/out.

One adapter wraps diffusers' rectified-flow pipelines: ``StableDiffusion3Pipeline`` ("sd3") and
``FluxPipeline`` ("flux"). Built from ``policy.pretrained`` (diffusers ``from_pretrained``) or from
``policy.tiny`` (random tiny pipelines from :mod:`learner.tiny`).

Latent space. ``x0`` and the ``x_t`` passed to :meth:`DiffusersPolicy.velocity` live in the space the
transformer is trained in: the VAE latent *normalised* as ``(z - shift_factor) * scaling_factor``
(this is what the pipelines return with ``output_type="latent"``), laid out ``[B, C, h, w]`` with
``h = H / vae_scale_factor``. For FLUX the transformer sees 2x2-packed tokens; packing and
unpacking happen inside :meth:`velocity`, so callers always see ``[B, C, h, w]`` and per-pixel
reward maps at ``[h, w]`` line up for both kinds.

Trainable state. LoRA (``lora_rank > 0``, peft adapter "default" on the transformer) or full
fine-tuning of the transformer; text encoders and VAE are frozen and in eval mode. State keys are
peft's ``get_peft_model_state_dict`` names for LoRA (adapter name stripped; loadable by diffusers'
LoRA loaders with a ``transformer.`` prefix) and ``named_parameters`` names for full FT.
Trainable tensors are kept in float32 (master weights) even when the pipeline runs in bf16/fp16.

Memory (the GPU configs). ``offload_text_encoders``: the prompts given as ``precompute`` are embedded
with the text encoders on the device *before* the denoiser is moved there (so the peak is the larger of the
two), then the encoders stay on the CPU and the embedding cache lives in CPU memory (a batch's rows are
copied to the device on use); a prompt not precomputed is encoded on the CPU. ``vae_tiling`` /
``vae_slicing`` bound the VAE's decoding memory; ``gradient_checkpointing`` recomputes the transformer's
activations in the backward pass (:mod:`learner.memory`).

Guidance. SD3 uses classifier-free guidance with the empty prompt as negative (as the pipeline
does). FLUX uses the guidance value as the distilled guidance embedding (when the transformer has
one), both for sampling and in :meth:`DiffusersPolicy.velocity`; FLUX's "true CFG" is not used.

Version. ``version`` counts weight changes: the learner bumps it after every optimiser step
that changed the weights; :meth:`load_trainable_state` sets it to the publisher's version.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from core.config import DiffusersPolicyConfig
from learner.base import (
    ADAPTER_NAME,
    DTYPES,
    Conditioning,
    PromptCache,
    SampleBatch,
    TrainableState,
    resolve_device,
)
from learner.export import lora_config
from learner.memory import TEXT_ENCODERS, apply_placement, configure_memory, placement
from learner.tiny import build_tiny

PIPELINE_CLASSES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


def _dtype_kwarg() -> str:
    """Newer diffusers take ``dtype=`` (``torch_dtype`` deprecated, e.g. 0.42); older ones ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(kind: str, pretrained: str, dtype: torch.dtype):
    """Load a real pipeline with diffusers' ``from_pretrained`` (hub id or local directory)."""
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"policy.kind must be one of {sorted(PIPELINE_CLASSES)}, got {kind!r}")
    return PIPELINE_CLASSES[kind].from_pretrained(pretrained, **{_dtype_kwarg(): dtype})


class DiffusersPolicy(TrainableState, PromptCache):
    """Adapter around a diffusers flow-matching pipeline (see module docstring)."""

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline | FluxPipeline,
        kind: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 8,
        guidance_scale: float = 4.5,
        max_sequence_length: int = 77,
        cache_size: int = 512,
        seed: int = 0,
        offload_text_encoders: bool = False,
        precompute: Sequence[str] = (),
        vae_tiling: bool = False,
        vae_slicing: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        if kind not in PIPELINE_CLASSES:
            raise ValueError(f"policy.kind must be one of {sorted(PIPELINE_CLASSES)}, got {kind!r}")
        if not isinstance(pipe, PIPELINE_CLASSES[kind]):
            raise TypeError(f"kind {kind!r} needs a {PIPELINE_CLASSES[kind].__name__}, got {type(pipe).__name__}")
        self.kind = kind
        self.device = torch.device(device)
        self.dtype = dtype
        self.height, self.width = height, width
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.cache_size = cache_size
        self.lora_rank = lora_rank
        self.version = 0
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

        if pipe.dtype != dtype:  # from_pretrained already applied torch_dtype; tiny builds are fp32
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
                module.requires_grad_(False)
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.offload_text_encoders = offload_text_encoders
        # offloading: embed the prompt set with the text encoders on the device BEFORE the denoiser goes there
        # (the peak is the larger of the two, not their sum), then keep encoders and cache on the CPU
        self._cache_device = torch.device("cpu") if offload_text_encoders else self.device
        if offload_text_encoders and precompute:
            apply_placement(pipe, {n: str(self.device) if n in TEXT_ENCODERS else "cpu" for n in placement(pipe, "cpu", False)})
            self.precompute_prompts(precompute)
        apply_placement(pipe, placement(pipe, self.device, offload_text_encoders))
        self.memory = configure_memory(pipe, vae_tiling=vae_tiling, vae_slicing=vae_slicing,
                                       gradient_checkpointing=gradient_checkpointing)
        if lora_rank > 0:  # LoRA A is random (B is zero): seed it, leave the global RNG alone
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.transformer.add_adapter(lora_config(lora_rank, lora_alpha, lora_target_modules),
                                             adapter_name=ADAPTER_NAME)
        else:
            self.transformer.requires_grad_(True)
        self.transformer.eval()
        self._params = self.collect_trainable(self.transformer, lora=lora_rank > 0)
        for p in self._params.values():  # float32 master weights
            p.data = p.data.float()

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: DiffusersPolicyConfig, seed: int = 0, **kwargs: Any) -> DiffusersPolicy:
        """Build from the policy section: ``pretrained`` -> ``from_pretrained``; else a tiny random pipeline.

        ``seed`` fixes the tiny model's weights and the LoRA initialisation."""
        dtype = DTYPES[cfg.dtype]
        if cfg.pretrained:
            pipe = load_pipeline(cfg.kind, cfg.pretrained, dtype)
        elif cfg.tiny:
            pipe = build_tiny(cfg.kind, seed)
        else:
            raise ValueError("policy: set policy.pretrained (hub id or local dir) or policy.tiny=true")
        return cls(
            pipe, cfg.kind, device=resolve_device(cfg.device), dtype=dtype,
            lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
            lora_target_modules=tuple(cfg.lora_target_modules), height=cfg.height, width=cfg.width,
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            max_sequence_length=cfg.max_sequence_length, seed=seed, cache_size=cfg.prompt_cache_size,
            offload_text_encoders=cfg.offload_text_encoders, vae_tiling=cfg.vae_tiling, vae_slicing=cfg.vae_slicing,
            gradient_checkpointing=cfg.gradient_checkpointing, **kwargs,
        )

    # ------------------------------------------------------------------------------ conditioning
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.pipe.text_encoder.device  # where the encoders are now (the CPU once offloaded)
        if self.kind == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
        else:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device,
                max_sequence_length=self.max_sequence_length,
            )
        return embeds.to(self._cache_device), pooled.to(self._cache_device)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Cached text conditioning (:class:`~learner.base.PromptCache`), on the policy's device."""
        cond = super().encode(prompts)
        if cond.embeds.device == self.device:
            return cond
        return Conditioning(cond.embeds.to(self.device, non_blocking=True), cond.pooled.to(self.device, non_blocking=True))

    @torch.no_grad()
    def precompute_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> int:
        """Embed ``prompts`` (deduplicated) into the cache, ``batch_size`` at a time, growing the cache to hold
        them all; returns how many were encoded (those not cached yet)."""
        texts = list(dict.fromkeys(str(p) for p in prompts))
        self.cache_size = max(self.cache_size, len(texts) + len(self._cache))
        before = self.cache_misses
        for i in range(0, len(texts), batch_size):
            PromptCache.encode(self, texts[i:i + batch_size])  # into the cache; nothing moved to the device
        return self.cache_misses - before

    # -------------------------------------------------------------------------------- inference
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, h, w]`` -> uint8 images ``[B, H, W, 3]`` on CPU."""
        vae = self.pipe.vae
        z = x0.to(self.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0].float()
        img = (img / 2 + 0.5).clamp(0, 1)  # same as VaeImageProcessor.denormalize
        return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None, height: int | None = None,
               width: int | None = None) -> SampleBatch:
        """Generate one image per (prompt, seed); each sample's initial noise comes from its own
        CPU ``torch.Generator(seed)``, so a sample is reproducible for its seed."""
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds")
        steps = steps or self.num_inference_steps
        guidance = self.guidance_scale if guidance is None else guidance
        height, width = height or self.height, width or self.width
        cond = self.encode(prompts)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kw: dict[str, Any] = dict(
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
            generator=gens, output_type="latent", max_sequence_length=self.max_sequence_length,
            prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
        )
        if self.kind == "sd3" and guidance > 1.0:
            neg = self.encode([""] * len(prompts))
            kw.update(negative_prompt_embeds=neg.embeds, negative_pooled_prompt_embeds=neg.pooled)
        with self._autocast():
            latents = self.pipe(**kw).images
            if self.kind == "flux":
                latents = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
            images = self.decode(latents)
        return SampleBatch(images=images, x0=latents.float().cpu(), version=self.version)

    # ---------------------------------------------------------------------------------- training
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """Predicted velocity (noise - x0) at ``x_t`` ``[B, C, h, w]`` and ``t`` ``[B]`` in (0, 1).

        Pass ``prompts`` (looked up in the cache) or precomputed ``cond``. Differentiable w.r.t.
        the trainable parameters; returns float32 ``[B, C, h, w]`` on the policy device.
        """
        if cond is None:
            if prompts is None:
                raise ValueError("velocity needs prompts or cond")
            cond = self.encode(prompts)
        b, c, h, w = x_t.shape
        if cond.embeds.shape[0] != b or t.shape != (b,):
            raise ValueError(f"batch mismatch: x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, "
                             f"conditioning {tuple(cond.embeds.shape)}")
        x = x_t.to(self.device, self.dtype)
        t = t.to(self.device, torch.float32)
        with self._autocast():
            if self.kind == "sd3":
                # float32 timesteps, as the pipeline passes the scheduler's timesteps
                v = self.transformer(hidden_states=x, timestep=t * 1000,
                                     encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                                     return_dict=False)[0]
            else:
                v = self._flux_velocity(x, t, cond)
        return v.float()

    def _flux_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = x.shape
        packed = self.pipe._pack_latents(x, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:  # guidance-distilled: same value as sampling
            guidance = torch.full((b,), float(self.guidance_scale), device=self.device)
        out = self.transformer(hidden_states=packed, timestep=t.to(self.dtype), guidance=guidance,
                               pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        vsf = self.vae_scale_factor
        return self.pipe._unpack_latents(out, h * vsf, w * vsf, vsf)

