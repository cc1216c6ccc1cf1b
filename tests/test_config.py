"""Tests for core/config.py and core/config_io.py: defaults, YAML + dotted overrides, tagged backend sections,
error messages, hashing, docs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from core import config as C
from core import config_io as IO
from core.config import SRUMConfig
from core.config_io import ConfigError, config_hash, config_to_yaml, describe_config, load_config

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _error(path=None, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    return exc.value


# ---------------------------------------------------------------------------------------- defaults


def test_learner_defaults_are_the_paper_recipe():
    lr = load_config(None).learner
    assert lr.lr == 2.5e-5
    assert lr.betas == (0.9, 0.95)
    assert lr.eps == 1e-15
    assert lr.weight_decay == 0.0
    assert lr.warmup_steps == 500
    assert lr.grad_clip == 1.0
    assert lr.lambda_c == 0.5
    assert lr.timestep_shift == 4.0
    assert lr.ema_decay is None and lr.weight_floor == 0.0


def test_other_defaults_match_the_spec():
    cfg = SRUMConfig()
    assert cfg.policy.kind == "sd3" and cfg.policy.tiny and cfg.policy.pretrained is None
    assert (cfg.policy.height, cfg.policy.width, cfg.policy.num_inference_steps) == (64, 64, 8)
    assert cfg.policy.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.judge.backend == "transformers" and cfg.judge.tiny and cfg.judge.mode == "logprob"
    assert C.OpenAIJudgeConfig().endpoints == ["http://127.0.0.1:8000/v1"]
    assert cfg.regions.proposer == "sam" and cfg.regions.top_k == 5 and cfg.regions.model_type == "tiny"
    assert cfg.reward.semantics == "official" and cfg.reward.merge == "max"
    assert cfg.cluster.buffer_capacity == 256 and cfg.cluster.max_staleness == 4
    assert cfg.cluster.prompts.path == C.DEFAULT_PROMPTS_PATH
    assert (REPO / C.DEFAULT_PROMPTS_PATH).is_file()


def _models(model: type[BaseModel], seen: set) -> None:
    seen.add(model)
    for info in model.model_fields.values():
        union = IO.variants(info)
        for sub in (set(union[1].values()) if union else {IO.section_model(info)}) - {None}:
            if sub not in seen:
                _models(sub, seen)


def test_every_model_forbids_extra_and_every_field_is_described():
    seen: set = set()
    _models(SRUMConfig, seen)
    # SRUM + run, 3 policies, 4 judges, 4 region proposers, reward, learner, cluster, resources, prompts
    assert len(seen) == 21  # with the eval section, its prompt source and the judge launch section
    for model in seen:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, info in model.model_fields.items():
            assert info.description and "\n" not in info.description, f"{model.__name__}.{name}"


def test_mutable_defaults_are_not_shared():
    a, b = SRUMConfig(), SRUMConfig()
    a.policy.lora_target_modules.append("x")
    assert b.policy.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


# --------------------------------------------------------------------------------------- overrides


def test_overrides_nested_list_bool_null_and_numbers():
    cfg = load_config(None, [
        "learner.lambda_c=0.3",
        "learner.betas=[0.9, 0.99]",
        "policy.tiny=false",
        "policy.pretrained=stabilityai/stable-diffusion-3.5-medium",
        "learner.ema_decay=0.999",
        "learner.grad_clip=null",
        "learner.lr=1e-4",  # YAML 1.1 reads this as a string; pydantic turns it into a float
        "cluster.prompts.path=x.txt",
        "cluster.prompts.categories=[color, spatial]",
        "cluster.sampler_resources.num_gpus=0.5",
        "run.max_steps=3",
    ])
    assert cfg.learner.lambda_c == 0.3
    assert cfg.learner.betas == (0.9, 0.99)
    assert cfg.policy.tiny is False and cfg.policy.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.learner.ema_decay == 0.999 and cfg.learner.grad_clip is None
    assert cfg.learner.lr == 1e-4
    assert cfg.cluster.prompts.path == "x.txt" and cfg.cluster.prompts.categories == ["color", "spatial"]
    assert cfg.cluster.sampler_resources.num_gpus == 0.5 and cfg.run.max_steps == 3


def test_override_string_fields_keep_raw_text_and_null_clears_optional():
    cfg = load_config(None, ["run.name=123", "judge.backend=openai", "judge.api_key=yes", "policy.pretrained=null",
                             "cluster.address=auto"])
    assert cfg.run.name == "123" and cfg.judge.api_key.get_secret_value() == "yes"
    assert cfg.policy.pretrained is None and cfg.cluster.address == "auto"


def test_override_beats_yaml_and_later_override_wins(tmp_path):
    p = _yaml(tmp_path, "learner:\n  lambda_c: 0.1\n  lr: 0.001\n")
    cfg = load_config(p, ["learner.lambda_c=0.2", "learner.lambda_c=0.7"])
    assert cfg.learner.lambda_c == 0.7 and cfg.learner.lr == 0.001


def test_override_with_mapping_merges_into_section(tmp_path):
    p = _yaml(tmp_path, "cluster:\n  prompts:\n    limit: 5\n")
    cfg = load_config(p, ["cluster.prompts={path: a.jsonl, format: geneval}"])
    assert cfg.cluster.prompts.limit == 5 and cfg.cluster.prompts.format == "geneval"


def test_override_unknown_key_names_dotted_key_and_suggests():
    err = _error(overrides=["learner.lamda_c=0.3"])
    text = str(err)
    assert "learner.lamda_c" in text and "did you mean 'learner.lambda_c'" in text
    assert "allowed at learner:" in text and "warmup_steps" in text


def test_override_unknown_section_and_value_used_as_section():
    assert "did you mean 'learner'" in str(_error(overrides=["lerner.lr=1"]))
    assert "'learner.lr' is a value, not a section" in str(_error(overrides=["learner.lr.x=1"]))


def test_override_without_equals_or_with_empty_key_is_clear():
    assert "has no '='" in str(_error(overrides=["learner.lambda_c"]))
    assert "empty key" in str(_error(overrides=["learner..lr=1"]))
    assert "empty key" in str(_error(overrides=["=1"]))


def test_override_bad_yaml_value():
    text = str(_error(overrides=["learner.betas=[0.9, 0.95"]))
    assert "learner.betas" in text and "cannot parse value" in text


# ---------------------------------------------------------------------------- types and ranges


def test_out_of_range_names_key_value_and_bound():
    text = str(_error(overrides=["learner.lambda_c=-1"]))
    assert "learner.lambda_c" in text and "got -1" in text and ">= 0" in text


def test_wrong_type_names_key_value_and_type():
    text = str(_error(overrides=["run.max_steps=abc"]))
    assert "run.max_steps" in text and "'abc'" in text and "int (>= 1)" in text


def test_literal_choices_are_listed():
    text = str(_error(overrides=["reward.semantics=sgned"]))
    assert "reward.semantics" in text and "'official', 'signed'" in text


def test_tuple_item_error_has_index():
    text = str(_error(overrides=["learner.betas=[0.9, 1.0]"]))
    assert "learner.betas[1]" in text and "less than 1" in text


@pytest.mark.parametrize("override, key", [
    ("learner.lr=0", "learner.lr"),
    ("learner.ema_decay=1.0", "learner.ema_decay"),
    ("regions.top_k=0", "regions.top_k"),
    ("cluster.buffer_capacity=0", "cluster.buffer_capacity"),
    ("policy.height=50", "policy.height"),
    ("cluster.metrics_port=70000", "cluster.metrics_port"),
    ("judge.temperature=-0.1", "judge.temperature"),
    ("reward.background=2", "reward.background"),
])
def test_range_checks(override, key):
    err = _error(overrides=[override])
    assert len(err.errors) == 1 and err.errors[0].startswith(f"{key}: ")
    assert f"got {override.split('=')[1]}" in err.errors[0] and "allowed:" in err.errors[0]


def test_multiple_errors_are_reported_together(tmp_path):
    p = _yaml(tmp_path, "learner:\n  lamda: 1\nrun:\n  seed: -1\n")
    err = _error(p, ["policy.hieght=64", "reward.merge=biggest"])
    joined = "\n".join(err.errors)
    assert len(err.errors) == 4
    for key in ("learner.lamda", "run.seed", "policy.hieght", "reward.merge"):
        assert key in joined
    assert str(p) in str(err) and "4 problems" in str(err)


# ------------------------------------------------------------------------------------ cross-field


def test_policy_needs_a_model_and_pretrained_wins_over_tiny():
    assert "no model to build" in str(_error(overrides=["policy.tiny=false"]))
    cfg = load_config(None, ["policy.pretrained=some/model", "policy.tiny=true"])
    assert cfg.policy.pretrained == "some/model" and cfg.policy.tiny


def test_lora_needs_target_modules():
    assert "lora_target_modules" in str(_error(overrides=["policy.lora_rank=8", "policy.lora_target_modules=[]"]))


def test_judge_endpoint_rules():
    assert "at least one endpoint" in str(_error(overrides=["judge.backend=openai", "judge.endpoints=[]"]))
    text = str(_error(overrides=["judge.backend=openai", "judge.endpoints=[ftp://x:1/v1]"]))
    assert "judge.endpoints" in text and "ftp://x:1/v1" in text and "http(s)" in text
    assert "duplicate" in str(_error(overrides=["judge.backend=openai", "judge.endpoints=[http://a:1/v1, http://a:1/v1]"]))
    text = str(_error(overrides=["judge.backend=openai", "judge.pretrained=x"]))
    assert "judge.pretrained: unknown key" in text and "allowed at judge with backend='openai'" in text
    cfg = load_config(None, ["judge.backend=openai", "judge.endpoints=[http://10.0.0.2:8000/v1, https://h/v1]"])
    assert cfg.judge.endpoints == ["http://10.0.0.2:8000/v1", "https://h/v1"]


def test_signed_only_reward_settings_are_rejected_in_official_mode():
    assert "semantics='signed'" in str(_error(overrides=["reward.merge=min"]))
    cfg = load_config(None, ["reward.semantics=signed", "reward.merge=smallest", "reward.background=-0.2"])
    assert cfg.reward.merge == "smallest" and cfg.reward.background == -0.2


def test_buffer_must_hold_a_learner_batch():
    text = str(_error(overrides=["cluster.buffer_capacity=3", "learner.batch_size=4"]))
    assert "cluster.buffer_capacity (3)" in text and "learner.batch_size (4)" in text


def test_nccl_weight_transport_needs_whole_gpus():
    text = str(_error(overrides=["cluster.weight_transport=nccl", "cluster.learner_resources.num_gpus=1",
                                 "cluster.sampler_resources.num_gpus=0.5"]))
    assert "sampler=0.5" in text and "learner" not in text.split("got num_gpus")[1]
    cfg = load_config(None, ["cluster.weight_transport=nccl", "cluster.learner_resources.num_gpus=1",
                             "cluster.sampler_resources.num_gpus=2"])
    assert cfg.cluster.weight_transport == "nccl"


# -------------------------------------------------------------------------------------- YAML files


def test_empty_and_comment_only_yaml_give_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == SRUMConfig()
    assert load_config(_yaml(tmp_path, "# nothing\n", "c.yaml")) == SRUMConfig()
    assert load_config(_yaml(tmp_path, "learner:\n  # lr: 1\n", "n.yaml")).learner.lr == 2.5e-5


def test_yaml_unknown_nested_key(tmp_path):
    p = _yaml(tmp_path, "cluster:\n  prompts:\n    limt: 3\n")
    text = str(_error(p))
    assert "cluster.prompts.limt" in text and "did you mean 'cluster.prompts.limit'" in text


def test_yaml_top_level_not_a_mapping(tmp_path):
    text = str(_error(_yaml(tmp_path, "- a\n- b\n")))
    assert "top level must be a mapping" in text and "list" in text


def test_yaml_section_not_a_mapping(tmp_path):
    text = str(_error(_yaml(tmp_path, "learner: 3\n")))
    assert "learner: must be a mapping" in text and "lambda_c" in text


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in str(_error(missing)) and "not found" in str(_error(missing))


def test_non_utf8_yaml_and_directory(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"run:\n  name: caf\xe9\n")
    assert "not UTF-8" in str(_error(p)) and "offset 16" in str(_error(p))  # len(b"run:\n  name: caf") == 16
    assert "not a file" in str(_error(tmp_path))


def test_validate_config_accepts_a_plain_dict_without_mutating_it():
    data = {"learner": {"lr": 0.001}, "run": None}
    cfg = IO.validate_config(data)
    assert cfg.learner.lr == 0.001 and data == {"learner": {"lr": 0.001}, "run": None}


def test_invalid_and_duplicate_key_yaml(tmp_path):
    assert "invalid YAML" in str(_error(_yaml(tmp_path, "learner: [1, 2\n")))
    text = str(_error(_yaml(tmp_path, "learner:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", "d.yaml")))
    assert "duplicate key 'lr'" in text


def test_every_example_config_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, SRUMConfig), f


def test_example_configs_contents():
    cpu = load_config(REPO / "configs" / "tiny_sd3.yaml")
    assert cpu.policy.tiny and cpu.policy.device == "cpu" and cpu.learner.timestep_shift == 1.0
    assert (REPO / cpu.cluster.prompts.path).is_file()
    shapes = load_config(REPO / "configs" / "default.yaml")  # the embedded default: the shapes world
    assert (shapes.policy.kind, shapes.judge.backend, shapes.regions.proposer) == ("shapes", "shapes", "components")
    assert shapes.cluster.prompts.path is None  # the world's own training prompts: one source for the split
    # training samples without CFG (it compounds through self-training), held-out evaluation with it
    assert (shapes.policy.guidance_scale, shapes.policy.eval_guidance_scale) == (1.0, 3.0)
    assert SRUMConfig().policy.eval_guidance_scale is None  # elsewhere: evaluate as sampled
    gpu = load_config(REPO / "configs" / "sd35_medium_vllm.yaml")
    assert gpu.judge.backend == "openai" and gpu.regions.model_type == "vit_h"
    assert gpu.learner == C.LearnerConfig(mixed_precision="bf16", ema_decay=0.9999)  # the paper recipe + the released EMA


# ------------------------------------------------------------------------------ hashing and docs


def test_config_hash_is_sha256_of_canonical_json():
    cfg = SRUMConfig()
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert config_hash(cfg) == hashlib.sha256(canonical.encode()).hexdigest()
    assert len(config_hash(cfg)) == 64


def test_config_hash_stable_across_key_order_and_changes_with_a_field(tmp_path):
    a = load_config(_yaml(tmp_path, "run:\n  seed: 1\n  name: x\n", "a.yaml"))
    b = load_config(_yaml(tmp_path, "run:\n  name: x\n  seed: 1\n", "b.yaml"))
    assert config_hash(a) == config_hash(b)
    c = load_config(None, ["run.seed=1", "run.name=x", "learner.lambda_c=0.4"])
    assert config_hash(c) != config_hash(a)


def test_config_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["learner.betas=[0.8, 0.9]", "reward.semantics=signed", "run.max_seconds=12.5"])
    back = load_config(_yaml(tmp_path, config_to_yaml(cfg)))
    assert back == cfg and config_hash(back) == config_hash(cfg)


def test_describe_config_lists_every_leaf_field():
    docs = {d.key: d for d in describe_config()}
    assert docs["learner.lambda_c"].default == 0.5
    assert docs["learner.lambda_c"].allowed == "float (>= 0)"
    assert docs["reward.semantics"].allowed == "one of 'official', 'signed'"
    assert docs["cluster.prompts.path"].default == C.DEFAULT_PROMPTS_PATH
    assert docs["learner.ema_decay"].allowed == "float (> 0, < 1), or null"
    assert all(d.description for d in docs.values())
    # one entry per leaf: every key is settable by an override
    per_section: dict[str, int] = {}
    for key in docs:
        per_section[key.split(".")[0]] = per_section.get(key.split(".")[0], 0) + 1
    assert per_section == {"run": 9, "policy": 14 + 5, "judge": 7, "regions": 10, "reward": 8, "learner": 19, "eval": 12,
                           # cluster: 17 own + 3 per actor-resources section x 2 + 5 prompt-source fields
                           # + weight_transport, ahead_batches, mode, round_samples, round_epochs
                           "cluster": 17 + 3 * 2 + 5 + 5}
    for key in docs:
        parsed, errors = IO.parse_overrides([f"{key}=null"])
        assert not errors and parsed[0][0] == key.split(".")


def test_format_config_help_groups_by_section():
    text = IO.format_config_help()
    assert text.startswith("[run]\n") and text.count("[cluster]") == 1
    assert "learner.lr = 2.5e-05" in text and "AdamW learning rate" in text
    assert "[judge (backend='transformers')]" in text and "judge.endpoints" not in text


# ------------------------------------------------------------------------------- tagged backends


def test_a_config_lists_only_the_fields_of_the_backends_it_selects():
    shapes = load_config(REPO / "configs" / "default.yaml")
    keys = {d.key for d in describe_config(shapes)}
    assert {"policy.pretrain_steps", "policy.split_seed", "regions.top_k"} <= keys
    assert not {k for k in keys if k.startswith("regions.") and "thresh" in k}
    assert not keys & {"regions.model_type", "regions.checkpoint", "judge.endpoints"}
    everything = {(d.section, d.key) for d in describe_config(all_variants=True)}
    assert ("regions (proposer='sam')", "regions.pred_iou_thresh") in everything
    assert ("judge (backend='openai')", "judge.endpoints") in everything
    assert ("policy (kind='shapes')", "policy.pretrain_steps") in everything


def test_switching_a_backend_applies_first_and_checks_the_keys_of_the_new_one(tmp_path):
    # the endpoint override comes first on the command line; the backend switch is applied before it
    cfg = load_config(None, ["judge.endpoints=[http://10.0.0.9:8000/v1]", "judge.backend=openai"])
    assert isinstance(cfg.judge, C.OpenAIJudgeConfig) and cfg.judge.endpoints == ["http://10.0.0.9:8000/v1"]
    p = _yaml(tmp_path, "judge:\n  backend: transformers\n  tiny: true\n  max_tokens: 99\n")
    switched = load_config(p, ["judge.backend=openai"])  # a switch on the command line drops `tiny` ...
    assert isinstance(switched.judge, C.OpenAIJudgeConfig) and switched.judge.max_tokens == 99  # ... keeps the rest
    q = _yaml(tmp_path, "judge:\n  backend: transformers\n  endpoints: [http://a:1/v1]\n", "q.yaml")
    text = str(_error(q))
    assert "judge.endpoints: unknown key" in text and "backend='transformers'" in text
    text = str(_error(overrides=["regions.proposer=segments"]))
    assert "regions.proposer: unknown proposer 'segments'" in text and "'sam', 'grounding'" in text
    assert isinstance(load_config(_yaml(tmp_path, "policy:\n  tiny: true\n", "p.yaml")).policy,
                      C.DiffusersPolicyConfig)  # no tag: the default backend


def test_round_trip_keeps_the_backend_of_each_section(tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml")
    back = load_config(_yaml(tmp_path, config_to_yaml(cfg)))
    assert back == cfg and isinstance(back.policy, C.ShapesPolicyConfig)
    assert isinstance(back.regions, C.ComponentsRegionsConfig) and isinstance(back.judge, C.ShapesJudgeConfig)
    none = load_config(None, ["regions.proposer=none"])
    assert isinstance(none.regions, C.NoRegionsConfig) and none.regions.keyword_filter is False
