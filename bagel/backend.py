"""The Bagel modelling package, and attention kernels that run where the package's do not.

srum's Bagel runs on ``nemo-automodel``'s modelling code (``pip install --no-deps
nemo-automodel==0.7.0 einops``; the package pins ``transformers==5.18.0`` and GPU-only dependencies,
none of which its Bagel modules import). Two of the package's kernels do not run on a CPU:

- the language model's packed attention calls a ``torch.compile``'d ``flex_attention``; on a CPU it
  compiles (about a minute) and then fails in backward (``NotImplementedError: FlexAttention does not
  support backward on CPU``); its other packed path (per-sample masks) forces the
  ``EFFICIENT_ATTENTION`` SDPA kernel, which a CPU does not have;
- the SigLIP-NaViT vision tower calls ``flash_attn.flash_attn_varlen_func`` (CUDA only).

The kernels are chosen per model (``attention``: ``auto`` = ``flex`` on CUDA, ``sdpa`` elsewhere):

- ``flex``: the package's own kernels, a flex-attention ``BlockMask`` built eagerly (``_compile=False``).
- ``sdpa``: the **one explicit patch** in srum: :func:`packed_attention` swaps the package's module
  attribute ``modeling_qwen2_packed._flex_attention`` for :func:`sdpa_packed_attention` (the same
  attention, computed by ``scaled_dot_product_attention`` with the dense packed mask of
  :func:`bagel.packing.dense_attention_mask`) for the duration of srum's own forward calls, and
  restores it afterwards (reference-counted, so concurrent callers in one process share it). The
  vision tower runs through :func:`navit_sdpa`, srum's loop over the package's SigLIP layers with SDPA
  per image, whenever flash-attn is not importable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bagel.packing import Packed, dense_attention_mask

__all__ = ["ATTENTION_KINDS", "BagelUnavailable", "attention_mask", "has_flash_attn", "nemo_bagel", "navit_sdpa",
           "packed_attention", "resolve_attention", "sdpa_packed_attention"]

ATTENTION_KINDS = ("auto", "sdpa", "flex")
PACKAGE_HINT = ("pip install --no-deps 'nemo-automodel==0.7.0' einops   "
                "(or `pip install -e '.[bagel]'` and that line; see README 'Model families')")


class BagelUnavailable(ImportError):
    """The Bagel modelling package (nemo-automodel) is not importable; the message says how to install it."""


def nemo_bagel() -> Any:
    """The package's Bagel module (``nemo_automodel.components.models.bagel``), or a clear error."""
    try:
        return importlib.import_module("nemo_automodel.components.models.bagel")
    except ImportError as exc:
        raise BagelUnavailable(f"Bagel needs the modelling package nemo-automodel ({exc}); install it with: "
                               f"{PACKAGE_HINT}") from exc


def _qwen_module() -> Any:
    nemo_bagel()
    return importlib.import_module("nemo_automodel.components.models.bagel.modeling_qwen2_packed")


