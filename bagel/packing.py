"""NaViT packing of Bagel sequences, and the latent <-> token layout (pure functions, no model).

Bagel runs a batch as one packed sequence: documents end to end, each made of *splits* with an
attention mode (``causal`` text, ``full`` ViT images, ``noise`` images being generated) and a RoPE
position per token. The layouts follow Bagel's own inference (the released ``inferencer.py``):

- **generation** (one document per sample): ``[<|im_start|>, prompt..., <|im_end|>]`` at positions
  ``0..L-1`` (causal), then ``[<|vision_start|>, latent tokens..., <|vision_end|>]``, every one at
  position ``L`` (a ``noise`` split: bidirectional inside, invisible to every other split). The
  text-unconditional branch of classifier-free guidance is the image split alone, at position 0.
- **understanding** (one document): the image ``[<|vision_start|>, ViT tokens..., <|vision_end|>]`` at
  position 0 (``full``), the request ``[<|im_start|>, text..., <|im_end|>]`` from position 1 (causal),
  then the answer ``[<|im_start|>, answer...]`` continuing the positions (causal).

Latents: ``x0`` is the VAE latent ``[C, h, w]`` (the scaled FLUX-VAE space Bagel's flow trains in);
each ``p x p`` patch becomes one token of ``p * p * C`` values ordered ``(row-in-patch, col-in-patch,
channel)``, the order of the checkpoint's ``vae2llm`` / ``llm2vae`` projections. A token's 2-D position
id is ``row * max_latent_size + col`` on the patch grid (the ``extrapolate`` ids of Bagel's data code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["AttnMode", "Packed", "SpecialTokens", "grid_position_ids", "pack_generation", "pack_understanding",
           "patchify", "unpatchify"]

AttnMode = str  # "causal" | "full" | "noise"
ATTN_MODES = ("causal", "full", "noise")


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids that frame Bagel's sequences (from its Qwen2 tokenizer)."""

    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>

    NAMES = {"bos": "<|im_start|>", "eos": "<|im_end|>", "start_of_image": "<|vision_start|>",
             "end_of_image": "<|vision_end|>"}

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """Look the four tokens up; a tokenizer that lacks one is not a Bagel tokenizer (error)."""
        ids, missing = {}, []
        for key, token in cls.NAMES.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
                missing.append(token)
            ids[key] = tid
        if missing:
            raise ValueError(f"tokenizer has no {missing}: Bagel needs <|im_start|>, <|im_end|>, <|vision_start|> "
                             "and <|vision_end|> as single tokens")
        return cls(**ids)


