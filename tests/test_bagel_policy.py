"""Bagel's generation module behind the policy interface, on a tiny random Bagel (bagel/): packing and
attention kernels against the modelling package's own, sampling, the velocity against the package's own
training forward, what trains, weight sync, a learner step, and the checkpoint-directory loading path."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("nemo_automodel.components.models.bagel",
                    reason="Bagel's modelling package is not installed: pip install --no-deps "
                           "'nemo-automodel==0.7.0' einops (make setup does it)")

from bagel.backend import (  # noqa: E402
    BagelUnavailable,
    attention_mask,
    nemo_bagel,
    packed_attention,
    sdpa_packed_attention,
)
from bagel.model import build_tiny_bagel, generation_velocity, load_bagel, save_tiny_checkpoint  # noqa: E402
from bagel.packing import (  # noqa: E402
    Packed,
    dense_attention_mask,
    grid_position_ids,
    pack_generation,
    pack_understanding,
    patchify,
    unpatchify,
)
from bagel.policy import BagelPolicy, is_generation_param, renormalise  # noqa: E402
from core.config import BagelPolicyConfig, LearnerConfig  # noqa: E402
from core.records import TrainBatch  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.loss import rf_interpolate  # noqa: E402

PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's barriers make
    every small op take milliseconds: one thread while this module runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy() -> BagelPolicy:
    return BagelPolicy.from_config(BagelPolicyConfig(device="cpu"))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(123)


# ----- packing and kernels ------------------------------------------------------------------------

def test_packing_layouts_and_the_dense_mask_match_the_packages_mask(policy):
    from nemo_automodel.components.models.bagel.attention_masks import create_sparse_mask
    from torch.nn.attention.flex_attention import create_mask

    tok = policy.parts.tokens
    gen = pack_generation([5, None, 3], 4, tok)
    assert gen.document_lens == [11, 6, 9] and gen.attn_modes == ["causal", "noise", "noise", "causal", "noise"]
    assert gen.position_ids[:11] == [0, 1, 2, 3, 4] + [5] * 6  # the image split shares the position after the text
    und = pack_understanding(6, [10, 11], [12], tok)
    assert und.position_ids == [0] * 8 + [1, 2, 3, 4] + [5, 6] and und.text_ids[:1] == [tok.start_of_image]
    for p in (gen, und):
        mod = create_sparse_mask(p.document_lens, p.split_lens, p.attn_modes, torch.device("cpu"))
        theirs = create_mask(mod, 1, 1, p.length, p.length, "cpu")[0, 0]
        assert torch.equal(dense_attention_mask(p.document_lens, p.split_lens, p.attn_modes), theirs)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 4, 8, 8), x)
    # a token is one 2x2 patch, ordered (row-in-patch, col-in-patch, channel), the checkpoint's vae2llm order
    assert torch.equal(patchify(x, 2)[0, 1].reshape(2, 2, 4), x[0, :, 0:2, 2:4].permute(1, 2, 0))
    with pytest.raises(ValueError, match="exceeds"):
        grid_position_ids(17, 1, 16)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sdpa_kernel_matches_the_packages_flex_kernel(policy):
    """On a CPU the package's compiled flex attention cannot train; run eagerly without gradients it gives
    the same velocities as the SDPA kernel srum installs for its own calls."""
    parts, n = policy.parts, 16
    packed = pack_generation([6, 4], n, parts.tokens)
    tokens = torch.randn(2 * n, 16, generator=_gen())
    embeds = torch.randn(10, 64, generator=_gen())
    pos = grid_position_ids(4, 4, 16).repeat(2)
    t = torch.full((2 * n,), 0.4)
    qwen = sys.modules["nemo_automodel.components.models.bagel.modeling_qwen2_packed"]
    original = qwen._flex_attention
    with torch.no_grad():
        ours = generation_velocity(parts, packed, embeds, tokens, t, pos, "sdpa")
        flex = attention_mask(packed, "flex", 4, torch.device("cpu"))
        with torch.compiler.set_stance("force_eager"):
            theirs = parts.language_model.forward_train(
                packed_sequence=_sequence(parts, packed, embeds, tokens, t, pos), sample_lens=packed.document_lens,
                attention_mask=flex, packed_position_ids=torch.tensor(packed.position_ids),
                packed_und_token_indexes=torch.tensor(packed.und_index),
                packed_gen_token_indexes=torch.tensor(packed.latent_index))
        theirs = parts.model.model.llm2vae(theirs[torch.tensor(packed.latent_index)])
    assert qwen._flex_attention is original  # srum's kernel is installed only during its own calls
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def _sequence(parts, packed: Packed, embeds, tokens, t, pos) -> torch.Tensor:
    m = parts.model.model
    seq = torch.zeros(packed.length, 64)
    seq[torch.tensor(packed.text_index)] = parts.language_model.model.embed_tokens(torch.tensor(packed.text_ids))
    seq[torch.tensor(packed.embed_index)] = embeds
    seq[torch.tensor(packed.latent_index)] = m.vae2llm(tokens) + m.time_embedder(t) + m.latent_pos_embed(pos)
    return seq


def test_packed_attention_patch_is_scoped_and_reference_counted():
    qwen = sys.modules["nemo_automodel.components.models.bagel.modeling_qwen2_packed"]
    original = qwen._flex_attention
    with packed_attention("sdpa"):
        with packed_attention("sdpa"):
            assert qwen._flex_attention is sdpa_packed_attention
        assert qwen._flex_attention is sdpa_packed_attention
    assert qwen._flex_attention is original
    with pytest.raises(ValueError, match="needs CUDA"):
        BagelPolicy.from_config(BagelPolicyConfig(device="cpu", attention="flex"))


# ----- sampling -----------------------------------------------------------------------------------

def test_sample_shapes_and_determinism_per_seed(policy):
    a = policy.sample(PROMPTS, [1, 2])
    assert a.images.shape == (2, 64, 64, 3) and a.images.dtype == torch.uint8
    assert a.x0.shape == (2, 4, 8, 8) and a.x0.dtype == torch.float32 and a.version == policy.version
    b = policy.sample(PROMPTS, [1, 2])
    assert torch.equal(a.x0, b.x0) and torch.equal(a.images, b.images)
    c = policy.sample(PROMPTS, [1, 3])
    assert torch.equal(a.x0[0], c.x0[0]) and not torch.allclose(a.x0[1], c.x0[1])
    alone = policy.sample(PROMPTS[1:], [2])  # packing is not bit-invariant, but documents do not mix
    torch.testing.assert_close(alone.x0[0], a.x0[1], atol=1e-5, rtol=1e-4)
    assert policy.sample(PROMPTS, [1, 2], height=32, width=48).x0.shape == (2, 4, 4, 6)
    with pytest.raises(ValueError, match="one seed per prompt"):
        policy.sample(PROMPTS, [1])
    with pytest.raises(ValueError, match="multiple of 16"):
        policy.sample(PROMPTS, [1, 2], height=40)


def test_classifier_free_guidance_follows_its_interval_and_renormalises(policy):
    plain = policy.sample(PROMPTS, [5, 6], steps=4)
    guided = policy.sample(PROMPTS, [5, 6], steps=4, guidance=4.0)
    assert not torch.allclose(plain.x0, guided.x0)
    outside = BagelPolicy(policy.parts, BagelPolicyConfig(device="cpu", cfg_interval=(0.0, 0.0)),
                          device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(outside.sample(PROMPTS, [5, 6], steps=4, guidance=4.0).x0, plain.x0)
    cond, uncond = torch.randn(2, 16, 16, generator=_gen()), torch.randn(2, 16, 16, generator=_gen())
    out = renormalise(uncond + 4.0 * (cond - uncond), cond, "global", 0.0)
    assert torch.all(out.norm(dim=(1, 2)) <= cond.norm(dim=(1, 2)) + 1e-5)


# ----- the velocity -------------------------------------------------------------------------------

def test_velocity_is_differentiable_and_matches_the_packages_training_forward(policy):
    """The package's ``BagelForUnifiedMultimodal.forward`` (its stage-2 training path: own patchify, own
    noise, sigmoid timesteps) on the same packing: its x_t and its predicted velocity, read with hooks,
    agree with :meth:`BagelPolicy.velocity` at that x_t."""
    parts, m = policy.parts, policy.parts.model
    x0 = torch.randn(2, 4, 8, 8, generator=_gen())
    t = torch.tensor([0.3, 0.8])
    ids = [policy.prompt_ids(p) for p in PROMPTS]
    packed = Packed()
    for row in ids:  # the same layout with the prompt as plain text slots (the package embeds them itself)
        start = packed.length
        packed.add_split(["text"] * len(row), row, list(range(len(row))), "causal")
        packed.add_split(["text"] + ["latent"] * 16 + ["text"], [parts.tokens.start_of_image] + [None] * 16
                         + [parts.tokens.end_of_image], len(row), "noise")
        packed.end_document(start)
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, use_input: bool):
        def hook(module, inputs, output) -> None:  # returns None: the module's output is left as it is
            seen[key] = (inputs[0] if use_input else output).detach()
        return hook

    hooks = [m.model.vae2llm.register_forward_hook(keep("x_t", True)),
             m.model.llm2vae.register_forward_hook(keep("v", False))]
    idx = packed.tensors()
    try:
        with torch.no_grad(), packed_attention("sdpa"):
            m(sequence_length=packed.length, packed_text_ids=idx["text_ids"], packed_text_indexes=idx["text_index"],
              sample_lens=packed.document_lens, packed_position_ids=idx["position_ids"],
              nested_attention_masks=attention_mask(packed, "sdpa", 4, torch.device("cpu")),
              padded_latent=x0, patchified_vae_latent_shapes=[(4, 4)] * 2,
              packed_latent_position_ids=grid_position_ids(4, 4, 16).repeat(2),
              packed_vae_token_indexes=idx["latent_index"], packed_timesteps=torch.logit(t).repeat_interleave(16),
              mse_loss_indexes=idx["latent_index"])
    finally:
        for h in hooks:
            h.remove()
    x_t = unpatchify(seen["x_t"].reshape(2, 16, 16), 2, 4, 8, 8)
    v = policy.velocity(x_t, t, PROMPTS)
    torch.testing.assert_close(v.detach(), unpatchify(seen["v"].reshape(2, 16, 16), 2, 4, 8, 8), atol=1e-5, rtol=1e-4)
    v.pow(2).mean().backward()
    grads = {n: p.grad for n, p in policy.named_trainable_parameters().items()}
    assert all(g is not None for g in grads.values()) and any(float(g.abs().sum()) > 0 for g in grads.values())
    for p in policy.trainable_parameters():
        p.grad = None


# ----- what trains --------------------------------------------------------------------------------

def test_only_generation_parameters_train(policy):
    names = set(policy.named_trainable_parameters())
    assert names and all(is_generation_param(n) for n in names)
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    for und in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight",
                "lm_head.weight", "vit_model.", "connector.fc1.weight", "layers.0.input_layernorm.weight"):
        assert any(und in n for n in frozen) and not any(und in n for n in names), und
    assert any("mlp_moe_gen.up_proj" in n for n in names) and any("llm2vae" in n for n in names)
    lora = BagelPolicy.from_config(BagelPolicyConfig(device="cpu", lora_rank=4), seed=1)
    lora_names = list(lora.named_trainable_parameters())
    assert lora_names and all("lora_" in n and "_moe_gen" in n for n in lora_names)
    with pytest.raises(ValueError, match="not generation modules"):
        BagelPolicyConfig(lora_rank=4, lora_target_modules=["q_proj", "q_proj_moe_gen"])


def test_trainable_state_round_trip_gives_identical_velocities():
    a = BagelPolicy.from_config(BagelPolicyConfig(device="cpu", lora_rank=4), seed=1)
    b = BagelPolicy.from_config(BagelPolicyConfig(device="cpu", lora_rank=4), seed=2)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen()))
    x, t = torch.randn(2, 4, 8, 8, generator=_gen()), torch.tensor([0.2, 0.6])
    version, state = a.trainable_state()
    assert all(v.device.type == "cpu" for v in state.values())
    assert not torch.allclose(a.velocity(x, t, PROMPTS), b.velocity(x, t, PROMPTS))
    b.load_trainable_state(state, version=7)
    assert b.version == 7 and torch.equal(a.velocity(x, t, PROMPTS), b.velocity(x, t, PROMPTS))
    with pytest.raises(ValueError, match="missing"):
        b.load_trainable_state({k: v for k, v in list(state.items())[1:]})


def test_a_learner_step_lowers_the_flow_loss_on_a_fixed_batch():
    pol = BagelPolicy.from_config(BagelPolicyConfig(device="cpu"))
    x0 = pol.sample(PROMPTS, [1, 2], steps=2).x0
    batch = TrainBatch(prompts=list(PROMPTS), x0=x0, R=torch.ones(2, 8, 8), alpha=torch.ones(2))
    noise, t = torch.randn(x0.shape, generator=_gen()), torch.tensor([0.3, 0.7])

    def flow_loss() -> float:
        with torch.no_grad():
            return float((pol.velocity(rf_interpolate(x0, noise, t), t, PROMPTS) - (noise - x0)).pow(2).mean())

    before = flow_loss()
    learner = Learner((pol.cfg, LearnerConfig(lr=1e-3, warmup_steps=0, timestep_shift=1.0)), pol, seed=0)
    und_before = pol.model.model.language_model.model.layers[0].self_attn.q_proj.weight.clone()
    for _ in range(8):
        stats = learner.train_step(batch)
    assert stats["skipped"] == 0 and pol.version == 8
    assert flow_loss() < before
    assert torch.equal(pol.model.model.language_model.model.layers[0].self_attn.q_proj.weight, und_before)


# ----- building and loading -----------------------------------------------------------------------

def test_checkpoint_directory_is_the_real_loading_path(tmp_path, policy):
    """A checkpoint directory in BAGEL-7B-MoT's layout (written from the tiny model) loads through the
    package's state-dict adapter into the same model; a judge loads it understanding-only."""
    save_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    loaded = BagelPolicy.from_config(BagelPolicyConfig(device="cpu", pretrained=str(tmp_path / "ckpt"), tiny=False))
    x, t = torch.randn(2, 4, 8, 8, generator=_gen()), torch.tensor([0.25, 0.75])
    torch.testing.assert_close(loaded.velocity(x, t, PROMPTS), policy.velocity(x, t, PROMPTS).detach(),
                               atol=0, rtol=0)
    assert torch.equal(loaded.decode(x), policy.decode(x))
    und = load_bagel(tmp_path / "ckpt", stage=1)
    assert und.vae is None and not any("_moe_gen" in n for n, _ in und.model.named_parameters())
    (tmp_path / "ckpt" / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['ae.safetensors'\]"):
        load_bagel(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bagel(tmp_path / "nowhere")


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    a, b, c = build_tiny_bagel(3), build_tiny_bagel(3), build_tiny_bagel(4)
    assert torch.equal(torch.rand(1), expected)
    sa, sb, sc = (p.model.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_a_missing_modelling_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_automodel.components.models.bagel", None)
    with pytest.raises(BagelUnavailable, match="pip install --no-deps 'nemo-automodel==0.7.0' einops"):
        nemo_bagel()