def has_flash_attn() -> bool:
    """True when ``flash_attn`` is importable (the package's SigLIP path needs it, on CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(kind: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA, ``sdpa`` elsewhere; ``flex`` off CUDA is refused (no CPU backward)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    if kind == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if kind == "flex" and device.type != "cuda":
        raise ValueError("attention='flex' needs CUDA: torch's FlexAttention has no backward on CPU "
                         "(use 'sdpa' or 'auto')")
    return kind


# ----- the packed language-model attention --------------------------------------------------------

def attention_mask(packed: Packed, kind: str, num_heads: int, device: torch.device) -> Any:
    """The ``attention_mask`` argument of the package's packed forward for ``packed``: a dense bool
    ``[S, S]`` tensor for ``sdpa``; a flex-attention ``BlockMask`` (built eagerly) for ``flex``."""
    if kind == "sdpa":
        return dense_attention_mask(packed.document_lens, packed.split_lens, packed.attn_modes, device)
    if kind != "flex":
        raise ValueError(f"attention kind must be 'sdpa' or 'flex' (resolved), got {kind!r}")
    from torch.nn.attention.flex_attention import create_block_mask

    masks = importlib.import_module("nemo_automodel.components.models.bagel.attention_masks")
    mod = masks.create_sparse_mask(packed.document_lens, packed.split_lens, packed.attn_modes, device)
    return create_block_mask(mod, B=1, H=num_heads, Q_LEN=packed.length, KV_LEN=packed.length, device=device,
                             BLOCK_SIZE=128, _compile=False)


def sdpa_packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, block_mask: Any,
                          enable_gqa: bool = False, **kwargs: Any) -> torch.Tensor:
    """Stand-in for the package's compiled ``flex_attention(q, k, v, block_mask=..., enable_gqa=...)``:
    ``[1, H, S, D]`` queries, ``[1, Hkv, S, D]`` keys/values; ``block_mask`` is the dense bool mask of
    :func:`attention_mask` (a flex ``BlockMask`` is materialised from its ``mask_mod``)."""
    if kwargs:
        raise TypeError(f"sdpa_packed_attention does not implement flex_attention options {sorted(kwargs)}")
    mask = block_mask
    if not isinstance(mask, torch.Tensor):
        from torch.nn.attention.flex_attention import create_mask

        q_len, kv_len = query.shape[-2], key.shape[-2]
        mask = create_mask(block_mask.mask_mod, 1, 1, q_len, kv_len, query.device)[0, 0]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.device), enable_gqa=enable_gqa)


_patch_lock = threading.Lock()
_patch_users = 0
_patch_saved: Any = None


@contextlib.contextmanager
def packed_attention(kind: str) -> Iterator[None]:
    """Run the package's packed language model with ``kind``'s kernel inside this block (module docstring).

    ``flex`` changes nothing. ``sdpa`` installs :func:`sdpa_packed_attention` as the package's
    ``modeling_qwen2_packed._flex_attention`` while at least one caller is inside, then restores it.
    """
    if kind == "flex":
        yield
        return
    if kind != "sdpa":
        raise ValueError(f"attention kind must be 'sdpa' or 'flex' (resolved), got {kind!r}")
    global _patch_users, _patch_saved
    module = _qwen_module()
    with _patch_lock:
        if _patch_users == 0:
            _patch_saved = module._flex_attention
            module._flex_attention = sdpa_packed_attention  # the explicit patch (module docstring)
        _patch_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                module._flex_attention = _patch_saved
                _patch_saved = None


# ----- the vision tower ---------------------------------------------------------------------------

def _segments_mask(seqlens: Sequence[int], device: torch.device) -> torch.Tensor:
    """Block-diagonal bool mask: a ViT token attends to the tokens of its own image only."""
    ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device),
                                  torch.tensor(list(seqlens), device=device))
    return ids[:, None] == ids[None, :]


def navit_sdpa(vit_model: torch.nn.Module, pixels: torch.Tensor, position_ids: torch.Tensor,
               seqlens: Sequence[int]) -> torch.Tensor:
    """The package's SigLIP-NaViT tower over packed patches ``[T, 3*P*P]``, with SDPA per image instead
    of ``flash_attn_varlen_func``: embeddings, each encoder layer (pre-norm attention and MLP with their
    residuals), post layer norm. Bagel's tower has no 2-D RoPE (``vit_rope=False``); one that has is refused."""
    vm = vit_model.vision_model
    if getattr(vm.config, "rope", False):
        raise NotImplementedError("navit_sdpa implements the RoPE-free SigLIP tower Bagel uses (vit_rope=False)")
    h = vm.embeddings(packed_pixel_values=pixels, packed_flattened_position_ids=position_ids)
    mask = _segments_mask(seqlens, h.device)
    t = h.shape[0]
    for layer in vm.encoder.layers:
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        q, k, v = (proj(x).view(t, attn.num_heads, attn.head_dim).transpose(0, 1)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        h = h + attn.out_proj(out.transpose(0, 1).reshape(t, -1))
        h = h + layer.mlp(layer.layer_norm2(h))
    return vm.post_layernorm(h)
