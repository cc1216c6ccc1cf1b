"""`srum export` and EMA: a LoRA run exports a file diffusers' `load_lora_weights` loads at the trained scale
(alpha / r), a full fine-tune a `save_pretrained` directory, both reproducing the learner's velocity on the
tiny SD3 and FLUX; EMA weights (with the warm-up) on request; clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors import safe_open

from core.config_io import config_to_yaml, load_config
from core.records import TrainBatch
from learner.learner import Learner, ema_decay_at
from learner.policy import DiffusersPolicy
from learner.tiny import build_tiny
from srum.export import main as export_main

PROMPTS = ["a red cube left of a blue ball", "two green cats"]
PIPES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


def batch(i: int) -> TrainBatch:
    g = torch.Generator().manual_seed(i)
    return TrainBatch(PROMPTS, torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, 32, 32, generator=g),
                      torch.ones(2))


def trained_run(root: Path, kind: str, lora_rank: int, steps: int = 3, **extra: str) -> tuple[Learner, Path]:
    """A run dir with config.yaml and a checkpoint after ``steps`` learner steps (lr high enough to move)."""
    overrides = [f"policy.kind={kind}", f"policy.lora_rank={lora_rank}", "policy.lora_alpha=16", "policy.device=cpu",
                 "learner.lr=1e-2", "learner.warmup_steps=0", "learner.ema_decay=0.9", f"run.output_dir={root}",
                 "run.name=r", *(f"{k}={v}" for k, v in extra.items())]
    cfg = load_config(None, overrides)
    learner = Learner(cfg, DiffusersPolicy.from_config(cfg.policy, seed=cfg.run.seed))
    for i in range(steps):
        assert not learner.train_step(batch(i))["skipped"]
    run = root / "r"
    learner.checkpoint(run / "checkpoints")
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    return learner, run


def velocity(policy: DiffusersPolicy) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 32, 32, generator=g)
    with torch.no_grad():
        return policy.velocity(x, torch.tensor([0.3, 0.8]), PROMPTS)


def with_state(kind: str, state: dict, lora_rank: int) -> DiffusersPolicy:
    pol = DiffusersPolicy(build_tiny(kind, 0), kind, lora_rank=lora_rank, lora_alpha=16.0)
    pol.load_trainable_state(state)
    return pol


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_export_loads_in_diffusers_with_the_trained_scale(tmp_path, kind):
    learner, run = trained_run(tmp_path, kind, lora_rank=4)  # alpha 16 / r 4: scale 4, not diffusers' default 1
    assert export_main([str(run / "checkpoints")]) == 0
    out = run / "export" / "step_000003"
    file = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == 16.0 and adapter["transformer.r"] == 4

    trained = velocity(learner.policy)
    fresh = build_tiny(kind, 0)
    fresh.load_lora_weights(str(file))  # the path users take
    loaded = velocity(DiffusersPolicy(fresh, kind))
    base = velocity(DiffusersPolicy(build_tiny(kind, 0), kind))
    assert (loaded - trained).abs().max().item() <= 1e-5
    assert (trained - base).abs().max().item() > 1e-3  # the adapter changed the model

    # the same tensors without the adapter metadata load at scale 1: the alpha really is carried by the file
    bare = build_tiny(kind, 0)
    bare.load_lora_weights({k: v for k, v in _tensors(file).items()})
    assert (velocity(DiffusersPolicy(bare, kind)) - trained).abs().max().item() > 1e-4


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_full_finetune_exports_a_save_pretrained_directory(tmp_path, kind):
    learner, run = trained_run(tmp_path, kind, lora_rank=0, steps=2)
    out = tmp_path / "model"
    assert export_main([str(run / "checkpoints"), "--out", str(out)]) == 0
    pipe = PIPES[kind].from_pretrained(str(out))
    loaded = DiffusersPolicy(pipe, kind)
    assert (velocity(loaded) - velocity(learner.policy)).abs().max().item() <= 1e-5
    exported = dict(pipe.transformer.named_parameters())
    for name, p in learner.policy.named_trainable_parameters().items():
        assert torch.equal(exported[name].detach(), p.detach()), name


def test_ema_export_and_warmup(tmp_path):
    learner, run = trained_run(tmp_path, "sd3", lora_rank=4, steps=3, **{"learner.ema_decay": "0.9999"})
    assert [round(ema_decay_at(s, 0.9999, 10), 4) for s in range(3)] == [0.1, 0.1818, 0.25]
    assert ema_decay_at(10_000_000, 0.9999, 10) == 0.9999 and ema_decay_at(0, 0.9, 0) == 0.9
    ema = learner.ema_state()
    trained = learner.policy.trainable_state()[1]
    # after 3 steps with the warm-up, the EMA has moved most of the way from the base (B = 0) to the weights
    b_keys = [k for k in ema if ".lora_B." in k]
    moved = sum(ema[k].abs().sum() for k in b_keys) / sum(trained[k].abs().sum() for k in b_keys)
    assert 0.3 < float(moved) < 1.0
    assert export_main([str(run / "checkpoints"), "--weights", "ema", "--out", str(tmp_path / "ema")]) == 0
    fresh = build_tiny("sd3", 0)
    fresh.load_lora_weights(str(tmp_path / "ema" / "pytorch_lora_weights.safetensors"))
    expected = velocity(with_state("sd3", ema, 4))
    assert (velocity(DiffusersPolicy(fresh, "sd3")) - expected).abs().max().item() <= 1e-5


def test_export_errors_are_clear(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    _, run = trained_run(tmp_path, "sd3", lora_rank=4, steps=1, **{"learner.ema_decay": "null"})
    assert export_main([str(run / "checkpoints"), "--weights", "ema"]) == 2
    assert "has no EMA weights" in capsys.readouterr().err
    assert export_main([str(run / "checkpoints"), "policy.lora_alpha=8"]) == 2  # would export a wrong scale
    assert "training fields of the config" in capsys.readouterr().err
    assert export_main([str(run / "checkpoints"), "policy.kind=shapes"]) == 2
    assert "diffusers" in capsys.readouterr().err
