"""Tiny random diffusers pipelines built entirely from configs (no downloads).

Used by tests, CPU smoke runs and benchmarks. Both builders are deterministic for a given seed and
leave the global torch RNG untouched. Shapes follow the measured recipe in
``shared/notes/TINY_MODELS.md``:

* SD3: two ``CLIPTextModelWithProjection`` (hidden 16, projection 32) + ``T5EncoderModel``
  (d_model 32), a 2-layer ``SD3Transformer2DModel`` (patch 2, 4 latent channels), a 2-block
  ``AutoencoderKL`` (vae_scale_factor 2), ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
* FLUX: ``CLIPTextModel`` (hidden 16 = pooled projection) + ``T5EncoderModel`` (d_model 32), a
  ``FluxTransformer2DModel`` with one double and one single block and guidance embedding, the same
  VAE idea, and the dynamic-shift flow-matching scheduler.

Tokenizers are built in memory: CLIP gets a byte-level BPE vocabulary without merges (GPT-2's
byte->unicode table, every byte is a token), T5 a unigram vocabulary over printable ASCII.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
LATENT_CHANNELS = 4
CLIP_HIDDEN = 16
CLIP_PROJECTION = 32
T5_DIM = 32


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table.

    Bytes 33-126, 161-172 and 174-255 map to themselves; the remaining 68 bytes map, in order,
    to ``chr(256 + i)``.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def byte_level_vocab() -> dict[str, int]:
    """Byte-level CLIP vocabulary: 256 byte symbols, their end-of-word forms, BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab


def make_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with the byte-level vocabulary and no merges (one token per byte)."""
    tok = CLIPTokenizer(vocab=byte_level_vocab(), merges=[])
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def make_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over printable ASCII (``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁``)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("▁" + chr(c), -2.5) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_config(tok: CLIPTokenizer, projection_dim: int = CLIP_PROJECTION) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _t5_encoder(tok: T5Tokenizer) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=T5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5EncoderModel(cfg)


def _vae(scaling_factor: float, shift_factor: float, quant_conv: bool) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _eval_frozen(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.eval()
        m.requires_grad_(False)


def build_tiny_sd3(seed: int = 0, num_layers: int = 2, attention_head_dim: int = 8,
                   num_attention_heads: int = 4) -> StableDiffusion3Pipeline:
    """Tiny random ``StableDiffusion3Pipeline`` (float32, CPU), deterministic for ``seed``.

    ``num_layers``/``attention_head_dim``/``num_attention_heads`` size the transformer (benchmarks
    use a larger one). All modules are in eval mode with ``requires_grad=False``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2, tok3 = make_clip_tokenizer(), make_clip_tokenizer(), make_t5_tokenizer()
        te1 = CLIPTextModelWithProjection(_clip_config(tok1))
        te2 = CLIPTextModelWithProjection(_clip_config(tok2))
        te3 = _t5_encoder(tok3)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=attention_head_dim * num_attention_heads,
            pooled_projection_dim=2 * CLIP_PROJECTION,
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=64,
        )
        # SD3's real VAE normalisation constants, so the latent space is non-trivially normalised.
        vae = _vae(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    _eval_frozen(te1, te2, te3, transformer, vae)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
        text_encoder_3=te3, tokenizer_3=tok3,
    )


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Tiny random ``FluxPipeline`` (float32, CPU), deterministic for ``seed``.

    Latents have 4 channels (packed 2x2 to 16 transformer channels); the transformer has one
    double-stream and one single-stream block, head dim 8 split (2, 2, 4) over the RoPE axes.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = make_clip_tokenizer(), make_t5_tokenizer()
        te1 = CLIPTextModel(_clip_config(tok1))
        te2 = _t5_encoder(tok2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        )
        vae = _vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=4096,
    )
    _eval_frozen(te1, te2, transformer, vae)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
    )


def build_tiny(kind: str, seed: int = 0) -> StableDiffusion3Pipeline | FluxPipeline:
    """Dispatch on ``kind`` ("sd3" or "flux")."""
    if kind == "sd3":
        return build_tiny_sd3(seed)
    if kind == "flux":
        return build_tiny_flux(seed)
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; allowed: 'sd3', 'flux'")
