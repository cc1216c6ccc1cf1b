"""Typed configuration for srum: pydantic models, YAML loading, dotted overrides, hashing.

Every section is a pydantic v2 model with ``extra="forbid"``; every field carries a default and a
one-line description (``describe_config()`` lists them for ``srum config --list``). The learner's
defaults are the paper's recipe (DESIGN §4, paper Table 6).

Loading (``load_config``): YAML file -> dict -> dotted overrides (``learner.lambda_c=0.3``, values
parsed as YAML so ``true``, ``3``, ``null`` and ``[0.9, 0.99]`` work) -> validation. Unknown keys,
wrong types and out-of-range values all raise one ``ConfigError`` that lists every problem with its
full dotted key and what is allowed. Nothing is silently ignored: duplicate YAML keys are errors too.

Precedence rules decided here (documented on the fields as well):
- ``policy.pretrained`` / ``judge.pretrained`` win over ``tiny``: ``tiny`` only says what to build
  when no pretrained model is named; with neither, validation fails.
- ``reward.background`` and ``reward.merge`` belong to ``semantics="signed"``; setting them to a
  non-default value with ``semantics="official"`` (fixed 0.5 background, max merge) is an error
  rather than a silent no-op.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin
from urllib.parse import urlparse

import annotated_types as at
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_PROMPTS_PATH", "ClusterConfig", "ConfigError", "FieldDoc", "JudgeConfig", "LearnerConfig", "PolicyConfig",
    "PromptSourceConfig", "RegionsConfig", "ResourceConfig", "RewardConfig", "RunConfig", "SRUMConfig",
    "config_hash", "config_to_yaml", "describe_config", "format_config_help", "load_config",
    "parse_overrides", "validate_config",
]

DEFAULT_PROMPTS_PATH = "configs/prompts/default.txt"


class ConfigError(ValueError):
    """A configuration problem; ``errors`` holds one line per problem, each naming its dotted key."""

    def __init__(self, errors: str | Sequence[str], source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        head = f"invalid config{f' ({source})' if source else ''}"
        if len(self.errors) == 1:
            super().__init__(f"{head}: {self.errors[0]}")
        else:
            super().__init__(f"{head}: {len(self.errors)} problems:\n" + "\n".join(f"  - {e}" for e in self.errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------------------
# sections


class RunConfig(_Section):
    name: str = Field("srum", min_length=1, description="Run name; used in the output folder and metrics.")
    output_dir: str = Field("runs", min_length=1, description="Folder that holds run outputs (checkpoints, metrics, gallery).")
    seed: int = Field(0, ge=0, description="Base random seed for prompts, noise and timesteps.")
    max_steps: int = Field(200, ge=1, description="Budget: stop after this many learner steps.")
    max_seconds: float | None = Field(None, gt=0, description="Budget: stop after this many wall-clock seconds (null = no limit).")
    log_every: int = Field(10, ge=1, description="Print progress and write metrics every N learner steps.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N learner steps, plus at start and end (0 = off; shapes world only).")
    eval_seeds: int = Field(2, ge=1, description="Images per held-out prompt in each evaluation.")


class PolicyConfig(_Section):
    kind: Literal["sd3", "flux", "shapes"] = Field("sd3", description="Generation module: a diffusers rectified-flow pipeline (sd3, flux) or the shapes world's pixel-space base model.")
    pretrained: str | None = Field(None, description="Hub id or local dir loaded with from_pretrained; wins over `tiny` when set.")
    tiny: bool = Field(True, description="Build a tiny random pipeline from configs when `pretrained` is null.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight dtype of the pipeline.")
    device: str = Field("auto", min_length=1, description="Torch device; 'auto' = cuda if available else cpu.")
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tuning of the transformer; >0 = peft LoRA of this rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (used when lora_rank > 0).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Transformer module names LoRA attaches to (used when lora_rank > 0).",
    )
    height: int = Field(64, ge=16, le=4096, description="Generated image height in pixels (multiple of 16).")
    width: int = Field(64, ge=16, le=4096, description="Generated image width in pixels (multiple of 16).")
    num_inference_steps: int = Field(8, ge=1, le=1000, description="Sampler denoising steps per image.")
    guidance_scale: float = Field(4.5, ge=0, description="Classifier-free guidance scale for sampling (<=1 disables CFG).")
    eval_guidance_scale: float | None = Field(
        None, ge=0, description="Guidance for held-out evaluation (null = guidance_scale); lets training samples go "
        "without CFG (guidance_scale 1) while evaluation uses it.")
    max_sequence_length: int = Field(77, ge=1, le=512, description="Max T5 prompt tokens.")
    sample_shift: float = Field(3.0, gt=0, description="shapes: timestep shift of the sampler's Euler schedule.")
    pretrain_steps: int = Field(900, ge=0, description="shapes: steps of in-run base pretraining (cached on disk).")
    pretrain_seed: int = Field(0, ge=0, description="shapes: seed of base pretraining.")
    pretrain_cache_dir: str | None = Field(None, description="shapes: cache dir of pretrained bases (null = $SRUM_CACHE or ~/.cache/srum).")
    shapes_split_seed: int = Field(0, ge=0, description="shapes: seed of the world's train/held-out prompt split.")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 (VAE factor x patch size)")
        return v

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        if self.pretrained is None and not self.tiny:
            raise ValueError("no model to build: set pretrained (hub id or local dir) or tiny=true")
        if self.kind == "shapes" and (self.height, self.width) != (32, 32):
            raise ValueError(f"kind='shapes' draws 32x32 images: set height=32 and width=32 (got {self.height}x{self.width})")
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ValueError("lora_target_modules must not be empty when lora_rank > 0")
        return self


class JudgeConfig(_Section):
    backend: Literal["transformers", "openai", "shapes"] = Field("transformers", description="'openai' = OpenAI-compatible server (vLLM); 'transformers' = in-process model; 'shapes' = the shapes world's learned judge.")
    mode: Literal["text", "structured", "logprob"] = Field("logprob", description="How scores are read: parsed text, JSON-schema output, or score-token logprobs.")
    endpoints: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"],
        description="Base URLs (http/https) of OpenAI-compatible servers; load is spread across them.",
        json_schema_extra={"allowed": "list of distinct http(s) URLs, e.g. ['http://127.0.0.1:8000/v1']"},
    )
    model: str = Field("tiny-vlm", min_length=1, description="Model name sent to the server (served-model-name).")
    api_key: str = Field("EMPTY", description="API key sent to the server ('EMPTY' for a local vLLM).")
    pretrained: str | None = Field(None, description="transformers backend: hub id or local dir; wins over `tiny` when set.")
    tiny: bool = Field(True, description="transformers backend: build a tiny random VLM when `pretrained` is null.")
    max_tokens: int = Field(512, ge=1, description="Max tokens per judge answer.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of the judge (0 = greedy).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(3, ge=0, description="Retries on connection errors and 5xx (4xx is never retried).")
    backoff_s: float = Field(0.5, ge=0, description="Base of the exponential backoff between retries, seconds.")
    max_in_flight_per_endpoint: int = Field(16, ge=1, description="Cap on concurrent requests per endpoint (the backpressure).")
    health_check: bool = Field(True, description="Check each endpoint (GET /v1/models: up, and serving `model`) before use.")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            p = urlparse(url)
            if p.scheme not in ("http", "https") or not p.netloc:
                raise ValueError(f"endpoint {url!r} is not an http(s) URL like 'http://127.0.0.1:8000/v1'")
        dup = sorted({u for u in v if v.count(u) > 1})
        if dup:
            raise ValueError(f"duplicate endpoints: {dup}")
        return v

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.backend == "openai":
            if not self.endpoints:
                raise ValueError("backend='openai' needs at least one endpoint in endpoints")
            if self.pretrained is not None:
                raise ValueError("pretrained applies to backend='transformers' only; the server's model is `model`")
        elif self.backend == "transformers" and self.pretrained is None and not self.tiny:
            raise ValueError("backend='transformers' has no model: set pretrained or tiny=true")
        return self


class RegionsConfig(_Section):
    proposer: Literal["sam", "grounding", "none", "components"] = Field("sam", description="Region proposals: SAM automatic masks, VLM grounding, connected components (shapes world), or none.")
    sam_model_type: Literal["vit_h", "vit_l", "vit_b", "tiny"] = Field("tiny", description="SAM architecture ('tiny' = small random model for tests).")
    sam_checkpoint: str | None = Field(None, description="Path to SAM weights (null = random init; real runs need one).")
    points_per_side: int = Field(8, ge=1, le=128, description="SAM automatic mask generator grid density.")
    pred_iou_thresh: float = Field(0.0, ge=0, le=1, description="SAM predicted-IoU filter (0 for random tiny models).")
    stability_score_thresh: float = Field(0.0, ge=0, le=1, description="SAM stability-score filter (0 for random tiny models).")
    top_k: int = Field(5, ge=1, description="Keep the K largest regions (the released code keeps 5).")
    min_area_frac: float = Field(0.01, ge=0, lt=1, description="Drop regions smaller than this fraction of the image.")
    dedup_iou: float = Field(0.9, gt=0, le=1, description="Drop a box overlapping a kept one with IoU >= this.")
    keyword_filter: bool = Field(False, description="Keep only regions whose label matches a prompt word.")


class RewardConfig(_Section):
    semantics: Literal["official", "signed"] = Field("official", description="'official' = released code (R in [0,1]); 'signed' = paper text (R in [-1,1]).")
    background: float = Field(0.0, ge=-1, le=1, description="Signed only: R outside all regions (official is fixed at 0.5).")
    merge: Literal["max", "mean", "min", "smallest"] = Field("max", description="Signed only: overlapping boxes rule (official always max).")
    granularity: Literal["region", "sample"] = Field("region", description="'sample' = one score for the whole image (ablation).")
    binarize: bool = Field(False, description="Binarise R to {0,1} (ablation).")
    binarize_threshold: float = Field(0.5, ge=0, le=1, description="Threshold on R mapped to [0,1] when binarize is on.")
    use_global: bool = Field(True, description="Multiply by the global-layout weight (g+1)/2; false = ablation without it.")
    resize: Literal["area", "bilinear"] = Field("area", description="How the image-resolution map is resized to the latent grid.")

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.semantics == "official":
            bad = [f"{k}={getattr(self, k)!r}" for k, d in (("background", 0.0), ("merge", "max")) if getattr(self, k) != d]
            if bad:
                raise ValueError(
                    f"{', '.join(bad)}: used only with semantics='signed' (official has a fixed 0.5 background "
                    "and max merge); set semantics=signed or drop the setting"
                )
        return self


class LearnerConfig(_Section):
    lr: float = Field(2.5e-5, gt=0, le=1, description="AdamW learning rate (paper: 2.5e-5).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="AdamW betas, each in [0, 1) (paper: 0.9, 0.95)."
    )
    eps: float = Field(1e-15, gt=0, description="AdamW epsilon (paper: 1e-15).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (paper: 0).")
    warmup_steps: int = Field(500, ge=0, description="Linear LR warm-up steps, then constant (paper: 500).")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clip (paper: 1.0; null = no clipping).")
    lambda_c: float = Field(0.5, ge=0, description="Weight of the reference (constraint) term L_ref (paper: 0.5).")
    weight_floor: float | None = Field(0.0, description="Floor of the per-pixel weight a*R + lambda_c (keeps the loss bounded; null = none).")
    timestep_shift: float = Field(4.0, gt=0, description="SD3 timestep shift (paper Table 6: 4.0; released code: 1.0).")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep distribution.")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit-normal timestep distribution.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA decay of trained weights (null = off; released code: 0.9999).")
    batch_size: int = Field(4, ge=1, description="Samples per learner step.")
    sync_every: int = Field(1, ge=1, description="Publish weights to samplers every N learner steps.")
    checkpoint_every: int = Field(100, ge=0, description="Save a checkpoint every N steps (0 = only the final one).")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="Autocast for the train step ('auto' = bf16 on CUDA, none on CPU).")


class ResourceConfig(_Section):
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per actor (fractions allowed).")


class PromptSourceConfig(_Section):
    path: str = Field(DEFAULT_PROMPTS_PATH, min_length=1, description="Prompt file (.txt, T2I-CompBench .json, GenEval .jsonl); relative = to the working dir, then the repo.")
    format: Literal["auto", "txt", "t2i_compbench", "geneval"] = Field("auto", description="File format; 'auto' = by extension and content.")
    categories: list[str] | None = Field(None, min_length=1, description="Keep only these categories (null = all).")
    limit: int | None = Field(None, ge=1, description="Keep at most this many prompts (after the category filter; null = all).")
    shuffle: bool = Field(True, description="Shuffle prompts with run.seed before cycling through them.")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address ('auto' or host:port); null = start a local Ray.")
    num_samplers: int = Field(1, ge=1, description="Sampler actors (generation).")
    num_scorers: int = Field(1, ge=1, description="Scorer actors (regions + judge + reward map).")
    sampler_resources: ResourceConfig = Field(default_factory=ResourceConfig, description="Ray resources per sampler actor.")
    scorer_resources: ResourceConfig = Field(default_factory=ResourceConfig, description="Ray resources per scorer actor.")
    learner_resources: ResourceConfig = Field(default_factory=ResourceConfig, description="Ray resources of the learner actor.")
    sample_batch_size: int = Field(4, ge=1, description="Prompts per sampler call.")
    buffer_capacity: int = Field(256, ge=1, description="Replay buffer capacity in samples (oldest dropped first).")
    max_staleness: int = Field(4, ge=0, description="Drop samples whose policy version lags the learner by more than this.")
    recency_bias: float = Field(0.0, ge=0, description="Sampling preference for recent samples (0 = uniform).")
    max_in_flight_batches: int = Field(4, ge=1, description="Bound on sample batches being generated or scored (backpressure).")
    max_restarts: int = Field(3, ge=-1, description="Ray actor restarts on failure (-1 = unlimited).")
    prompts: PromptSourceConfig = Field(default_factory=PromptSourceConfig, description="Prompt source.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Ray metrics export port (null = Ray's choice).")


class SRUMConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and budget.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Generation module (the policy).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Understanding module used as judge.")
    regions: RegionsConfig = Field(default_factory=RegionsConfig, description="Region proposals.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward-map semantics and ablations.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Loss and optimiser recipe.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray actors, buffer and prompts.")

    @model_validator(mode="after")
    def _check(self) -> SRUMConfig:
        if self.run.eval_every and self.policy.kind != "shapes":
            raise ValueError("run.eval_every needs an evaluator: only policy.kind='shapes' has one (set it to 0)")
        if self.cluster.buffer_capacity < self.learner.batch_size:
            raise ValueError(
                f"cluster.buffer_capacity ({self.cluster.buffer_capacity}) must be >= "
                f"learner.batch_size ({self.learner.batch_size})"
            )
        return self


# --------------------------------------------------------------------------------------------------
# schema introspection


def _unwrap_optional(ann: Any) -> tuple[Any, bool]:
    """Return (inner annotation, accepts None)."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(ann)):
            return args[0], True
    return ann, False


