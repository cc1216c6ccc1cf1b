"""The GPU-ready configs (SD3.5-medium, FLUX.1-dev) and what makes them fit: bf16, prompt embeddings
precomputed then the text encoders off the GPU, VAE tiling/slicing, gradient checkpointing, EMA, and a memory
plan whose per-role budgets the GPU fractions (config, docker-compose) cover. Placement is checked on the tiny
models with device strings (this machine has no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import learner.policy as policy_module
from core.config_io import load_config
from core.records import TrainBatch
from learner.learner import Learner
from learner.memory import MEMORY_PLANS, TEXT_ENCODERS, apply_placement, module_devices, placement
from learner.policy import DiffusersPolicy
from learner.tiny import build_tiny
from tests.test_deploy import as_list, interpolate

ROOT = Path(__file__).resolve().parents[1]
GPU_GB = 80.0  # one A100/H100 80 GB worker GPU
CONFIGS = {"sd35_medium": "configs/sd35_medium_vllm.yaml", "flux_dev": "configs/flux_dev_vllm.yaml"}
PROMPTS = ["a red cube left of a blue ball", "two green cats"]


@pytest.mark.parametrize("plan", sorted(CONFIGS))
def test_gpu_config_settings(plan):
    cfg = load_config(ROOT / CONFIGS[plan])
    p = cfg.policy
    assert p.kind == ("sd3" if plan == "sd35_medium" else "flux") and p.dtype == "bfloat16" and p.device == "cuda"
    assert p.offload_text_encoders and p.vae_tiling and p.vae_slicing and p.gradient_checkpointing
    assert p.prompt_cache_size >= 6234 + 1  # T2I-CompBench's training prompts and ''
    assert p.lora_rank > 0 and cfg.learner.mixed_precision == "bf16"
    assert cfg.learner.ema_decay == 0.9999 and cfg.learner.ema_warmup_steps == 10
    assert cfg.judge.backend == "openai" and cfg.judge.mode == "structured"
    assert cfg.eval.prompts.path and cfg.eval.mode == "structured"


def _shares(plan: str) -> dict[str, float]:
    """GPU fractions per role the job runs with on one worker GPU: the compose overrides for SD3.5 (its
    config is written for a multi-GPU node), the config's own for FLUX."""
    cfg = load_config(ROOT / CONFIGS[plan])
    shares = {"learner": cfg.cluster.learner_resources.num_gpus, "sampler": cfg.cluster.sampler_resources.num_gpus,
              "scorer": cfg.cluster.scorer_resources.num_gpus}
    if plan == "sd35_medium":
        compose = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text()))
        job = as_list(compose["services"]["submit"]["command"])
        for arg in job:
            for role in shares:
                if arg.startswith(f"cluster.{role}_resources.num_gpus="):
                    shares[role] = float(arg.split("=", 1)[1])
    return shares


