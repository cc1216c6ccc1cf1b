"""Building Bagel (tiny random, or a local checkpoint directory) and its two forward paths.

:class:`BagelParts` holds what both the policy and the judge use: the package's
``BagelForUnifiedMultimodal`` (Qwen2 MoT language model, SigLIP-NaViT tower, connector, the flow head
``vae2llm`` / ``llm2vae`` / ``time_embedder`` / ``latent_pos_embed``), the FLUX-style autoencoder and the
tokenizer.

- :func:`build_tiny_bagel`: a tiny random Bagel from configs (2-layer hidden-64 Qwen2 MoT, 2-layer
  SigLIP, a small autoencoder, a byte-level tokenizer; about 0.3 M parameters, built in well under a
  second). The package zero-initialises ``llm2vae`` (stage-2 training then starts from ``v = 0``); the
  tiny model re-draws it so that gradients reach the generation experts in tests.
- :func:`load_bagel`: a local checkpoint directory in the layout of ``ByteDance-Seed/BAGEL-7B-MoT``
  (``llm_config.json``, ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors`` and the Qwen2
  tokenizer files). The config is assembled the way Bagel's own loader does (Qwen2 config with
  ``qk_norm``, untied embeddings, the MoT layer for stage 2; SigLIP config, whose last layer the
  package drops through ``vit_select_layer``), the weights go through the package's
  ``load_bagel_checkpoint_state_dict``; any missing learned weight is an error. An optional
  ``srum_bagel.json`` in the directory overrides the layout constants (``vit_max_num_patch_per_side``
  70, ``max_latent_size`` 64, ``latent_patch_size`` 2) and the autoencoder architecture (the FLUX VAE:
  16 channels, 8x down-sampling); :func:`save_tiny_checkpoint` writes one for the tiny model.
  ``stage=1`` builds the understanding part only (no generation experts): what a judge needs.

Forward paths (:func:`generation_velocity`, :func:`understanding_logits`) go through the package's
packed training forward (``forward_train``): it is the path without flash-attn and without a KV cache,
so it runs on a CPU with the kernels of :mod:`bagel.backend`; the language model therefore stays in
train mode, which has no stochastic layer in Bagel (checked when building).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bagel.backend import attention_mask, has_flash_attn, navit_sdpa, nemo_bagel, packed_attention
from bagel.packing import Packed, SpecialTokens

__all__ = ["BagelParts", "LayoutConstants", "build_tiny_bagel", "generation_velocity", "load_bagel",
           "save_tiny_checkpoint", "understanding_logits", "vit_embeddings"]

LAYOUT_FILE = "srum_bagel.json"
REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors")
FROZEN_SINCOS = ("model.vit_pos_embed.pos_embed", "model.latent_pos_embed.pos_embed")  # deterministic tables


@dataclass(frozen=True)
class LayoutConstants:
    """Bagel's layout constants (BAGEL-7B-MoT's values by default)."""

    vit_max_num_patch_per_side: int = 70
    max_latent_size: int = 64
    latent_patch_size: int = 2


@dataclass
class BagelParts:
    """One Bagel: the unified model, its autoencoder (None for an understanding-only build), the tokenizer."""

    model: torch.nn.Module
    vae: torch.nn.Module | None
    tokenizer: Any
    tokens: SpecialTokens
    source: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    @property
    def latent_channels(self) -> int:
        return int(self.model.model.latent_channel)

    @property
    def vae_downsample(self) -> int:
        return int(self.config.vae_config["downsample"])

    def to(self, device: torch.device, dtype: torch.dtype) -> BagelParts:
        self.model.to(device=device, dtype=dtype)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        return self


# ----- building -----------------------------------------------------------------------------------

def _tiny_specs(vocab_size: int, pad_id: int) -> tuple[dict, dict, LayoutConstants, dict]:
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                pad_token_id=pad_id, tie_word_embeddings=False)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=64,
               patch_size=8)  # 3 layers: the package drops the last one (vit_select_layer=-2)
    layout = LayoutConstants(vit_max_num_patch_per_side=8, max_latent_size=16, latent_patch_size=2)
    ae = dict(resolution=64, in_channels=3, downsample=8, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=1,
              z_channels=4, scale_factor=0.3611, shift_factor=0.1159)
    return text, vit, layout, ae


def _bagel_config(text: Any, vit: Any, layout: LayoutConstants, ae: dict, stage: int) -> Any:
    pkg = nemo_bagel()
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (understanding only) or 2 (understanding + generation), got {stage}")
    text.qk_norm = True
    text.tie_word_embeddings = False
    text.layer_module = "Qwen2MoTDecoderLayer" if stage == 2 else "Qwen2DecoderLayer"
    return pkg.BagelConfig(text_config=text, vision_config=vit, visual_und=True, visual_gen=stage == 2, stage=stage,
                           vae_config={"z_channels": ae["z_channels"], "downsample": ae["downsample"]},
                           vit_max_num_patch_per_side=layout.vit_max_num_patch_per_side,
                           max_latent_size=layout.max_latent_size, latent_patch_size=layout.latent_patch_size,
                           vit_patch_size=vit.patch_size, connector_act="gelu_pytorch_tanh",
                           **({} if text.pad_token_id is None else {"pad_token_id": text.pad_token_id}))


def _check_deterministic(module: torch.nn.Module) -> None:
    """The packed forward runs in train mode: refuse a model with active dropout."""
    live = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if live:
        raise ValueError(f"Bagel modules with dropout would make the train-mode forward stochastic: {live[:5]}")


def _finish(model: torch.nn.Module, vae: torch.nn.Module | None, tokenizer: Any, source: str) -> BagelParts:
    model.requires_grad_(False)
    _check_deterministic(model)
    model.train()  # the packed forward_train path (module docstring); no stochastic layer
    if vae is not None:
        vae.requires_grad_(False)
        vae.eval()
    return BagelParts(model=model, vae=vae, tokenizer=tokenizer, tokens=SpecialTokens.from_tokenizer(tokenizer),
                      source=source)


def tiny_tokenizer() -> Any:
    """The byte-level Qwen2 tokenizer with Qwen's special tokens (digits, '-' and '.' are single tokens)."""
    from rewards.tiny_vlm import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, build_byte_tokenizer

    return build_byte_tokenizer(QWEN_SPECIALS, QWEN_CHAT_TEMPLATE)


