"""Weights users can load: a checkpoint's trainable (or EMA) tensors as a diffusers LoRA file or a
``save_pretrained`` model directory.

* **LoRA** (``policy.lora_rank > 0``): the checkpoint stores peft's adapter keys without the adapter name
  (``transformer_blocks.0.attn.to_q.lora_A.weight``) and no alpha. :func:`export_lora` writes them with the
  pipeline class's own ``save_lora_weights``: keys get the ``transformer.`` prefix and the adapter's
  ``LoraConfig`` (rank, ``lora_alpha``, target modules) goes into the safetensors metadata
  (``lora_adapter_metadata``), which ``load_lora_weights`` reads back, so the adapter loads at the scale it
  trained with, ``lora_alpha / r`` (without the metadata diffusers would assume alpha = r, i.e. scale 1).
* **Full fine-tuning**: :func:`export_full` writes the whole pipeline with the trained transformer through
  ``save_pretrained`` (safetensors, in the policy's dtype), loadable with ``from_pretrained``.

:func:`load_weights` reads only what an export or an evaluation needs (``trainable.safetensors`` or
``ema.safetensors`` and ``meta.json``), checks the file's sha256 and names the file in every error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig
from safetensors.torch import load_file

from core.config import DiffusersPolicyConfig
from learner.base import DTYPES
from learner.checkpoint import (
    EMA_FILE,
    TRAINABLE_FILE,
    CheckpointError,
    file_sha256,
    read_meta,
    resolve_step_dir,
)

__all__ = ["LORA_WEIGHT_NAME", "PROVENANCE_FILE", "Weights", "export_full", "export_lora", "load_weights",
           "lora_config"]

Weights = Literal["trainable", "ema"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(dir) finds it
PROVENANCE_FILE = "srum_export.json"


def _pipeline_class(kind: str) -> Any:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    classes = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
    if kind not in classes:
        raise ValueError(f"srum export writes diffusers files for policy.kind 'sd3' or 'flux', not {kind!r}")
    return classes[kind]


def lora_config(rank: int, alpha: float, target_modules: Any) -> LoraConfig:
    """The peft adapter config a LoRA policy trains with (and the one written into an exported file)."""
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(target_modules), init_lora_weights=True)


def load_weights(path: str | Path, weights: Weights = "trainable") -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """``(tensors, meta, step_dir)`` of a checkpoint root (follows ``latest``) or step dir: the trained
    weights (``trainable``) or their EMA (``ema``). Raises :class:`CheckpointError` naming the file for a
    missing checkpoint, a checkpoint without EMA, or a corrupted file."""
    if weights not in ("trainable", "ema"):
        raise ValueError(f"weights must be 'trainable' or 'ema', got {weights!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    step_dir = resolve_step_dir(path)
    meta = read_meta(step_dir)
    name = TRAINABLE_FILE if weights == "trainable" else EMA_FILE
    if weights == "ema" and not meta.get("ema"):
        raise CheckpointError(f"{step_dir} has no EMA weights ({EMA_FILE}): the run had learner.ema_decay null; "
                              "use the trained weights instead")
    file = step_dir / name
    digest = meta["files"].get(name)
    if not file.is_file() or digest is None:
        raise CheckpointError(f"checkpoint file missing: {file}")
    if file_sha256(file) != digest:
        raise CheckpointError(f"checkpoint file corrupted (sha256 mismatch): {file}")
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot load {file}: {type(exc).__name__}: {exc}") from exc
    return tensors, meta, step_dir


def _provenance(out_dir: Path, info: Mapping[str, Any]) -> None:
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(dict(info), indent=1, default=str), encoding="utf-8")


def export_lora(policy_cfg: DiffusersPolicyConfig, state: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                dtype: str = "float32", weight_name: str = LORA_WEIGHT_NAME,
                info: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` (peft adapter keys, adapter name stripped) as a diffusers LoRA file in ``out_dir``;
    returns the file. ``pipe.load_lora_weights(file)`` loads it at scale ``lora_alpha / lora_rank``."""
    if policy_cfg.lora_rank <= 0:
        raise ValueError("export_lora needs a LoRA run (policy.lora_rank > 0); a full fine-tune exports a model "
                         "directory (export_full)")
    bad = sorted(k for k in state if ".lora_A." not in k and ".lora_B." not in k)
    if bad:
        raise ValueError(f"not LoRA adapter tensors (e.g. {bad[:3]}): is the checkpoint from a full fine-tune?")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(policy_cfg.lora_rank, policy_cfg.lora_alpha, policy_cfg.lora_target_modules).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    layers = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    _pipeline_class(policy_cfg.kind).save_lora_weights(
        str(out), transformer_lora_layers=layers, transformer_lora_adapter_metadata=cfg, weight_name=weight_name)
    _provenance(out, {"format": "diffusers-lora", "file": weight_name, "kind": policy_cfg.kind,
                      "rank": policy_cfg.lora_rank, "alpha": policy_cfg.lora_alpha,
                      "scale": policy_cfg.lora_alpha / policy_cfg.lora_rank,
                      "target_modules": list(policy_cfg.lora_target_modules), "dtype": dtype, **(info or {})})
    return out / weight_name


def export_full(policy: Any, out_dir: str | Path, *, dtype: str | None = None,
                info: Mapping[str, Any] | None = None) -> Path:
    """Write ``policy``'s pipeline (its transformer holding the weights to export) with ``save_pretrained``;
    ``dtype`` (default: the policy's) is the transformer's saved dtype. Returns ``out_dir``."""
    if getattr(policy, "lora_rank", 0) > 0:
        raise ValueError("export_full is for full fine-tunes; a LoRA run exports a LoRA file (export_lora)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = policy.pipe
    target = DTYPES[dtype] if dtype else policy.dtype
    originals = {n: p.data for n, p in pipe.transformer.named_parameters()}
    try:
        for p in pipe.transformer.parameters():  # master weights are fp32; save in the pipeline's dtype
            p.data = p.data.to(target)
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        for n, p in pipe.transformer.named_parameters():
            p.data = originals[n]
    _provenance(out, {"format": "diffusers-pipeline", "kind": getattr(policy, "kind", None),
                      "dtype": str(target).removeprefix("torch."), **(info or {})})
    return out