def _section_type(ann: Any) -> type[BaseModel] | None:
    inner, _ = _unwrap_optional(ann)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


_BOUNDS = ((at.Ge, ">=", "ge"), (at.Gt, ">", "gt"), (at.Le, "<=", "le"), (at.Lt, "<", "lt"))


def _constraints(metadata: Sequence[Any]) -> list[str]:
    out = []
    for m in metadata:
        for cls, sym, attr in _BOUNDS:
            if isinstance(m, cls):
                out.append(f"{sym} {getattr(m, attr)}")
        if isinstance(m, at.MinLen) and m.min_length > 0:
            out.append("non-empty")
        if getattr(m, "metadata", None):  # a nested FieldInfo inside Annotated
            out.extend(_constraints(m.metadata))
    return out


def _with(text: str, constraints: Sequence[str]) -> str:
    return f"{text} ({', '.join(constraints)})" if constraints else text


def _type_text(ann: Any, constraints: Sequence[str] = ()) -> str:
    """'float (> 0)', "one of 'a', 'b'", 'list of str or null', ... for an annotation."""
    inner, optional = _unwrap_optional(ann)
    origin = get_origin(inner)
    if origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in get_args(inner))
    elif origin is Annotated:
        base, *meta = get_args(inner)
        text = _type_text(base, [*_constraints(meta), *constraints])
        constraints = ()
    elif origin is list:
        text = f"list of {_type_text(get_args(inner)[0])}"
    elif origin is tuple:
        parts = [_type_text(a) for a in get_args(inner)]
        text = f"[{', '.join(parts)}]" if len(set(parts)) > 1 else f"list of {len(parts)} x {parts[0]}"
    elif isinstance(inner, type) and issubclass(inner, BaseModel):
        text = "section: " + ", ".join(inner.model_fields)
    else:
        text = getattr(inner, "__name__", str(inner))
    text = _with(text, constraints)
    return f"{text}, or null" if optional else text


