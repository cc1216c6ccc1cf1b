"""Policy adapter: tiny builders, sampling, velocity, caching, trainable state, loading paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from core.config import DiffusersPolicyConfig
from core.config_io import load_config
from learner.base import Policy
from learner.policy import DiffusersPolicy
from learner.tiny import build_tiny_flux, build_tiny_sd3, bytes_to_unicode, make_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue ball on a table"]


def make_policy(kind: str = "sd3", lora_rank: int = 0, seed: int = 0, **kw) -> Policy:
    return DiffusersPolicy.from_config(DiffusersPolicyConfig(kind=kind, lora_rank=lora_rank, device="cpu", **kw),
                                       seed=seed)


@pytest.fixture(scope="module")
def sd3() -> Policy:
    return make_policy("sd3")


@pytest.fixture(scope="module")
def flux() -> Policy:
    return make_policy("flux", lora_rank=4)


def perturb(policy: Policy, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------ tokenizers
def test_byte_table_matches_gpt2() -> None:
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[ord("a")] == "a" and table[0xFF] == "ÿ"
    assert table[0] == chr(256)      # first remapped byte
    assert table[ord(" ")] == "Ġ"    # GPT-2's space symbol, chr(256 + 32)
    assert table[0xAD] == chr(323)   # soft hyphen: the 68th (last) remapped byte -> 256 + 67


def test_clip_tokenizer_is_byte_level() -> None:
    tok = make_clip_tokenizer()
    ids = tok("ab")["input_ids"]
    vocab = tok.get_vocab()
    assert ids == [vocab["<|startoftext|>"], vocab["a"], vocab["b</w>"], vocab["<|endoftext|>"]]
    assert tok.model_max_length == 77


def test_tiny_builders_are_deterministic_per_seed() -> None:
    a, b, c = build_tiny_sd3(0), build_tiny_sd3(0), build_tiny_sd3(1)
    wa, wb, wc = (p.transformer.pos_embed.proj.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    f1, f2 = build_tiny_flux(3), build_tiny_flux(3)
    assert torch.equal(f1.vae.encoder.conv_in.weight, f2.vae.encoder.conv_in.weight)


# -------------------------------------------------------------------------------------- sampling
def test_sample_shapes_and_dtypes(sd3: Policy) -> None:
    out = sd3.sample(PROMPTS, [1, 2])
    assert out.images.dtype == torch.uint8 and out.images.shape == (2, 64, 64, 3)
    assert out.x0.dtype == torch.float32 and out.x0.shape == (2, 4, 32, 32) and out.x0.device.type == "cpu"
    assert out.version == sd3.version and isinstance(sd3, Policy)  # the adapter implements the interface
    small = sd3.sample(PROMPTS[:1], [1], steps=2, guidance=1.0, height=32, width=48)
    assert small.images.shape == (1, 32, 48, 3) and small.x0.shape == (1, 4, 16, 24)


def test_sample_is_deterministic_per_seed(sd3: Policy) -> None:
    a = sd3.sample(PROMPTS, [5, 6], steps=3)
    b = sd3.sample(PROMPTS, [5, 6], steps=3)
    c = sd3.sample(PROMPTS, [5, 7], steps=3)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.images, b.images)
    assert torch.allclose(a.x0[0], c.x0[0], atol=1e-5)          # same seed, same prompt
    assert (a.x0[1] - c.x0[1]).abs().mean() > 0.1                # different seed
    alone = sd3.sample(PROMPTS[1:], [6], steps=3)                # per-sample generator
    assert torch.allclose(alone.x0[0], a.x0[1], atol=1e-4)


def test_x0_is_the_pipelines_normalised_latent(sd3: Policy) -> None:
    """Decoding x0 ourselves gives the pipeline's own images for the same seeds."""
    out = sd3.sample(PROMPTS, [3, 4], steps=3)
    ref = sd3.pipe(PROMPTS, height=64, width=64, num_inference_steps=3, guidance_scale=sd3.guidance_scale,
                   generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="np",
                   max_sequence_length=sd3.max_sequence_length).images
    ref_u8 = torch.from_numpy((ref * 255).round()).to(torch.uint8)
    diff = (ref_u8.int() - out.images.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05
    vae = sd3.pipe.vae.config
    assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)  # non-trivial normalisation


# ------------------------------------------------------------------------------------- velocity
def test_velocity_scales_t_to_the_transformer(sd3: Policy) -> None:
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.9])
    emb, _, pooled, _ = sd3.pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=77)
    with torch.no_grad():
        ref = sd3.transformer(hidden_states=x, timestep=torch.tensor([250.0, 900.0]),
                              encoder_hidden_states=emb, pooled_projections=pooled).sample
        v = sd3.velocity(x, t, PROMPTS)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.allclose(v, ref, atol=1e-6)


