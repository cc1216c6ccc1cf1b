"""The shapes world's base generation module behind the :class:`learner.base.Policy` interface.

A small rectified-flow generator in *pixel space*: ``x0`` is the image as a float tensor
``[B, 3, 32, 32]`` scaled to ``[-1, 1]`` (``x0 = uint8 / 127.5 - 1``), so reward maps at image
resolution line up with ``x0`` without a VAE. The denoiser is a small diffusers
``UNet2DConditionModel`` (default: widths 16/32/64, cross-attention to the prompt tokens and
self-attention at 8x8, pooled prompt vector added to the timestep embedding) or an
``SD3Transformer2DModel`` over pixel patches (``ShapesArch.denoiser="sd3"``; on this CPU it learned
coherent shapes far more slowly than the UNet within a few-minute budget: per-patch speckles instead
of blobs); the text encoder is a tiny word-level transformer over the
world's vocabulary (:class:`WordTokenizer`, :class:`TextEncoder`). Both are pretrained together in
:mod:`shapes.pretrain`; afterwards the text encoder is frozen (eval mode, no grad) and only the
denoiser is trainable, fully or through a peft LoRA adapter (``lora_rank > 0``).

Conventions (same as :mod:`learner.base` and :mod:`learner.loss`): ``x_t = (1 - t) x0 + t noise``,
velocity target ``noise - x0``; sampling integrates Euler steps from ``t = 1`` to ``t = 0``. The
denoiser sees ``timestep = 1000 t``. Classifier-free guidance uses the empty prompt's encoding as the
null conditioning; it is *learned* (prompts are dropped to "" during pretraining).

Determinism: each sample's initial noise comes from its own CPU ``torch.Generator(seed)``; sampling
uses no other randomness.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from peft import LoraConfig
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from learner.base import ADAPTER_NAME, Conditioning, PromptCache, SampleBatch, TrainableState

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
_WORD = re.compile(r"[a-z0-9]+")


class ShapesArch(BaseModel):
    """Architecture of the shapes generator (part of the pretraining cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    denoiser: Literal["sd3", "unet"] = Field("unet", description="SD3Transformer2DModel (pixel patches) or UNet2DConditionModel.")
    image_size: int = Field(32, ge=8, description="Image side in pixels (the world's render size).")
    unet_channels: tuple[int, ...] = Field((16, 32, 64), description="UNet block widths (attention only in the lowest-resolution block).")
    patch_size: int = Field(2, ge=1, description="Denoiser patch size in pixels.")
    num_layers: int = Field(4, ge=1, description="Denoiser (SD3 joint) transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the denoiser.")
    head_dim: int = Field(16, ge=4, description="Attention head dimension of the denoiser.")
    text_dim: int = Field(64, ge=8, description="Text encoder width (token and pooled embedding size).")
    text_layers: int = Field(2, ge=1, description="Text encoder transformer layers.")
    text_heads: int = Field(4, ge=1, description="Text encoder attention heads.")
    max_tokens: int = Field(16, ge=2, description="Token positions including the leading <cls>.")


# ------------------------------------------------------------------------------------------- text
class WordTokenizer:
    """Lower-cased word tokens over a fixed vocabulary: ``[<cls>, w1, ..., wn, <pad>, ...]``.

    Unknown words map to ``<unk>``; prompts longer than ``max_tokens - 1`` words raise ``ValueError``
    (the world's prompts have at most 10 words). The empty prompt is ``[<cls>, <pad>, ...]``, the
    null conditioning.
    """

    def __init__(self, words: Iterable[str], max_tokens: int) -> None:
        self.vocab: list[str] = [PAD, UNK, CLS, *sorted(set(words) - {PAD, UNK, CLS})]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = int(max_tokens)

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, L] int64, pad_mask [B, L] bool, True = padding)``."""
        ids = torch.full((len(prompts), self.max_tokens), self.index[PAD], dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.index[CLS]] + [self.index.get(w, self.index[UNK]) for w in self.words(p)]
            if len(toks) > self.max_tokens:
                raise ValueError(f"prompt has {len(toks) - 1} words, at most {self.max_tokens - 1} fit: {p!r}")
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids, ids == self.index[PAD]


def world_vocabulary() -> list[str]:
    """Every word of every prompt of the shapes world's grammar (sorted)."""
    from shapes.world import all_specs, prompt_of

    return sorted({w for specs in all_specs().values() for s in specs for w in WordTokenizer.words(prompt_of(s))})


