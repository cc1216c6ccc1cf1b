"""Where a diffusers policy's modules live, and the GPU memory plan of the real-model configs.

Placement. A rectified-flow pipeline has three kinds of modules: the denoiser (``transformer``), the
``vae`` and the text encoders (SD3: two CLIPs and T5-XXL; FLUX: CLIP-L and T5-XXL). Sampling and training
need the text encoders only to embed prompts; once a run's prompts are embedded and cached
(:meth:`learner.policy.DiffusersPolicy.precompute_prompts`) they can leave the GPU. :func:`placement` says
where each module goes, :func:`apply_placement` moves them, :func:`module_devices` reports where they are
(what the tests check on tiny models: the logic takes device strings, so ``"cuda"`` plans and ``"meta"``
moves can be checked on a CPU-only machine).

Memory plan. :data:`MEMORY_PLANS` is the per-role budget (GiB, bf16 weights) of
``configs/sd35_medium_vllm.yaml`` and ``configs/flux_dev_vllm.yaml`` on one 80 GiB GPU worker; the GPU
fractions of ``docker-compose.yml``'s job and of the KubeRay manifest follow from it (``tests/test_gpu_configs.py``
checks they add up and cover each role's steady state). Figures: parameter counts times 2 bytes (bf16),
plus activation allowances of the order seen for these models at 512 px, gradient checkpointing on; the
text encoders, on the GPU only while they embed the prompt set at start (before the denoiser is placed), are
listed separately as ``transient``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MEMORY_PLANS", "TEXT_ENCODERS", "RolePlan", "apply_placement", "configure_memory", "module_devices",
           "placement"]

TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attribute names of the text encoders (FLUX has the first two, SD3 all three)."""


def _modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def module_devices(pipe: Any) -> dict[str, str]:
    """``{component name: device of its first parameter}`` for every module of ``pipe``."""
    out = {}
    for name, module in _modules(pipe).items():
        param = next(module.parameters(), None)
        out[name] = str(param.device) if param is not None else "none"
    return out


def placement(names: Any, device: str | torch.device, offload_text_encoders: bool,
              offload_device: str | torch.device = "cpu") -> dict[str, str]:
    """Target device of each module name in ``names`` (a pipeline or an iterable of names): the text
    encoders go to ``offload_device`` when ``offload_text_encoders``, everything else to ``device``."""
    keys = list(_modules(names)) if hasattr(names, "components") else list(names)
    return {n: str(offload_device if offload_text_encoders and n in TEXT_ENCODERS else device) for n in keys}


def apply_placement(pipe: Any, plan: Mapping[str, str]) -> dict[str, str]:
    """Move each module of ``pipe`` named in ``plan`` to its device; returns :func:`module_devices`.

    A name the pipeline does not have is an error (a plan for another pipeline)."""
    modules = _modules(pipe)
    unknown = sorted(set(plan) - set(modules))
    if unknown:
        raise ValueError(f"placement names modules this pipeline does not have: {unknown} (has {sorted(modules)})")
    for name, dev in plan.items():
        modules[name].to(torch.device(dev))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return module_devices(pipe)


def configure_memory(pipe: Any, *, vae_tiling: bool = False, vae_slicing: bool = False,
                     gradient_checkpointing: bool = False) -> dict[str, bool]:
    """Switch VAE tiling / slicing and the denoiser's gradient checkpointing; returns what is on."""
    vae, transformer = pipe.vae, pipe.transformer
    (vae.enable_tiling if vae_tiling else vae.disable_tiling)()
    (vae.enable_slicing if vae_slicing else vae.disable_slicing)()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    elif getattr(transformer, "gradient_checkpointing", False):
        transformer.disable_gradient_checkpointing()
    return {"vae_tiling": bool(vae.use_tiling), "vae_slicing": bool(vae.use_slicing),
            "gradient_checkpointing": bool(getattr(transformer, "gradient_checkpointing", False))}


# ------------------------------------------------------------------------------------------ memory plan
@dataclass(frozen=True)
class RolePlan:
    """One role's GPU budget in GiB: ``steady`` (its parts while the loop runs) and ``transient`` (extra
    memory at start, e.g. text encoders while embedding the prompt set)."""

    parts: Mapping[str, float]
    transient: Mapping[str, float] = field(default_factory=dict)

    @property
    def steady(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def peak(self) -> float:
        """The most the role holds at once: the text encoders embed the prompt set before the denoiser is
        placed (:class:`learner.policy.DiffusersPolicy`), so the peak is the larger phase, not their sum."""
        if not self.transient:
            return self.steady
        return max(self.steady, float(sum(self.transient.values())) + CONTEXT_GB)


CONTEXT_GB = 3.0  # CUDA context and allocator slack of one process
_SD3_TEXT = {"CLIP-L + CLIP-G (0.8 B)": 1.6, "T5-XXL encoder (4.8 B)": 9.5}
_FLUX_TEXT = {"CLIP-L (0.12 B)": 0.3, "T5-XXL encoder (4.8 B)": 9.5}
_SAM_H = {"SAM ViT-H (0.64 B, fp32)": 2.5, "mask generator batch (32x32 points)": 4.0}

MEMORY_PLANS: dict[str, dict[str, RolePlan]] = {
    "sd35_medium": {
        # SD3.5-medium: MMDiT-X 2.5 B parameters, VAE 84 M
        "learner": RolePlan({"transformer (2.5 B, bf16, frozen)": 5.0, "LoRA r=64 + AdamW (fp32)": 0.6,
                             "activations (batch 4, 512 px, checkpointed)": 6.0, "VAE (unused, bf16)": 0.2,
                             "CUDA context + allocator slack": 3.0}, _SD3_TEXT),
        "sampler": RolePlan({"transformer (2.5 B, bf16)": 5.0, "VAE (bf16)": 0.2,
                             "activations (batch 4 x CFG 2, 512 px)": 3.0, "VAE decode (sliced, tiled)": 1.0,
                             "CUDA context + allocator slack": 3.0}, _SD3_TEXT),
        "scorer": RolePlan({**_SAM_H, "CUDA context + allocator slack": 2.0}),
    },
    "flux_dev": {
        # FLUX.1-dev: 12 B parameter transformer, VAE 84 M
        "learner": RolePlan({"transformer (12 B, bf16, frozen)": 23.8, "LoRA r=32 + AdamW (fp32)": 0.6,
                             "activations (batch 2, 512 px, checkpointed)": 8.0, "VAE (unused, bf16)": 0.2,
                             "CUDA context + allocator slack": 3.0}, _FLUX_TEXT),
        "sampler": RolePlan({"transformer (12 B, bf16)": 23.8, "VAE (bf16)": 0.2,
                             "activations (batch 2, 512 px, guidance-distilled: no CFG)": 2.0,
                             "VAE decode (sliced, tiled)": 1.0, "CUDA context + allocator slack": 3.0}, _FLUX_TEXT),
        "scorer": RolePlan({**_SAM_H, "CUDA context + allocator slack": 2.0}),
    },
}
"""Per-role GPU budgets (GiB) of the two GPU configs; see the module docstring."""