@dataclass
class Packed:
    """One packed sequence: where each kind of token goes, its RoPE position, and the attention splits."""

    length: int = 0
    text_ids: list[int] = field(default_factory=list)
    text_index: list[int] = field(default_factory=list)
    embed_index: list[int] = field(default_factory=list)
    latent_index: list[int] = field(default_factory=list)
    vit_index: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    document_lens: list[int] = field(default_factory=list)
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[AttnMode] = field(default_factory=list)

    def add_split(self, kinds: Sequence[str], ids: Sequence[int | None], position: int | Sequence[int],
                  mode: AttnMode) -> None:
        """Append one split: ``kinds[i]`` is ``text`` (token ``ids[i]``), ``embed`` (a text slot whose input
        embedding the caller supplies: the prompt), ``latent`` or ``vit``; ``position`` is one RoPE
        position for all its tokens or one per token."""
        if mode not in ATTN_MODES:
            raise ValueError(f"attention mode must be one of {ATTN_MODES}, got {mode!r}")
        if len(kinds) != len(ids) or not kinds:
            raise ValueError(f"a split needs one id per token and at least one token ({len(kinds)}, {len(ids)})")
        positions = [position] * len(kinds) if isinstance(position, int) else list(position)
        if len(positions) != len(kinds):
            raise ValueError(f"{len(positions)} positions for {len(kinds)} tokens")
        for kind, tid in zip(kinds, ids, strict=True):
            slot = self.length
            if kind == "text":
                self.text_ids.append(int(tid))
                self.text_index.append(slot)
            elif kind == "embed":
                self.embed_index.append(slot)
            elif kind == "latent":
                self.latent_index.append(slot)
            elif kind == "vit":
                self.vit_index.append(slot)
            else:
                raise ValueError(f"token kind must be text, embed, latent or vit, got {kind!r}")
            self.length += 1
        self.position_ids.extend(positions)
        self.split_lens.append(len(kinds))
        self.attn_modes.append(mode)

    def end_document(self, start: int) -> None:
        """Close the document that began at slot ``start``."""
        if self.length <= start:
            raise ValueError("empty document")
        self.document_lens.append(self.length - start)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The index tensors the model's packed forward takes (long, on ``device``)."""
        def t(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        return {"text_ids": t(self.text_ids), "text_index": t(self.text_index), "embed_index": t(self.embed_index),
                "latent_index": t(self.latent_index), "vit_index": t(self.vit_index),
                "position_ids": t(self.position_ids)}

    @property
    def und_index(self) -> list[int]:
        """Slots routed to the understanding experts: text, prompt and ViT tokens (latents go to ``*_moe_gen``)."""
        return sorted(self.text_index + self.embed_index + self.vit_index)


def _image_split(packed: Packed, tokens: SpecialTokens, n: int, kind: str, position: int, mode: AttnMode) -> None:
    kinds = ["text"] + [kind] * n + ["text"]
    ids: list[int | None] = [tokens.start_of_image] + [None] * n + [tokens.end_of_image]
    packed.add_split(kinds, ids, position, mode)


def pack_generation(prompt_lens: Sequence[int | None], n_latent: int, tokens: SpecialTokens) -> Packed:
    """One generation document per entry of ``prompt_lens``: the length of its framed prompt
    ``[<|im_start|>, prompt..., <|im_end|>]`` (``embed`` slots: the caller supplies their embeddings) or
    ``None`` for the text-unconditional CFG branch; each with ``n_latent`` latent tokens (module docstring)."""
    if n_latent < 1 or not prompt_lens:
        raise ValueError(f"need at least one prompt and one latent token, got {len(prompt_lens)} and {n_latent}")
    packed = Packed()
    for n_text in prompt_lens:
        start, position = packed.length, 0
        if n_text is not None:
            if n_text < 2:
                raise ValueError(f"a framed prompt has at least <|im_start|> and <|im_end|>, got length {n_text}")
            packed.add_split(["embed"] * n_text, [None] * n_text, list(range(n_text)), "causal")
            position = n_text
        _image_split(packed, tokens, n_latent, "latent", position, "noise")
        packed.end_document(start)
    return packed


def pack_understanding(n_vit: int, request: Sequence[int], answer: Sequence[int], tokens: SpecialTokens) -> Packed:
    """One understanding document: the image (``n_vit`` ViT tokens), the request, the answer so far."""
    if n_vit < 1:
        raise ValueError("an understanding request needs at least one ViT token")
    packed = Packed()
    _image_split(packed, tokens, n_vit, "vit", 0, "full")
    text = [tokens.bos, *request, tokens.eos]
    packed.add_split(["text"] * len(text), text, list(range(1, 1 + len(text))), "causal")
    reply = [tokens.bos, *answer]
    first = 1 + len(text)
    packed.add_split(["text"] * len(reply), reply, list(range(first, first + len(reply))), "causal")
    packed.end_document(0)
    return packed


def dense_attention_mask(document_lens: Sequence[int], split_lens: Sequence[int], attn_modes: Sequence[AttnMode],
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """``[S, S]`` bool mask (True = query row may attend to key column) of a packed sequence.

    The rule of Bagel's packed attention: causal everywhere, bidirectional inside a ``full`` or
    ``noise`` split, a ``noise`` split's keys visible only from inside that split, never across
    documents. (Checked against the package's ``create_sparse_mask`` in the tests.)
    """
    if sum(document_lens) != sum(split_lens):
        raise ValueError(f"documents cover {sum(document_lens)} tokens, splits {sum(split_lens)}")
    if len(split_lens) != len(attn_modes):
        raise ValueError(f"{len(split_lens)} splits but {len(attn_modes)} attention modes")
    lens = torch.tensor(list(split_lens), device=device)
    split = torch.repeat_interleave(torch.arange(len(split_lens), device=device), lens)
    bidir = torch.tensor([m in ("full", "noise") for m in attn_modes], device=device)[split]
    noise = torch.tensor([m == "noise" for m in attn_modes], device=device)[split]
    doc = torch.repeat_interleave(torch.arange(len(document_lens), device=device),
                                  torch.tensor(list(document_lens), device=device))
    idx = torch.arange(split.numel(), device=device)
    same_split = split[:, None] == split[None, :]
    allowed = (idx[:, None] >= idx[None, :]) | (same_split & bidir[:, None])
    allowed &= ~noise[None, :] | same_split
    return allowed & (doc[:, None] == doc[None, :])


def grid_position_ids(rows: int, cols: int, max_per_side: int) -> torch.Tensor:
    """Flattened 2-D position ids ``row * max_per_side + col`` of a ``rows x cols`` patch grid."""
    if rows > max_per_side or cols > max_per_side:
        raise ValueError(f"a {rows}x{cols} patch grid exceeds the model's {max_per_side} positions per side")
    r = torch.arange(rows)[:, None] * max_per_side
    return (r + torch.arange(cols)[None, :]).flatten()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/p)*(w/p), p*p*C]`` tokens ordered (row-in-patch, col-in-patch, channel)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latent {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, (h/p)*(w/p), p*p*C]`` -> ``[B, C, h, w]``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h, w)