def test_prompt_cache_is_lru_and_bounded() -> None:
    pol = make_policy()
    pol.cache_size = 2
    pol.encode(["a", "b"])
    assert pol.cache_misses == 2
    pol.encode(["a", "a"])
    assert (pol.cache_misses, pol.cache_hits) == (2, 2)
    pol.encode(["c"])                   # evicts "b" (least recently used)
    assert list(pol._cache) == ["a", "c"]
    first = pol.encode(["b"]).embeds
    assert pol.cache_misses == 4 and torch.equal(first, pol.encode(["b"]).embeds)


# ------------------------------------------------------------------------------- trainable state
def test_lora_trains_only_adapters() -> None:
    pol = make_policy(lora_rank=4)
    names = list(pol.named_trainable_parameters())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 4 * 2  # (A, B) x (to_q, to_k, to_v, to_out.0) x 2 layers
    trainable = {id(p) for p in pol.trainable_parameters()}
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"):
        mod = pol.pipe.components[comp]
        assert not mod.training
        for p in mod.parameters():
            assert p.requires_grad == (id(p) in trainable)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_trainable_state_round_trip_gives_identical_velocities(lora_rank: int) -> None:
    a, b = make_policy(lora_rank=lora_rank), make_policy(lora_rank=lora_rank)
    perturb(a, seed=1)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        assert not torch.allclose(a.velocity(x, t, PROMPTS), b.velocity(x, t, PROMPTS))
        version, state = a.trainable_state()
        assert all(v.device.type == "cpu" for v in state.values())
        b.load_trainable_state(state, version=7)
        assert b.version == 7
        assert torch.equal(a.velocity(x, t, PROMPTS), b.velocity(x, t, PROMPTS))
    n_transformer = sum(1 for _ in a.transformer.parameters())
    assert (len(state) == n_transformer) == (lora_rank == 0)


def test_load_trainable_state_rejects_bad_names_and_shapes(sd3: Policy) -> None:
    _, state = sd3.trainable_state()
    key = next(iter(state))
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"1 missing: \['pos_embed.proj.weight'\]"):
        sd3.load_trainable_state(missing)
    with pytest.raises(ValueError, match="1 unexpected: .*bogus.weight"):
        sd3.load_trainable_state({**state, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"wrong shape.*pos_embed.proj.weight: got \(1,\)"):
        sd3.load_trainable_state({**state, key: torch.zeros(1)})
    lora = make_policy(lora_rank=2)
    with pytest.raises(ValueError, match="missing.*lora_A"):
        lora.load_trainable_state(state)


# ------------------------------------------------------------------------------------------ FLUX
def test_flux_sample_and_velocity(flux: Policy) -> None:
    out = flux.sample(PROMPTS, [1, 2], steps=3)
    assert out.images.shape == (2, 64, 64, 3) and out.x0.shape == (2, 4, 32, 32)
    assert torch.equal(out.x0, flux.sample(PROMPTS, [1, 2], steps=3).x0)
    t = torch.tensor([0.2, 0.7])
    v = flux.velocity(out.x0, t, PROMPTS)
    assert v.shape == out.x0.shape and torch.isfinite(v).all()
    # packing is a pure re-layout: row (i, j) of the packed tokens holds the 2x2 patch at (2i, 2j)
    packed = flux.pipe._pack_latents(out.x0, 2, 4, 32, 32)
    assert torch.equal(packed[0, 0].view(4, 2, 2), out.x0[0, :, :2, :2])
    assert flux.transformer.config.guidance_embeds


# ------------------------------------------------------------------------------- loading paths
def test_pretrained_loads_through_from_pretrained(tmp_path: Path) -> None:
    build_tiny_sd3(0).save_pretrained(tmp_path / "sd3")
    loaded = DiffusersPolicy.from_config(DiffusersPolicyConfig(pretrained=str(tmp_path / "sd3"), device="cpu"))
    tiny = make_policy()
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, t, PROMPTS[:1]), tiny.velocity(x, t, PROMPTS[:1]))


def test_real_model_config_is_wired_to_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "configs" / "sd35_medium_vllm.yaml"
    if not path.exists():
        pytest.skip(f"{path} not present")
    cfg = load_config(path, ["policy.device=cpu"])
    calls = []

    def fake_from_pretrained(name, **kw):
        dtype = kw.get("dtype", kw.get("torch_dtype"))
        calls.append((name, dtype))
        return build_tiny_sd3(0).to(dtype=dtype)

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", fake_from_pretrained)
    pol = DiffusersPolicy.from_config(cfg.policy)
    assert calls == [("stabilityai/stable-diffusion-3.5-medium", torch.bfloat16)]
    assert pol.lora_rank == 64 and pol.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())  # fp32 master weights
    assert pol.pipe.vae.dtype == torch.bfloat16
    v = pol.velocity(torch.randn(1, 4, 32, 32), torch.tensor([0.5]), ["x"])
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
