"""`srum export`: a run's checkpoint as weights diffusers loads.

    srum export runs/sd35m/checkpoints                  # LoRA run -> export/step_NNNNNN/pytorch_lora_weights.safetensors
    srum export runs/sd35m/checkpoints --weights ema     # the EMA of the trained weights
    srum export runs/x/checkpoints/step_000400 --out DIR --dtype bfloat16

A LoRA run (``policy.lora_rank > 0``) gives a diffusers LoRA file (``pipe.load_lora_weights(file)`` loads it
at the trained scale alpha / r); a full fine-tune gives a ``save_pretrained`` pipeline directory
(``StableDiffusion3Pipeline.from_pretrained(dir)`` / ``FluxPipeline.from_pretrained(dir)``). The config is
the run's own ``config.yaml`` (next to ``checkpoints/``) unless ``--config`` names one; a config whose
training fields differ from the checkpoint's is refused (a wrong ``lora_alpha`` would export a wrong scale)
unless ``--allow-config-change``. Exit status: 0 done, 2 bad input (no checkpoint, no EMA, wrong config).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import DiffusersPolicyConfig, SRUMConfig
from core.config_io import ConfigError, load_config
from learner.checkpoint import CheckpointError, resolve_step_dir

__all__ = ["build_parser", "config_for_checkpoint", "export", "main"]


def run_dir_of(step_dir: Path) -> Path:
    """The run directory of a step dir (``<run>/checkpoints/step_NNNNNN``)."""
    return step_dir.parent.parent


def config_for_checkpoint(checkpoint: str | Path | None, config: str | None,
                          overrides: Sequence[str] = ()) -> tuple[SRUMConfig, str]:
    """The config to rebuild a checkpoint's policy with: ``config`` when given, else the run's ``config.yaml``
    (next to its ``checkpoints/``). Returns ``(config, where it came from)``."""
    if config is not None or checkpoint is None:
        return load_config(config, overrides), str(config or "built-in defaults")
    if not Path(checkpoint).exists():
        raise CheckpointError(f"no checkpoint at {checkpoint}: the path does not exist")
    step_dir = resolve_step_dir(checkpoint)
    found = run_dir_of(step_dir) / "config.yaml"
    if not found.is_file():
        raise ConfigError(f"no --config given and no run config at {found}: pass --config (the run's config)")
    return load_config(found, overrides), str(found)


def check_training_fields(cfg: SRUMConfig, meta: dict[str, Any], source: str, allow: bool) -> None:
    """The config must describe the checkpoint's training (policy kind, LoRA rank/alpha/targets, ...)."""
    from learner.learner import training_hash

    if meta.get("training_hash") == training_hash(cfg.policy, cfg.learner) or allow:
        return
    raise ConfigError(f"the training fields of the config ({source}) differ from those the checkpoint was trained "
                      "with (policy kind, LoRA rank/alpha/targets, model, learner recipe): use the run's own "
                      "config.yaml, or pass --allow-config-change if you know the weights fit")


def export(checkpoint: str | Path, cfg: SRUMConfig, *, weights: str = "trainable", out: str | Path | None = None,
           dtype: str | None = None, source: str = "config", allow_config_change: bool = False) -> Path:
    """Export ``checkpoint``'s ``weights`` as diffusers files; returns the LoRA file or the model directory."""
    from learner.export import export_full, export_lora, load_weights

    if not isinstance(cfg.policy, DiffusersPolicyConfig):
        raise ConfigError(f"srum export writes diffusers files; policy.kind={cfg.policy.kind!r} has no diffusers "
                          "format (its checkpoint's trainable.safetensors holds the trained tensors)")
    state, meta, step_dir = load_weights(checkpoint, weights)  # type: ignore[arg-type]
    check_training_fields(cfg, meta, source, allow_config_change)
    target = Path(out) if out else run_dir_of(step_dir) / "export" / (step_dir.name + ("-ema" if weights == "ema" else ""))
    info = {"checkpoint": str(step_dir), "step": meta.get("step"), "version": meta.get("version"), "weights": weights,
            "config": source}
    pc = cfg.policy
    if pc.lora_rank > 0:
        ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
        if ranks != {pc.lora_rank}:
            raise ConfigError(f"policy.lora_rank={pc.lora_rank} but the checkpoint's adapters have rank {sorted(ranks)}")
        return export_lora(pc, state, target, dtype=dtype or "float32", info=info)
    from srum.registry import compose

    parts = compose(cfg.model_copy(update={"policy": pc.model_copy(update={"offload_text_encoders": False}),
                                           "run": cfg.run.model_copy(update={"eval_every": 0})}))
    policy = parts.policy(seed=int(meta.get("seed", cfg.run.seed)))
    try:
        policy.load_trainable_state(state, int(meta.get("version", 0)))
    except ValueError as exc:
        raise ConfigError(f"{step_dir}: {exc}") from exc
    return export_full(policy, target, dtype=dtype, info=info)


def build_parser(prog: str = "python -m srum.export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Export a checkpoint as a diffusers LoRA file or model directory.")
    p.add_argument("checkpoint", help="checkpoint root (<run>/checkpoints, follows 'latest') or a step dir")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--config", "-c", default=None, help="the run's config (default: <run>/config.yaml)")
    p.add_argument("--weights", choices=("trainable", "ema"), default="trainable",
                   help="the trained weights or their EMA (default: trainable)")
    p.add_argument("--out", default=None, help="output dir (default: <run>/export/<step>[-ema])")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="saved dtype (default: float32 for LoRA, the policy's dtype for a full model)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="export although the config's training fields differ from the checkpoint's")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m srum.export") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    try:
        cfg, source = config_for_checkpoint(args.checkpoint, args.config, args.overrides)
        path = export(args.checkpoint, cfg, weights=args.weights, out=args.out, dtype=args.dtype, source=source,
                      allow_config_change=args.allow_config_change)
    except (ConfigError, CheckpointError, ValueError) as exc:
        print(f"srum export: {exc}", file=sys.stderr)
        return 2
    cls = "StableDiffusion3Pipeline" if cfg.policy.kind == "sd3" else "FluxPipeline"
    if path.is_file():
        print(f"srum export: LoRA -> {path}\n  load with: pipe = {cls}.from_pretrained(<base>); "
              f"pipe.load_lora_weights({str(path)!r})")
    else:
        print(f"srum export: model -> {path}\n  load with: pipe = {cls}.from_pretrained({str(path)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