def build_tiny_bagel(seed: int = 0, stage: int = 2) -> BagelParts:
    """A tiny random Bagel (module docstring); ``seed`` fixes every weight, the global RNG is left alone."""
    pkg = nemo_bagel()
    from nemo_automodel.components.models.bagel.modeling_siglip_navit import SiglipVisionConfig
    from transformers import Qwen2Config

    tok = tiny_tokenizer()
    vocab = ((len(tok) + 63) // 64) * 64
    text, vit, layout, ae = _tiny_specs(vocab, tok.pad_token_id)
    cfg = _bagel_config(Qwen2Config(**text), SiglipVisionConfig(**vit), layout, ae, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = pkg.BagelForUnifiedMultimodal(cfg)
        torch.nn.init.normal_(model.model.llm2vae.weight, std=0.02)  # see module docstring
        vae = pkg.AutoEncoder(pkg.AutoEncoderParams(**ae))
    if stage == 1:  # the same weights, generation side dropped: what load_bagel(stage=1) gives a judge
        und_cfg = _bagel_config(Qwen2Config(**text), SiglipVisionConfig(**vit), layout, ae, 1)
        und = pkg.BagelForUnifiedMultimodal(und_cfg)
        missing, _ = und.load_state_dict(model.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"understanding-only tiny Bagel misses {missing[:5]}")
        return _finish(und, None, tok, f"tiny:{seed}:stage1")
    return _finish(model, vae, tok, f"tiny:{seed}")


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny Bagel of ``seed`` in BAGEL-7B-MoT's directory layout (plus ``srum_bagel.json``)."""
    from safetensors.torch import save_file

    parts = build_tiny_bagel(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, vit, layout, ae = _tiny_specs(int(parts.config.text_config.vocab_size), parts.tokenizer.pad_token_id)
    (out / "llm_config.json").write_text(json.dumps(text, indent=1))
    (out / "vit_config.json").write_text(json.dumps(vit, indent=1))
    (out / LAYOUT_FILE).write_text(json.dumps({"layout": asdict(layout), "autoencoder": ae}, indent=1))
    sd = parts.model.state_dict_adapter.to_hf(parts.model.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in parts.vae.state_dict().items()}, str(out / "ae.safetensors"))
    parts.tokenizer.save_pretrained(out)
    return out


def _layout_file(d: Path) -> tuple[LayoutConstants, dict]:
    pkg = nemo_bagel()
    from nemo_automodel.components.models.bagel.autoencoder import default_autoencoder_params

    ae = asdict(default_autoencoder_params())
    layout = LayoutConstants()
    if (d / LAYOUT_FILE).exists():
        data = json.loads((d / LAYOUT_FILE).read_text())
        unknown = set(data) - {"layout", "autoencoder"}
        if unknown:
            raise ValueError(f"{d / LAYOUT_FILE}: unknown sections {sorted(unknown)} (allowed: layout, autoencoder)")
        layout = LayoutConstants(**data.get("layout", {}))
        ae = {**ae, **data.get("autoencoder", {})}
    pkg.AutoEncoderParams(**ae)  # validates the keys
    return layout, ae


def load_bagel(path: str | Path, stage: int = 2) -> BagelParts:
    """A Bagel from a local checkpoint directory (module docstring); ``stage=1`` = understanding only."""
    pkg = nemo_bagel()
    from nemo_automodel.components.models.bagel.modeling_siglip_navit import SiglipVisionConfig
    from nemo_automodel.components.models.bagel.state_dict_adapter import load_bagel_checkpoint_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2Config

    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"Bagel checkpoint directory {d} does not exist (policy/judge `pretrained`)")
    missing_files = [f for f in (*REQUIRED_FILES, *(("ae.safetensors",) if stage == 2 else ())) if not (d / f).exists()]
    if missing_files:
        raise FileNotFoundError(f"{d} is not a Bagel checkpoint: missing {missing_files} (expected the layout of "
                                "ByteDance-Seed/BAGEL-7B-MoT)")
    layout, ae = _layout_file(d)
    cfg = _bagel_config(Qwen2Config.from_json_file(str(d / "llm_config.json")),
                        SiglipVisionConfig.from_json_file(str(d / "vit_config.json")), layout, ae, stage)
    model = pkg.BagelForUnifiedMultimodal(cfg)
    state = load_bagel_checkpoint_state_dict(str(d), stage=stage, strict=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in FROZEN_SINCOS]
    if missing or unexpected:
        raise ValueError(f"{d / 'ema.safetensors'} does not fit the Bagel config: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    vae = None
    if stage == 2:
        vae = pkg.AutoEncoder(pkg.AutoEncoderParams(**ae))
        vae_missing, vae_unexpected = vae.load_state_dict(load_file(str(d / "ae.safetensors")), strict=False)
        if vae_missing or vae_unexpected:
            raise ValueError(f"{d / 'ae.safetensors'} does not fit the autoencoder: missing {vae_missing[:5]}, "
                             f"unexpected {vae_unexpected[:5]}")
    return _finish(model, vae, AutoTokenizer.from_pretrained(str(d)), str(d))


# ----- forward paths ------------------------------------------------------------------------------

def run_language_model(parts: BagelParts, sequence: torch.Tensor, packed: Packed, attention: str) -> torch.Tensor:
    """Hidden states ``[S, D]`` of the packed language model over ``sequence`` (input embeddings)."""
    lm = parts.language_model
    if not lm.training:
        lm.train()  # the packed forward is forward_train (module docstring)
    idx = packed.tensors(sequence.device)
    und = torch.tensor(packed.und_index, dtype=torch.long, device=sequence.device)
    gen = idx["latent_index"] if packed.latent_index else None
    mask = attention_mask(packed, attention, int(parts.config.text_config.num_attention_heads), sequence.device)
    with packed_attention(attention):
        return lm.forward_train(packed_sequence=sequence, sample_lens=list(packed.document_lens), attention_mask=mask,
                                packed_position_ids=idx["position_ids"], packed_und_token_indexes=und,
                                packed_gen_token_indexes=gen)


def _text_sequence(parts: BagelParts, packed: Packed, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    seq = torch.zeros(packed.length, parts.hidden_size, device=device, dtype=dtype)
    if packed.text_index:
        ids = torch.tensor(packed.text_ids, dtype=torch.long, device=device)
        where = torch.tensor(packed.text_index, dtype=torch.long, device=device)
        seq[where] = parts.language_model.model.embed_tokens(ids).to(dtype)
    return seq


def generation_velocity(parts: BagelParts, packed: Packed, prompt_embeds: torch.Tensor | None,
                        latent_tokens: torch.Tensor, t_tokens: torch.Tensor, latent_pos: torch.Tensor,
                        attention: str) -> torch.Tensor:
    """Velocity tokens ``[N, p*p*C]`` of a packed generation sequence (:func:`bagel.packing.pack_generation`).

    ``prompt_embeds``: ``[E, D]`` input embeddings of the prompt slots (``packed.embed_index`` order);
    ``latent_tokens`` ``[N, p*p*C]`` the noisy latent tokens ``x_t``, ``t_tokens`` ``[N]`` each token's
    ``t`` in [0, 1], ``latent_pos`` ``[N]`` their 2-D position ids. Differentiable in the generation side.
    """
    m = parts.model.model
    dtype = parts.language_model.model.embed_tokens.weight.dtype  # the model's dtype (trained tensors are fp32)
    seq = _text_sequence(parts, packed, latent_tokens.device, dtype)
    if packed.embed_index:
        if prompt_embeds is None or prompt_embeds.shape[0] != len(packed.embed_index):
            raise ValueError(f"{len(packed.embed_index)} prompt slots but embeddings "
                             f"{None if prompt_embeds is None else tuple(prompt_embeds.shape)}")
        seq = seq.index_put((torch.tensor(packed.embed_index, device=seq.device),), prompt_embeds.to(seq.dtype))
    if latent_tokens.shape[0] != len(packed.latent_index):
        raise ValueError(f"{len(packed.latent_index)} latent slots but {latent_tokens.shape[0]} latent tokens")
    x = m.vae2llm(latent_tokens) + m.time_embedder(t_tokens) + m.latent_pos_embed(latent_pos)
    seq = seq.index_put((torch.tensor(packed.latent_index, device=seq.device),), x.to(seq.dtype))
    hidden = run_language_model(parts, seq, packed, attention)
    return m.llm2vae(hidden[torch.tensor(packed.latent_index, device=seq.device)])


def vit_embeddings(parts: BagelParts, pixels: torch.Tensor, position_ids: torch.Tensor,
                   seqlens: Sequence[int]) -> torch.Tensor:
    """ViT tokens -> language-model inputs ``[T, D]``: the SigLIP tower (flash-attn on CUDA when installed,
    else :func:`bagel.backend.navit_sdpa`), the connector, the 2-D position table."""
    m = parts.model.model
    if pixels.is_cuda and has_flash_attn():
        cu = torch.nn.functional.pad(torch.tensor(list(seqlens), device=pixels.device).cumsum(0), (1, 0))
        feats = m.vit_model(packed_pixel_values=pixels, packed_flattened_position_ids=position_ids,
                            cu_seqlens=cu.to(torch.int32), max_seqlen=int(max(seqlens)))
    else:
        feats = navit_sdpa(m.vit_model, pixels, position_ids, seqlens)
    return m.connector(feats) + m.vit_pos_embed(position_ids).to(feats.dtype)


def understanding_logits(parts: BagelParts, packed: Packed, vit_embeds: torch.Tensor, attention: str) -> torch.Tensor:
    """Next-token logits ``[V]`` (float32) after the last slot of a packed understanding sequence."""
    seq = _text_sequence(parts, packed, vit_embeds.device, vit_embeds.dtype)
    seq[torch.tensor(packed.vit_index, device=seq.device)] = vit_embeds
    hidden = run_language_model(parts, seq, packed, attention)
    return parts.language_model.lm_head(hidden[-1]).float()