def _allowed_text(info: Any) -> str:
    """Human-readable description of what a field accepts, e.g. 'float (> 0)' or "one of 'a', 'b'"."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("allowed") or _type_text(info.annotation, _constraints(info.metadata)))


def _lookup(parts: Sequence[str | int], model: type[BaseModel] | None = None) -> Any | None:
    """Resolve a pydantic ``loc`` to the FieldInfo it names (list indexes skipped); None if unknown."""
    owner: type[BaseModel] | None = model or SRUMConfig
    info = None
    for p in parts:
        if isinstance(p, int):
            continue
        if owner is None or p not in owner.model_fields:
            return None
        info = owner.model_fields[p]
        owner = _section_type(info.annotation)
    return info


def _dotted(parts: Sequence[str | int]) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


def _unknown_key(model: type[BaseModel], prefix: str, key: Any) -> str:
    allowed = list(model.model_fields)
    full = f"{prefix}.{key}" if prefix else str(key)
    msg = f"{full}: unknown key"
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    return msg + f" (allowed at {prefix or 'top level'}: {', '.join(allowed)})"


def _check_keys(model: type[BaseModel], data: dict[str, Any], prefix: str, errors: list[str]) -> None:
    """Report (and remove) unknown keys, recursing into sections; null sections become {}."""
    for key in list(data):
        if key not in model.model_fields:
            errors.append(_unknown_key(model, prefix, key))
            del data[key]
            continue
        section = _section_type(model.model_fields[key].annotation)
        if section is not None:
            if data[key] is None:
                data[key] = {}  # `learner:` with everything below commented out means "defaults"
            if isinstance(data[key], dict):
                _check_keys(section, data[key], f"{prefix}.{key}" if prefix else key, errors)


# --------------------------------------------------------------------------------------------------
# overrides and loading


def _parse_value(raw: str, info: Any) -> Any:
    """Parse an override value as YAML; plain-string fields keep the raw text (so `run.name=123` works)."""
    inner, optional = _unwrap_optional(info.annotation)
    if inner is str:
        if optional and raw.strip() in ("null", "Null", "NULL", "~"):
            return None
        return raw
    return yaml.safe_load(raw) if raw.strip() else raw


def parse_overrides(
    overrides: Sequence[str], model: type[BaseModel] | None = None
) -> tuple[list[tuple[list[str], Any]], list[str]]:
    """Parse ``a.b.c=value`` strings against the schema; returns ([(path, value)], [error lines])."""
    model = model or SRUMConfig
    parsed: list[tuple[list[str], Any]] = []
    errors: list[str] = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r} has no '=': write it as dotted.key=value, e.g. learner.lambda_c=0.3")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            errors.append(f"override {item!r}: empty key or empty segment in {key!r}")
            continue
        owner, prefix, info, ok = model, "", None, True
        for i, p in enumerate(parts):
            if owner is None:
                errors.append(f"{_dotted(parts)}: '{prefix}' is a value, not a section with keys")
                ok = False
                break
            if p not in owner.model_fields:
                errors.append(_unknown_key(owner, prefix, p))
                ok = False
                break
            info = owner.model_fields[p]
            prefix = f"{prefix}.{p}" if prefix else p
            owner = _section_type(info.annotation) if i < len(parts) - 1 else None
        if not ok:
            continue
        try:
            value = _parse_value(raw, info)
        except yaml.YAMLError as e:
            errors.append(f"{key}: cannot parse value {raw!r} as YAML ({str(e).splitlines()[0]})")
            continue
        parsed.append((parts, value))
    return parsed, errors


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain safe_load keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections ({', '.join(SRUMConfig.model_fields)}), "
            f"got {type(data).__name__}"
        )
    return data


def _format_error(err: dict[str, Any]) -> str:
    """One pydantic error -> 'dotted.key: problem (got X; allowed: Y)'."""
    loc = list(err["loc"])
    key = _dotted(loc) or "config"
    if err["type"] == "extra_forbidden" and loc:
        parent = _lookup(loc[:-1]) if len(loc) > 1 else None
        section = _section_type(parent.annotation) if parent is not None else SRUMConfig
        return _unknown_key(section or SRUMConfig, _dotted(loc[:-1]), loc[-1])
    info = _lookup(loc)
    section = _section_type(info.annotation) if info is not None else None
    if info is not None and section is None:
        msg = err["msg"].removeprefix("Value error, ")
        return f"{key}: {msg} (got {err.get('input')!r}; allowed: {_allowed_text(info)})"
    if section is not None and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: must be a mapping (got {err.get('input')!r}; allowed keys: {', '.join(section.model_fields)})"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}"


def _set_path(data: dict[str, Any], parts: Sequence[str], value: Any) -> str | None:
    """Set ``data[a][b][c] = value`` (dicts merge into existing sections); returns an error or None."""
    node = data
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            return f"{'.'.join(parts)}: cannot set inside {'.'.join(parts[: i + 1])}, which is {node[p]!r}, not a mapping"
        node = node[p]
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}
    else:
        node[last] = value
    return None


def validate_config(data: dict[str, Any], source: str | None = None, extra_errors: Sequence[str] = ()) -> SRUMConfig:
    """Validate a plain dict; every problem (unknown keys, types, ranges) is raised in one ConfigError."""
    errors = list(extra_errors)
    data = copy.deepcopy(data) if data else {}
    _check_keys(SRUMConfig, data, "", errors)
    try:
        cfg = SRUMConfig.model_validate(data)
    except ValidationError as e:
        errors.extend(_format_error(err) for err in e.errors())
        cfg = None
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SRUMConfig:
    """Load a YAML config (or defaults when ``path`` is None), apply dotted overrides, validate.

    Raises ConfigError naming the dotted key and what is allowed for every problem found.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    data = _read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else None
    parsed, errors = parse_overrides(overrides)
    for parts, value in parsed:
        problem = _set_path(data, parts, value)
        if problem:
            errors.append(problem)
    return validate_config(data, source, errors)