class TextEncoder(nn.Module):
    """Token + position embeddings and a small pre-norm transformer encoder.

    ``embeds`` ``[B, L, D]`` are the final-norm token states (padding positions included: the SD3
    denoiser attends to all of them, as it does to T5 padding); ``pooled`` ``[B, D]`` is the
    ``<cls>`` state.
    """

    def __init__(self, vocab_size: int, arch: ShapesArch) -> None:
        super().__init__()
        d = arch.text_dim
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.randn(arch.max_tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, arch.text_heads, dim_feedforward=2 * d, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, arch.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=pad_mask))
        return h, h[:, 0]


def build_denoiser(arch: ShapesArch) -> SD3Transformer2DModel | UNet2DConditionModel:
    """Pixel-space denoiser with 3 channels in and out: an SD3 transformer over
    ``image_size / patch_size`` patches a side, or a small conditional UNet (cross-attention to the
    prompt tokens and self-attention only at the lowest resolution; pooled prompt added to the
    timestep embedding)."""
    if arch.denoiser == "unet":
        n = len(arch.unet_channels)
        return UNet2DConditionModel(
            sample_size=arch.image_size, in_channels=3, out_channels=3, block_out_channels=arch.unet_channels,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            layers_per_block=1, cross_attention_dim=arch.text_dim, attention_head_dim=arch.head_dim,
            norm_num_groups=min(8, min(arch.unet_channels)), class_embed_type="projection",
            projection_class_embeddings_input_dim=arch.text_dim,
        )
    if arch.image_size % arch.patch_size:
        raise ValueError(f"image_size {arch.image_size} is not a multiple of patch_size {arch.patch_size}")
    dim = arch.num_heads * arch.head_dim
    return SD3Transformer2DModel(
        sample_size=arch.image_size, patch_size=arch.patch_size, in_channels=3, out_channels=3,
        num_layers=arch.num_layers, attention_head_dim=arch.head_dim, num_attention_heads=arch.num_heads,
        joint_attention_dim=arch.text_dim, caption_projection_dim=dim, pooled_projection_dim=arch.text_dim,
        pos_embed_max_size=arch.image_size // arch.patch_size,
    )


def denoise(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
            pooled: torch.Tensor) -> torch.Tensor:
    """Velocity from either denoiser kind at ``x`` ``[B, 3, H, W]``, ``t`` ``[B]`` in (0, 1) (seen as ``1000 t``)."""
    if isinstance(model, UNet2DConditionModel):
        return model(x, t * 1000, encoder_hidden_states=embeds, class_labels=pooled, return_dict=False)[0]
    return model(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled,
                 return_dict=False)[0]


