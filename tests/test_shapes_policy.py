"""Shapes base generator: tokenizer, pixel maps, pretraining cache, sampling, trainable state,
learner steps and a frozen text encoder. Pretraining here is a tiny budget in a tmp cache dir."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import LearnerConfig, ShapesPolicyConfig
from core.records import TrainBatch
from learner.base import Policy, SampleBatch
from learner.learner import Learner, eval_flow_loss
from shapes import world
from shapes.evaluator import HeldoutEvaluator
from shapes.policy import ShapesPolicy, WordTokenizer, flow_timesteps, images_to_x0, x0_to_images
from shapes.pretrain import (
    PretrainSettings,
    ShapesArch,
    base_info,
    base_path,
    load_base,
    load_policy,
    pretrain_base,
    train_base,
    update_ema,
    verify,
    weights_digest,
)

TEST_STEPS = 30
PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("shapes_cache")
    pretrain_base(ShapesArch(), PretrainSettings(steps=TEST_STEPS), d)
    return str(d)


def policy_cfg(cache_dir: str, **kw) -> ShapesPolicyConfig:
    base = dict(device="cpu", num_inference_steps=4, guidance_scale=3.0, lora_target_modules=["to_q", "to_k", "to_v"],
                pretrain_steps=TEST_STEPS, pretrain_cache_dir=cache_dir)
    return ShapesPolicyConfig(**{**base, **kw})


def make_policy(cache_dir: str, **kw) -> ShapesPolicy:
    return load_policy(policy_cfg(cache_dir, **kw), seed=0)


# ------------------------------------------------------------------------------------------ pure
def test_tokenizer_ids_by_hand():
    tok = WordTokenizer(["red", "circle", "a"], max_tokens=5)
    assert tok.vocab == ["<pad>", "<unk>", "<cls>", "a", "circle", "red"]
    ids, pad = tok(["A red  Circle", "a purple circle", ""])
    assert ids.tolist() == [[2, 3, 5, 4, 0], [2, 3, 1, 4, 0], [2, 0, 0, 0, 0]]
    assert pad.tolist()[2] == [False, True, True, True, True]
    with pytest.raises(ValueError, match="at most 4"):
        tok(["a red circle a red"])


def test_pixel_maps_and_timesteps():
    img = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # [1, 1, 1, 3]
    x0 = images_to_x0(img)
    assert x0.shape == (1, 3, 1, 1)
    assert x0.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert torch.equal(x0_to_images(x0), img)
    assert x0_to_images(torch.full((1, 3, 1, 1), 7.0)).flatten().tolist() == [255, 255, 255]  # clamped
    with pytest.raises(ValueError, match="uint8"):
        images_to_x0(img.float())
    assert flow_timesteps(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert flow_timesteps(2, shift=3.0).tolist() == pytest.approx([1.0, 0.75, 0.0])  # 3*.5/(1+2*.5)


# ---------------------------------------------------------------------------------- pretraining
def test_pretrain_caches_and_second_call_loads(cache_dir, tmp_path):
    path = base_path(ShapesArch(), PretrainSettings(steps=TEST_STEPS), cache_dir)
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert pretrain_base(ShapesArch(), PretrainSettings(steps=TEST_STEPS), cache_dir) == path
    assert time.perf_counter() - t0 < 2.0
    assert path.stat().st_mtime_ns == mtime  # not retrained
    info = base_info(path)
    assert info["settings"]["steps"] == TEST_STEPS and len(info["info"]["history"]) >= 1
    # another budget or seed is another cache entry
    assert base_path(ShapesArch(), PretrainSettings(steps=TEST_STEPS + 1), cache_dir) != path
    assert base_path(ShapesArch(), PretrainSettings(steps=TEST_STEPS, seed=1), cache_dir) != path


def test_ema_update_by_hand():
    avg, cur = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        avg.weight.fill_(1.0)
        cur.weight.fill_(3.0)
    update_ema([avg], (cur,), decay=0.75)
    assert avg.weight.item() == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)


def test_pretraining_is_bit_reproducible_and_saves_the_average():
    """The shipped base's promise on a short schedule: the same settings give the same weights digest; the
    saved weights are the average, not the last iterate."""
    s = PretrainSettings(steps=6, batch_size=4, warmup_steps=2)
    state_a, _ = train_base(ShapesArch(), s, log_every=3)
    state_b, _ = train_base(ShapesArch(), s, log_every=3)
    assert weights_digest(state_a) == weights_digest(state_b)
    last, _ = train_base(ShapesArch(), s.model_copy(update={"ema_decay": 0.0}), log_every=3)
    assert weights_digest(last) != weights_digest(state_a)
    other, _ = train_base(ShapesArch(), s.model_copy(update={"seed": 1}), log_every=3)
    assert weights_digest(other) != weights_digest(state_a)


def test_shipped_base_is_found_verified_and_a_corrupt_one_refused(tmp_path, monkeypatch):
    from shapes import pretrain

    s = PretrainSettings(steps=3, batch_size=2, warmup_steps=1)
    shipped = tmp_path / "bases"
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", shipped)
    path = pretrain_base(ShapesArch(), s, shipped)  # what `--ship` does
    empty_cache = tmp_path / "cache"
    assert pretrain_base(ShapesArch(), s, empty_cache) == path  # a cache miss takes the shipped file
    assert not empty_cache.exists()
    assert base_info(path)["weights_sha256"] == weights_digest(dict(load_file(str(path))))
    assert verify(ShapesArch(), s, path)  # retrained from scratch: the same digest
    state = dict(load_file(str(path)))
    name = sorted(state)[0]
    state[name] = state[name] + 1.0
    save_file(state, str(path), metadata=safe_metadata(path))
    with pytest.raises(ValueError, match="corrupt"):
        load_base(ShapesArch(), s, empty_cache)


def test_the_default_config_uses_the_shipped_base():
    """Changing the default recipe without shipping its base would make `make run` pretrain for half an hour."""
    from core.config_io import load_config
    from shapes.pretrain import settings_from_config, shipped_path
    from tests.ray_cluster import REPO

    arch, settings, _ = settings_from_config(load_config(REPO / "configs" / "default.yaml", []).policy)
    path = shipped_path(arch, settings)
    assert path.exists(), f"no shipped base for the default settings: run `python -m shapes.pretrain --ship` ({path.name})"
    info = base_info(path)
    assert info["settings"] == settings.model_dump() and len(info["weights_sha256"]) == 64


def safe_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_load_policy_pretrains_into_empty_cache_dir(tmp_path):
    cfg = policy_cfg(str(tmp_path), pretrain_steps=2)
    pol = load_policy(cfg)
    assert len(list(tmp_path.glob("shapes_base_*.safetensors"))) == 1
    assert isinstance(pol, Policy) and pol.sample(["a red circle"], [0], steps=2).images.shape == (1, 32, 32, 3)


def test_shapes_section_has_no_size_to_get_wrong(cache_dir):
    with pytest.raises(ValueError, match="height"):  # the world draws 32x32: no size field to set
        policy_cfg(cache_dir, height=64)


# ------------------------------------------------------------------------------------- sampling
def test_sample_shapes_dtypes_and_determinism(cache_dir):
    pol = make_policy(cache_dir)
    b = pol.sample(PROMPTS, [1, 2])
    assert isinstance(b, SampleBatch)
    assert b.images.dtype == torch.uint8 and b.images.shape == (2, 32, 32, 3)
    assert b.x0.dtype == torch.float32 and b.x0.shape == (2, 3, 32, 32)
    assert torch.equal(pol.decode(b.x0), b.images)
    assert b.version == pol.version
    again = pol.sample(PROMPTS, [1, 2])
    assert torch.equal(again.x0, b.x0)
    other = pol.sample(PROMPTS, [1, 3])
    assert torch.equal(other.x0[0], b.x0[0]) or torch.allclose(other.x0[0], b.x0[0], atol=1e-5)
    assert not torch.allclose(other.x0[1], b.x0[1], atol=1e-2)
    no_cfg = pol.sample(PROMPTS, [1, 2], guidance=1.0)
    assert not torch.allclose(no_cfg.x0, b.x0, atol=1e-3)
    with pytest.raises(ValueError, match="one seed per prompt"):
        pol.sample(PROMPTS, [1])
    with pytest.raises(ValueError, match="height must be 32"):
        pol.sample(PROMPTS, [1, 2], height=64)


def test_encode_is_cached_and_null_differs(cache_dir):
    pol = make_policy(cache_dir)
    c1 = pol.encode(PROMPTS)
    assert c1.embeds.shape == (2, pol.arch.max_tokens, pol.arch.text_dim) and c1.pooled.shape == (2, 64)
    misses = pol.cache_misses
    c2 = pol.encode(PROMPTS[::-1])
    assert pol.cache_misses == misses and torch.equal(c2.embeds[0], c1.embeds[1])
    null = pol.encode([""])
    assert not torch.allclose(null.pooled[0], c1.pooled[0])


# ------------------------------------------------------------------------------ trainable state
def test_heldout_accuracy_samples_with_the_evaluation_guidance(cache_dir, monkeypatch):
    pol = make_policy(cache_dir, guidance_scale=1.0, num_inference_steps=2)
    seen, sample = [], pol.sample

    def spy(prompts, seeds, **kw):
        seen.append((len(prompts), kw.get("guidance")))
        return sample(prompts, seeds, **kw)

    monkeypatch.setattr(pol, "sample", spy)
    acc = HeldoutEvaluator(seeds_per_prompt=1, guidance=3.0).evaluate(pol)
    assert acc["n"] == 66 and 0.0 <= acc["overall"] <= 1.0
    assert sum(n for n, _ in seen) == 66 and {g for _, g in seen} == {3.0}
    with_cfg = sample(["two green triangles"], [5], guidance=3.0).images
    assert not torch.equal(with_cfg, sample(["two green triangles"], [5]).images)  # 1.0 really is another draw


def test_trainable_state_roundtrip_gives_identical_velocities(cache_dir):
    a, b = make_policy(cache_dir), make_policy(cache_dir)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert not torch.equal(a.velocity(x, t, PROMPTS), b.velocity(x, t, PROMPTS))
        version, state = a.trainable_state()
        assert set(state) == set(a.named_trainable_parameters()) and all(not k.startswith("text") for k in state)
        b.load_trainable_state(state, version=7)
        assert b.version == 7
        assert torch.equal(a.velocity(x, t, PROMPTS), b.velocity(x, t, PROMPTS))
    key = next(iter(state))
    with pytest.raises(ValueError, match="1 missing"):
        b.load_trainable_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unexpected"):
        b.load_trainable_state({**state, "text_encoder.tok.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="wrong shape"):
        b.load_trainable_state({**state, key: torch.zeros(3)})


def test_lora_trains_only_adapter_weights(cache_dir):
    pol = make_policy(cache_dir, lora_rank=4)
    names = list(pol.named_trainable_parameters())
    assert names and all("lora_" in n for n in names)
    assert all(not p.requires_grad for n, p in pol.transformer.named_parameters() if "lora_" not in n)


# -------------------------------------------------------------------------------------- learner
def _fixed_batch() -> TrainBatch:
    rng = np.random.default_rng(0)
    specs = [world.parse_prompt(p) for p in PROMPTS]
    images = torch.from_numpy(np.stack([world.render(s, 32, rng) for s in specs]))
    return TrainBatch(PROMPTS, images_to_x0(images), torch.ones(2, 32, 32), torch.ones(2))


def test_learner_steps_lower_flow_loss_and_keep_text_encoder_frozen(cache_dir):
    pol = make_policy(cache_dir)
    text_before = {k: v.clone() for k, v in pol.text_encoder.state_dict().items()}
    cond_before = pol.encode(PROMPTS)
    learner = Learner((ShapesPolicyConfig(device="cpu"), LearnerConfig(lr=1e-3, warmup_steps=0, timestep_shift=1.0)),
                      pol, seed=0)
    batch = _fixed_batch()
    g = torch.Generator().manual_seed(123)
    t, noise = torch.rand(8, generator=g), torch.randn(8, 3, 32, 32, generator=g)

    def fixed_loss() -> float:
        return float(eval_flow_loss(pol, batch.x0.repeat(4, 1, 1, 1), PROMPTS * 4, t, noise).mean())

    before = fixed_loss()
    for _ in range(20):
        m = learner.train_step(batch)
        assert m["skipped"] == 0.0
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    assert pol.version == 20 and learner.step == 20
    for k, v in pol.text_encoder.state_dict().items():
        assert torch.equal(v, text_before[k]), k
    pol._cache.clear()
    assert torch.equal(pol.encode(PROMPTS).embeds, cond_before.embeds)


def test_sd3_denoiser_variant_samples_and_steps():
    from shapes.pretrain import build_modules

    arch = ShapesArch(denoiser="sd3", patch_size=4, num_layers=1)
    te, dn, tok = build_modules(arch, seed=0)
    pol = ShapesPolicy(te, dn, tok, arch, num_inference_steps=2)
    b = pol.sample(PROMPTS, [0, 1])
    assert b.images.shape == (2, 32, 32, 3) and b.x0.shape == (2, 3, 32, 32)
    learner = Learner((ShapesPolicyConfig(device="cpu"), LearnerConfig(lr=1e-3, warmup_steps=0)), pol, seed=0)
    assert learner.train_step(_fixed_batch())["skipped"] == 0.0 and pol.version == 1