def config_hash(cfg: BaseModel) -> str:
    """Stable sha256 hex digest of the canonical JSON dump (sorted keys, no whitespace)."""
    payload = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def config_to_yaml(cfg: BaseModel) -> str:
    """YAML text of the full config; ``load_config`` of it gives back an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------------
# documentation


class FieldDoc(NamedTuple):
    key: str
    allowed: str
    default: Any
    description: str


def describe_config(model: type[BaseModel] = SRUMConfig, prefix: str = "") -> list[FieldDoc]:
    """Every leaf field as (dotted key, allowed values, default, description), in declaration order."""
    docs: list[FieldDoc] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        section = _section_type(info.annotation)
        if section is not None:
            docs.extend(describe_config(section, key))
            continue
        default = info.get_default(call_default_factory=True)
        docs.append(FieldDoc(key, _allowed_text(info), default, info.description or ""))
    return docs


def format_config_help(docs: Sequence[FieldDoc] | None = None) -> str:
    """A text table of ``describe_config()`` for ``srum config --list``."""
    docs = describe_config() if docs is None else docs
    groups: dict[str, list[FieldDoc]] = {}
    for d in docs:
        groups.setdefault(d.key.rsplit(".", 1)[0], []).append(d)
    lines = []
    for section, items in groups.items():
        lines.append(f"[{section}]")
        for d in items:
            default = json.dumps(list(d.default) if isinstance(d.default, tuple) else d.default)
            lines.append(f"  {d.key} = {default}    ({d.allowed})\n      {d.description}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