@pytest.mark.parametrize("plan", sorted(CONFIGS))
def test_memory_plan_fits_one_80gb_gpu(plan):
    cfg = load_config(ROOT / CONFIGS[plan])
    roles = MEMORY_PLANS[plan]
    shares = _shares(plan)
    count = {"learner": 1, "sampler": cfg.cluster.num_samplers, "scorer": cfg.cluster.num_scorers}
    assert sum(shares[r] * count[r] for r in roles) <= 1.0 + 1e-9  # Ray packs them onto one GPU
    for role, budget in roles.items():
        assert budget.steady <= shares[role] * GPU_GB, (plan, role, budget.steady, shares[role])
    # the start-up peak (text encoders embedding the prompts, before the denoiser is placed) fits too
    assert sum(roles[r].peak * count[r] for r in roles) <= GPU_GB
    assert roles["learner"].transient and roles["sampler"].transient  # T5-XXL is on the GPU only at start


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_placement_logic_and_moves(kind):
    pipe = build_tiny(kind, 0)
    plan = placement(pipe, "cuda:0", offload_text_encoders=True)
    encoders = [n for n in TEXT_ENCODERS if n in plan]
    assert len(encoders) == (3 if kind == "sd3" else 2)
    assert {plan[n] for n in encoders} == {"cpu"} and plan["transformer"] == plan["vae"] == "cuda:0"
    assert set(placement(pipe, "cuda:0", offload_text_encoders=False).values()) == {"cuda:0"}
    moved = apply_placement(pipe, {n: "meta" for n in encoders})  # 'meta' stands in for another device
    assert {moved[n] for n in encoders} == {"meta"} and moved["transformer"] == moved["vae"] == "cpu"
    with pytest.raises(ValueError, match="does not have"):
        apply_placement(pipe, {"text_encoder_9": "cpu"})


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_offload_embeds_first_then_places_the_denoiser(monkeypatch, kind):
    """On a (pretend) GPU: the text encoders go to the device first, embed the prompt set, then leave it
    while the transformer and VAE arrive, so the two never share the GPU."""
    plans = []
    monkeypatch.setattr(policy_module, "apply_placement", lambda pipe, plan: plans.append(dict(plan)))
    pol = DiffusersPolicy(build_tiny(kind, 0), kind, device="cuda:0", offload_text_encoders=True,
                          precompute=[*PROMPTS, ""])
    encoders = [n for n in TEXT_ENCODERS if n in plans[0]]
    assert [{n: p[n] for n in ("transformer", "vae", *encoders)} for p in plans] == [
        {"transformer": "cpu", "vae": "cpu", **dict.fromkeys(encoders, "cuda:0")},
        {"transformer": "cuda:0", "vae": "cuda:0", **dict.fromkeys(encoders, "cpu")}]
    assert len(pol._cache) == 3 and all(e.device.type == "cpu" for e, _ in pol._cache.values())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_after_precompute_sampling_and_training_never_call_the_text_encoders(kind):
    pol = DiffusersPolicy(build_tiny(kind, 0), kind, offload_text_encoders=True, precompute=[*PROMPTS, ""],
                          vae_tiling=True, vae_slicing=True, gradient_checkpointing=True)
    assert pol.memory == {"vae_tiling": True, "vae_slicing": True, "gradient_checkpointing": True}
    assert set(module_devices(pol.pipe).values()) == {"cpu"}
    originals = {}
    for n in TEXT_ENCODERS:
        if n in pol.pipe.components:
            module = pol.pipe.components[n]
            originals[n] = module.forward
            module.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("text encoder called"))
    batch = pol.sample(PROMPTS, [1, 2], guidance=4.5)  # SD3 CFG needs '' too: precomputed
    from core.config import DiffusersPolicyConfig, LearnerConfig

    learner = Learner((DiffusersPolicyConfig(kind=kind), LearnerConfig(warmup_steps=0)), pol)
    stats = learner.train_step(TrainBatch(PROMPTS, batch.x0, torch.ones(2, *batch.x0.shape[-2:]), torch.ones(2)))
    assert not stats["skipped"]
    for n, fwd in originals.items():
        pol.pipe.components[n].forward = fwd
    misses = pol.cache_misses
    pol.encode(["a prompt seen only now"])  # encoded on the CPU, where the encoders are
    assert pol.cache_misses == misses + 1


def test_gradient_checkpointing_gives_the_same_step():
    from core.config import DiffusersPolicyConfig, LearnerConfig

    g = torch.Generator().manual_seed(0)
    b = TrainBatch(PROMPTS, torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, 32, 32, generator=g), torch.ones(2))
    after = []
    for gc in (False, True):
        pol = DiffusersPolicy(build_tiny("sd3", 0), "sd3", lora_rank=4, gradient_checkpointing=gc)
        learner = Learner((DiffusersPolicyConfig(lora_rank=4), LearnerConfig(lr=1e-2, warmup_steps=0)), pol)
        learner.train_step(b)
        after.append(pol.trainable_state()[1])
    assert pol.transformer.gradient_checkpointing
    for k in after[0]:
        assert torch.allclose(after[0][k], after[1][k], atol=1e-6), k


def test_the_registry_precomputes_the_run_prompts(tmp_path):
    from srum.registry import compose

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na cat\n")
    cfg = load_config("configs/tiny_sd3.yaml", ["policy.offload_text_encoders=true", f"cluster.prompts.path={prompts}"])
    pol = compose(cfg).policy()
    assert list(pol._cache) == ["a cat", "a dog", ""] and pol.cache_misses == 3