# ------------------------------------------------------------------------------------------ pixels
def images_to_x0(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in ``[-1, 1]``."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def x0_to_images(x0: torch.Tensor) -> torch.Tensor:
    """float ``[B, 3, H, W]`` (``[-1, 1]``, clamped) -> uint8 ``[B, H, W, 3]`` on CPU."""
    img = ((x0.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu()


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0: ``u = linspace(1, 0)`` warped by SD3's shift
    ``t = shift u / (1 + (shift - 1) u)`` (shift 1 = uniform)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


# ------------------------------------------------------------------------------------------ policy
class ShapesPolicy(TrainableState, PromptCache):
    """The shapes generator with :class:`learner.base.Policy`'s interface (module docstring).

    Build with :func:`shapes.pretrain.load_policy` (pretrains or loads the cached base) or from modules.
    """

    kind = "shapes"

    def __init__(
        self,
        text_encoder: TextEncoder,
        denoiser: SD3Transformer2DModel | UNet2DConditionModel,
        tokenizer: WordTokenizer,
        arch: ShapesArch,
        *,
        device: str | torch.device = "cpu",
        num_inference_steps: int = 16,
        guidance_scale: float = 3.0,
        sample_shift: float = 3.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        cache_size: int = 1024,
        seed: int = 0,
    ) -> None:
        self.arch = arch
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.height = self.width = arch.image_size
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.sample_shift = float(sample_shift)
        self.lora_rank = int(lora_rank)
        self.cache_size = int(cache_size)
        self.version = 0
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = self.cache_misses = 0

        self.text_encoder = text_encoder.to(self.device).float().eval().requires_grad_(False)
        self.transformer = denoiser.to(self.device).float().eval()
        if self.lora_rank > 0:  # LoRA A is random (B is zero): seed it, leave the global RNG alone
            self.transformer.requires_grad_(False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.transformer.add_adapter(
                    LoraConfig(r=self.lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_target_modules),
                               init_lora_weights=True),
                    adapter_name=ADAPTER_NAME,
                )
        else:
            self.transformer.requires_grad_(True)
        self._params = self.collect_trainable(self.transformer, lora=self.lora_rank > 0)

    # ------------------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen text encoder's outputs (``encode`` caches them; see ``PromptCache``)."""
        ids, pad = self.tokenizer(prompts)
        return self.text_encoder(ids.to(self.device), pad.to(self.device))

    # -------------------------------------------------------------------------------- inference
    @property
    def vae_scale_factor(self) -> int:
        """1: ``x0`` is in pixel space (kept for callers written against the diffusers policy)."""
        return 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Pixel-space ``x0`` ``[B, 3, H, W]`` -> uint8 images ``[B, H, W, 3]`` on CPU."""
        return x0_to_images(x0)

    def _guided_velocity(self, x: torch.Tensor, t: float, cond: Conditioning, null: Conditioning | None,
                         guidance: float) -> torch.Tensor:
        b = x.shape[0]
        if null is None:
            return self._forward(x, torch.full((b,), t, device=self.device), cond.embeds, cond.pooled)
        v = self._forward(torch.cat([x, x]), torch.full((2 * b,), t, device=self.device),
                          torch.cat([null.embeds, cond.embeds]), torch.cat([null.pooled, cond.pooled]))
        v_null, v_cond = v.chunk(2)
        return v_null + guidance * (v_cond - v_null)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None, height: int | None = None,
               width: int | None = None) -> SampleBatch:
        """One image per (prompt, seed): Euler integration of the velocity from ``t = 1`` (noise
        from ``torch.Generator(seed)``) to ``t = 0``, CFG when ``guidance > 1``."""
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds")
        steps = steps or self.num_inference_steps
        guidance = self.guidance_scale if guidance is None else float(guidance)
        size = self.arch.image_size
        for name, v in (("height", height), ("width", width)):
            if v is not None and v != size:
                raise ValueError(f"{name} must be {size} for the shapes policy, got {v}")
        cond = self.encode(prompts)
        null = self.encode([""] * len(prompts)) if guidance > 1.0 else None
        x = torch.stack([torch.randn(3, size, size, generator=torch.Generator("cpu").manual_seed(s))
                         for s in seeds]).to(self.device)
        ts = flow_timesteps(steps, self.sample_shift).tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
            x = x + (t_next - t_cur) * self._guided_velocity(x, t_cur, cond, null, guidance)
        # clamp to the data range: x0 is then exactly the image that is judged (and trained toward), not
        # out-of-range values the pretraining data never had
        x0 = x.float().cpu().clamp(-1.0, 1.0)
        return SampleBatch(images=x0_to_images(x0), x0=x0, version=self.version)

    # ---------------------------------------------------------------------------------- training
    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        return denoise(self.transformer, x, t, embeds, pooled)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str] | None = None, *,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """Predicted velocity (noise - x0) at ``x_t`` ``[B, 3, H, W]`` and ``t`` ``[B]`` in (0, 1).

        Pass ``prompts`` (looked up in the cache) or precomputed ``cond``. Differentiable w.r.t. the
        trainable parameters; float32 on the policy device.
        """
        if cond is None:
            if prompts is None:
                raise ValueError("velocity needs prompts or cond")
            cond = self.encode(prompts)
        b = x_t.shape[0]
        if x_t.ndim != 4 or cond.embeds.shape[0] != b or t.shape != (b,):
            raise ValueError(f"batch mismatch: x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, "
                             f"conditioning {tuple(cond.embeds.shape)}")
        return self._forward(x_t.to(self.device, torch.float32), t.to(self.device, torch.float32),
                             cond.embeds.to(self.device), cond.pooled.to(self.device)).float()

