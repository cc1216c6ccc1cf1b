"""The typed configuration of srum: one pydantic model per section, backends as discriminated unions.

Every section forbids unknown keys and every field carries a default and a one-line description
(``srum config --list`` prints them for the sections a config actually selects). The learner's
defaults are the paper's recipe (DESIGN §4, paper Table 6). Loading YAML with dotted overrides, the
error messages and the field listing live in :mod:`core.config_io`; this module is only the schema.

Backends are tagged unions, so each section carries only the fields of the implementation it selects:

- ``policy`` on ``kind``: ``sd3`` / ``flux`` (:class:`DiffusersPolicyConfig`) or ``shapes``
  (:class:`ShapesPolicyConfig`, the embedded world);
- ``judge`` on ``backend``: ``openai`` (a server such as vLLM), ``transformers`` (in-process) or
  ``shapes`` (the world's learned judge);
- ``regions`` on ``proposer``: ``sam``, ``grounding``, ``components`` (the shapes world) or ``none``.

Precedence rules decided here (documented on the fields as well):
- ``policy.pretrained`` / ``judge.pretrained`` win over ``tiny``: ``tiny`` only says what to build when
  no pretrained model is named; with neither, validation fails.
- ``reward.background`` and ``reward.merge`` belong to ``semantics="signed"``; a non-default value with
  ``semantics="official"`` (fixed 0.5 background, max merge) is an error rather than a silent no-op.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "DEFAULT_PROMPTS_PATH", "BagelJudgeConfig", "BagelPolicyConfig", "ClusterConfig", "ComponentsRegionsConfig",
    "DiffusersPolicyConfig", "JudgeLaunchConfig",
    "GroundingRegionsConfig", "JudgeConfig", "LearnerConfig", "NoRegionsConfig", "OpenAIJudgeConfig",
    "PolicyConfig", "PromptSourceConfig", "RegionsConfig", "ResourceConfig", "RewardConfig", "RunConfig",
    "EvalConfig", "SRUMConfig", "SamRegionsConfig", "ShapesJudgeConfig", "ShapesPolicyConfig", "TransformersJudgeConfig",
]

DEFAULT_PROMPTS_PATH = "configs/prompts/default.txt"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MAX_ACTORS = 256  # per role: the most samplers or scorers a run (and `srum scale`) may ask for
RUN_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"  # one path component (and not "." or "..", checked on the field)


class _Section(BaseModel):
    # floats must be finite (inf / nan fail here, with the key, not later at run time); booleans given
    # for numbers are refused by the loader (core.config_io), which names the key
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- run
class RunConfig(_Section):
    name: str = Field("srum", min_length=1, max_length=128,
                      description="Run name: one folder name (letters, digits, '.', '_', '-'), used for outputs and metrics.")
    output_dir: str = Field("runs", min_length=1, description="Storage for run outputs (checkpoints, metrics, gallery); made absolute by the driver before any actor starts (relative = to the launch dir, or $SRUM_STORAGE / ~/srum-runs under `ray job submit`); must be shared storage on a multi-node cluster.")
    seed: int = Field(0, ge=0, description="Base random seed for prompts, noise and timesteps.")
    max_steps: int = Field(200, ge=1, description="Budget: stop after this many learner steps.")
    max_seconds: float | None = Field(None, gt=0, description="Budget: stop after this many wall-clock seconds (null = no limit).")
    refresh_every: int = Field(20, ge=1, description="Rewrite curves.png and gallery.html every N learner steps (and at the end).")
    eval_every: int = Field(0, ge=0, description="Evaluation every N learner steps, plus at start and end (0 = off): the world's own evaluator, else the VLM evaluator on eval.prompts.")
    eval_seeds: int = Field(2, ge=1, description="Images per held-out prompt in each evaluation.")
    eval_min_per_category: int = Field(0, ge=0, description="Worlds whose prompts have categories (shapes): more images per prompt where a category has few prompts, so each category gets at least this many (0 = eval_seeds only).")

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        if not re.fullmatch(RUN_NAME_PATTERN, v):
            raise ValueError("must be one folder name (letters, digits, '.', '_', '-'; no '/'), kept inside run.output_dir")
        if v in (".", ".."):
            raise ValueError("must name a folder inside run.output_dir, not '.' or '..'")
        return v


# ------------------------------------------------------------------------------------------ policy
class _PolicyBase(_Section):
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = ("kind", "lora_rank", "lora_alpha", "lora_target_modules")
    """Fields whose change alters the optimisation: resuming across a change of one is an error."""

    device: str = Field("auto", min_length=1, description="Torch device; 'auto' = cuda if available else cpu.")
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tuning of the denoiser; >0 = peft LoRA of this rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (used when lora_rank > 0).")
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS),
                                           description="Denoiser module names LoRA attaches to (used when lora_rank > 0).")
    num_inference_steps: int = Field(8, ge=1, le=1000, description="Sampler denoising steps per image.")
    guidance_scale: float = Field(4.5, ge=0, description="Classifier-free guidance scale for sampling (<=1 disables CFG).")
    eval_guidance_scale: float | None = Field(
        None, ge=0, description="Guidance for held-out evaluation (null = guidance_scale); lets training samples go "
        "without CFG (guidance_scale 1) while evaluation uses it.")

    @model_validator(mode="after")
    def _lora(self) -> _PolicyBase:
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ValueError("lora_target_modules must not be empty when lora_rank > 0")
        return self


class DiffusersPolicyConfig(_PolicyBase):
    """A diffusers rectified-flow pipeline: StableDiffusion3Pipeline (sd3) or FluxPipeline (flux)."""

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (*_PolicyBase.TRAINING_FIELDS, "pretrained", "tiny", "dtype")

    kind: Literal["sd3", "flux"] = Field("sd3", description="Which diffusers pipeline: StableDiffusion3Pipeline or FluxPipeline.")
    pretrained: str | None = Field(None, description="Hub id or local dir loaded with from_pretrained; wins over `tiny` when set.")
    tiny: bool = Field(True, description="Build a tiny random pipeline from configs when `pretrained` is null.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight dtype of the pipeline.")
    height: int = Field(64, ge=16, le=4096, description="Generated image height in pixels (multiple of 16).")
    width: int = Field(64, ge=16, le=4096, description="Generated image width in pixels (multiple of 16).")
    max_sequence_length: int = Field(77, ge=1, le=512, description="Max T5 prompt tokens.")
    offload_text_encoders: bool = Field(False, description="Encode the run's prompts once when the policy is built (cluster.prompts, eval.prompts when run.eval_every, and ''), then move the text encoders to the CPU and keep the embedding cache there: T5-XXL needs no GPU memory while sampling and training (a prompt not seen then is encoded on the CPU).")
    prompt_cache_size: int = Field(512, ge=1, description="Prompt embeddings kept in the LRU cache (raised to the precomputed prompt set's size with offload_text_encoders).")
    vae_tiling: bool = Field(False, description="Decode latents tile by tile (AutoencoderKL.enable_tiling): bounded VAE memory at high resolution.")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (AutoencoderKL.enable_slicing).")
    gradient_checkpointing: bool = Field(False, description="Recompute the denoiser's activations in the backward pass (less learner memory, more step time); sampling is unaffected.")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 (VAE factor x patch size)")
        return v

    @model_validator(mode="after")
    def _model(self) -> DiffusersPolicyConfig:
        if self.pretrained is None and not self.tiny:
            raise ValueError("no model to build: set pretrained (hub id or local dir) or tiny=true")
        return self


class ShapesPolicyConfig(_PolicyBase):
    """The shapes world's pixel-space generator, pretrained in-run on rendered images (cached on disk)."""

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (*_PolicyBase.TRAINING_FIELDS, "pretrain_steps", "pretrain_seed",
                                                  "split_seed")

    kind: Literal["shapes"] = Field("shapes", description="The shapes world's base generator.")
    num_inference_steps: int = Field(16, ge=1, le=1000, description="Sampler Euler steps per image.")
    guidance_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale for training samples (<=1 disables CFG).")
    sample_shift: float = Field(3.0, gt=0, description="Timestep shift of the sampler's Euler schedule.")
    pretrain_steps: int = Field(4000, ge=0, description="Steps of base pretraining (the default base is shipped in shapes/bases; other budgets train in-run, cached on disk).")
    pretrain_seed: int = Field(0, ge=0, description="Seed of base pretraining.")
    pretrain_cache_dir: str | None = Field(None, description="Cache dir of pretrained bases (null = $SRUM_CACHE/shapes or ~/.cache/srum/shapes).")
    split_seed: int = Field(0, ge=0, description="Seed of the world's train/held-out prompt split (the one source of both prompt sets).")


BAGEL_LORA_TARGETS = ["q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen",
                      "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj"]
BAGEL_GEN_HEADS = ("vae2llm", "llm2vae", "time_embedder.mlp.0", "time_embedder.mlp.2")


class BagelPolicyConfig(_PolicyBase):
    """Bagel's generation module (bagel/; nemo-automodel's modelling code): a tiny random model or a local
    checkpoint directory. Only the generation side trains (LoRA on the ``*_moe_gen`` experts, or all of
    them and the flow head); the understanding experts stay frozen, so a judge built from the same weights
    is the same understanding module at every policy version."""

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (*_PolicyBase.TRAINING_FIELDS, "pretrained", "tiny", "tiny_seed",
                                                  "dtype")

    kind: Literal["bagel"] = Field("bagel", description="Bagel (BAGEL-7B-MoT) generation experts.")
    pretrained: str | None = Field(None, description="Local Bagel checkpoint dir (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors, tokenizer); wins over `tiny`.")
    tiny: bool = Field(True, description="Build a tiny random Bagel from configs when `pretrained` is null.")
    tiny_seed: int = Field(0, ge=0, description="Seed of the tiny model's weights (the judge's tiny_seed must match).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weight dtype (trainable tensors stay float32).")
    lora_rank: int = Field(0, ge=0, description="0 = full training of the generation experts and flow head; >0 = peft LoRA of this rank.")
    lora_target_modules: list[str] = Field(default_factory=lambda: list(BAGEL_LORA_TARGETS),
                                           description="Generation-expert module names LoRA attaches to (used when lora_rank > 0).")
    height: int = Field(64, ge=16, le=1024, description="Generated image height in pixels (multiple of 16).")
    width: int = Field(64, ge=16, le=1024, description="Generated image width in pixels (multiple of 16).")
    num_inference_steps: int = Field(8, ge=1, le=1000, description="Sampler Euler steps per image (Bagel's default: 49).")
    guidance_scale: float = Field(1.0, ge=0, description="Text CFG scale for training samples (<=1 disables; Bagel's inference default: 4.0).")
    sample_shift: float = Field(3.0, gt=0, description="Timestep shift of the sampler's schedule (Bagel's inference default: 3.0).")
    cfg_interval: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = Field(
        (0.4, 1.0), description="CFG applies while lo < t <= hi (Bagel's default: 0.4, 1.0).")
    cfg_renorm_min: float = Field(0.0, ge=0, le=1, description="Floor of the CFG renormalisation factor (Bagel's default: 0).")
    cfg_renorm_type: Literal["global", "channel"] = Field("global", description="CFG renormalisation: over each image's tokens or per token.")
    max_prompt_tokens: int = Field(256, ge=1, description="Prompt tokens kept (longer prompts are cut).")
    attention: Literal["auto", "sdpa", "flex"] = Field("auto", description="Packed attention kernel: 'auto' = flex on CUDA, sdpa elsewhere.")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 (VAE factor 8 x latent patch 2)")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _generation_only(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "_moe_gen" not in t and t not in BAGEL_GEN_HEADS]
        if bad:
            raise ValueError(f"{bad} are not generation modules: Bagel trains only the *_moe_gen experts and "
                             f"{list(BAGEL_GEN_HEADS)} (the understanding experts are the judge and stay frozen)")
        return v

    @model_validator(mode="after")
    def _model(self) -> BagelPolicyConfig:
        if self.pretrained is None and not self.tiny:
            raise ValueError("no model to build: set pretrained (a local Bagel checkpoint dir) or tiny=true")
        if self.cfg_interval[0] > self.cfg_interval[1]:
            raise ValueError(f"cfg_interval {self.cfg_interval}: lo must not exceed hi")
        return self


PolicyConfig = Annotated[DiffusersPolicyConfig | ShapesPolicyConfig | BagelPolicyConfig, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------- judge
class _JudgeBase(_Section):
    mode: Literal["text", "structured", "logprob"] = Field("logprob", description="How scores are read: parsed text, JSON-schema output, or score-token logprobs.")
    max_tokens: int = Field(512, ge=1, description="Max tokens per judge answer.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of the judge (0 = greedy).")
    on_ambiguous: Literal["drop", "neutral", "use"] = Field("drop", description="An answer read only with a doubt (another scale, conflicting scores, a clamp, ...): drop the sample, score it 0, or use the parser's best reading.")


class JudgeLaunchConfig(_Section):
    """Judge servers the run starts itself, one Ray actor per replica (``actors/judge_server.py``): the driver
    waits for their health, hands their URLs to the scorers in place of ``judge.endpoints``, restarts a dead
    one, and ``srum scale --judges N`` changes their number while the loop runs."""

    replicas: int = Field(1, ge=1, le=MAX_ACTORS, description="Judge servers to start.")
    model: str | None = Field(None, min_length=1, description="Model the servers load (hub id or local dir); null = judge.model.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per replica (its Ray actor's num_gpus).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (its Ray actor's num_cpus).")
    host: str = Field("127.0.0.1", min_length=1, description="Address the servers bind to: 127.0.0.1 serves scorers on the same node only; 0.0.0.0 serves the cluster (the URL then names the node's address).")
    command: list[str] | None = Field(None, min_length=1, description="Server command with {model}, {served_model_name}, {host} and {port} filled in (null = `vllm serve {model}` with srum's flags); a free port is picked on the replica's node.")
    extra_args: list[str] = Field(default_factory=list, description="Extra server flags appended to the command (e.g. ['--max-model-len', '4096']).")
    env: dict[str, str | None] = Field(default_factory=dict, description="Environment variables of the server processes (e.g. VLLM_CPU_KVCACHE_SPACE; null removes one, e.g. a PYTHONPATH that would mix another venv in).")
    ready_timeout_s: float = Field(900.0, gt=0, description="Longest wait for a replica's /health after it starts, seconds.")
    max_restarts: int = Field(5, ge=0, description="Restarts of a replica's server process when it dies (then it is left down, counted).")
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources per replica (e.g. {'judge': 1} to place replicas on a node group that advertises it).")

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"custom resource amounts must be >= 0, got {bad}")
        if any(not k for k in v):
            raise ValueError("a custom resource needs a non-empty name")
        reserved = sorted(set(v) & {"CPU", "GPU"})
        if reserved:
            raise ValueError(f"{', '.join(reserved)}: set by num_cpus / num_gpus, not as a custom resource")
        return v


class OpenAIJudgeConfig(_JudgeBase):
    """An OpenAI-compatible chat-completions server (vLLM in production), one or more endpoints."""

    backend: Literal["openai"] = Field("openai", description="OpenAI-compatible server(s), e.g. vLLM.")
    endpoints: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"],
        description="Base URLs (http/https) of OpenAI-compatible servers; load is spread across them.",
        json_schema_extra={"allowed": "list of distinct http(s) URLs, e.g. ['http://127.0.0.1:8000/v1']"},
    )
    model: str = Field("tiny-vlm", min_length=1, description="Model name sent to the server (served-model-name).")
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="API key sent to the server ('EMPTY' for a local vLLM); never written to disk (redacted in the saved config).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Environment variable that holds the API key; when set in the environment it wins over api_key (null = use api_key).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(3, ge=0, description="Retries on connection errors and 5xx (4xx is never retried).")
    backoff_s: float = Field(0.5, ge=0, description="Base of the exponential backoff between retries, seconds.")
    max_in_flight_per_endpoint: int = Field(16, ge=1, description="Cap on concurrent requests per endpoint (the backpressure).")
    health_check: bool = Field(True, description="Check each endpoint (GET /v1/models: up, and serving `model`) before use.")
    launch: JudgeLaunchConfig | None = Field(None, description="Start the judge servers inside the job (null = use the running servers of `endpoints`).")

    @model_validator(mode="after")
    def _launch_or_endpoints(self) -> OpenAIJudgeConfig:
        if self.launch is not None and "endpoints" in self.model_fields_set:
            raise ValueError("judge.endpoints and judge.launch are both set: launched replicas provide the endpoints "
                             "(drop one of them)")
        return self

    def api_key_value(self) -> str:
        """The key to send: ``$api_key_env`` when that variable is set, else ``api_key``."""
        import os

        from_env = os.environ.get(self.api_key_env) if self.api_key_env else None
        return from_env if from_env else self.api_key.get_secret_value()

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("backend='openai' needs at least one endpoint in endpoints")
        for url in v:
            p = urlparse(url)
            if p.scheme not in ("http", "https") or not p.netloc:
                raise ValueError(f"endpoint {url!r} is not an http(s) URL like 'http://127.0.0.1:8000/v1'")
        dup = sorted({u for u in v if v.count(u) > 1})
        if dup:
            raise ValueError(f"duplicate endpoints: {dup}")
        return v


class TransformersJudgeConfig(_JudgeBase):
    """A transformers VLM run in the scorer's own process."""

    backend: Literal["transformers"] = Field("transformers", description="In-process transformers VLM.")
    pretrained: str | None = Field(None, description="Hub id or local dir of the VLM; wins over `tiny` when set.")
    tiny: bool = Field(True, description="Build a tiny random VLM when `pretrained` is null.")

    @model_validator(mode="after")
    def _model(self) -> TransformersJudgeConfig:
        if self.pretrained is None and not self.tiny:
            raise ValueError("backend='transformers' has no model: set pretrained or tiny=true")
        return self


class ShapesJudgeConfig(_JudgeBase):
    """The shapes world's learned understanding module, in-process."""

    backend: Literal["shapes"] = Field("shapes", description="The shapes world's learned judge.")
    mode: Literal["text", "structured", "logprob"] = Field("text", description="How scores are read: parsed text, JSON-schema output, or score-token logprobs.")


class BagelJudgeConfig(_JudgeBase):
    """Bagel's understanding module in the scorer's process (bagel/): its own copy of the policy's weights."""

    backend: Literal["bagel"] = Field("bagel", description="In-process Bagel understanding (the policy's own model).")
    pretrained: str | None = Field(None, description="Local Bagel checkpoint dir (the policy's); loaded understanding-only; wins over `tiny`.")
    tiny: bool = Field(True, description="Build the tiny random Bagel of `tiny_seed` when `pretrained` is null.")
    tiny_seed: int = Field(0, ge=0, description="Seed of the tiny model (must equal policy.tiny_seed: the same weights).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="Weight dtype ('auto' = bfloat16 on CUDA, float32 elsewhere).")
    device: str = Field("auto", min_length=1, description="Torch device; 'auto' = cuda if available else cpu.")
    attention: Literal["auto", "sdpa", "flex"] = Field("auto", description="Packed attention kernel: 'auto' = flex on CUDA, sdpa elsewhere.")
    max_request_tokens: int = Field(4096, ge=16, description="Longest request (tokens) the judge accepts; a longer one is an error.")

    @model_validator(mode="after")
    def _model(self) -> BagelJudgeConfig:
        if self.pretrained is None and not self.tiny:
            raise ValueError("backend='bagel' has no model: set pretrained or tiny=true")
        return self


JudgeConfig = Annotated[OpenAIJudgeConfig | TransformersJudgeConfig | ShapesJudgeConfig | BagelJudgeConfig,
                        Field(discriminator="backend")]


# ----------------------------------------------------------------------------------------- regions
class NoRegionsConfig(_Section):
    """No regions: the reward map is the background times the global weight."""

    keyword_filter: ClassVar[bool] = False  # nothing to filter

    proposer: Literal["none"] = Field("none", description="No region proposals.")


class _SelectedRegions(_Section):
    top_k: int = Field(5, ge=1, description="Keep the K largest regions (the released code keeps 5).")
    min_area_frac: float = Field(0.01, ge=0, lt=1, description="Drop regions smaller than this fraction of the image.")
    dedup_iou: float = Field(0.9, gt=0, le=1, description="Drop a box overlapping a kept one with IoU >= this.")
    keyword_filter: bool = Field(False, description="Keep only regions whose identified object matches a prompt word.")


class SamRegionsConfig(_SelectedRegions):
    """segment-anything's automatic mask generator on the generated image."""

    proposer: Literal["sam"] = Field("sam", description="SAM automatic masks.")
    model_type: Literal["vit_h", "vit_l", "vit_b", "tiny"] = Field("tiny", description="SAM architecture ('tiny' = small random model for tests).")
    checkpoint: str | None = Field(None, description="Path to SAM weights (null = random init; real runs need one).")
    points_per_side: int = Field(8, ge=1, le=128, description="Automatic mask generator grid density.")
    pred_iou_thresh: float = Field(0.0, ge=0, le=1, description="Predicted-IoU filter (0 for random tiny models; SAM's own default 0.88).")
    stability_score_thresh: float = Field(0.0, ge=0, le=1, description="Stability-score filter (0 for random tiny models; SAM's own default 0.95).")


class GroundingRegionsConfig(_SelectedRegions):
    """Boxes from the understanding module's own grounding answer."""

    proposer: Literal["grounding"] = Field("grounding", description="The judge's own grounding.")


class ComponentsRegionsConfig(_SelectedRegions):
    """Connected components of the generated image (the shapes world)."""

    proposer: Literal["components"] = Field("components", description="Connected components (shapes world).")


RegionsConfig = Annotated[SamRegionsConfig | GroundingRegionsConfig | ComponentsRegionsConfig | NoRegionsConfig,
                          Field(discriminator="proposer")]


# ------------------------------------------------------------------------------------------ reward
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


# ----------------------------------------------------------------------------------------- learner
class LearnerConfig(_Section):
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        "lr", "betas", "eps", "weight_decay", "warmup_steps", "grad_clip", "lambda_c", "constraint", "weight_floor",
        "timestep_shift", "logit_mean", "logit_std", "ema_decay", "ema_warmup_steps", "mixed_precision")
    """Fields whose change alters the optimisation: resuming across a change of one is an error."""

    lr: float = Field(2.5e-5, gt=0, le=1, description="AdamW learning rate (paper: 2.5e-5).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="AdamW betas, each in [0, 1) (paper: 0.9, 0.95)."
    )
    eps: float = Field(1e-15, gt=0, description="AdamW epsilon (paper: 1e-15).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (paper: 0).")
    warmup_steps: int = Field(500, ge=0, description="Linear LR warm-up steps, then constant (paper: 500).")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clip (paper: 1.0; null = no clipping).")
    lambda_c: float = Field(0.5, ge=0, description="Weight of the reference (constraint) term L_ref (paper: 0.5).")
    constraint: Literal["sample", "reference"] = Field("sample", description="What L_ref holds the velocity to: 'sample' = the sample's own target eps - x0 (the paper's Eq. 2 as written); 'reference' = the frozen base's velocity at the same x_t (the KL reading; one extra no-grad forward per step).")
    weight_floor: float | None = Field(0.0, description="Floor of the per-pixel weight on the sample's error: a*R + lambda_c (constraint 'sample') or a*R ('reference'); keeps the loss bounded (null = none).")
    timestep_shift: float = Field(4.0, gt=0, description="SD3 timestep shift (paper Table 6: 4.0; released code: 1.0).")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep distribution.")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit-normal timestep distribution.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA decay of trained weights (null = off; released code: 0.9999).")
    ema_warmup_steps: int = Field(10, ge=0, description="EMA warm-up: the decay at step s is min(ema_decay, (1 + s) / (ema_warmup_steps + s)), so a short run's EMA is not stuck at the base (0 or 1 = the constant ema_decay).")
    batch_size: int = Field(4, ge=1, description="Samples per learner step.")
    sync_every: int = Field(1, ge=1, description="Publish weights to samplers every N learner steps.")
    checkpoint_every: int = Field(100, ge=0, description="Save a checkpoint every N steps (0 = only the final one).")
    keep_checkpoints: int = Field(3, ge=0, description="Keep the newest N complete checkpoints, prune older ones (0 = keep all).")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="Autocast for the train step ('auto' = bf16 on CUDA, none on CPU).")


# ----------------------------------------------------------------------------------------- cluster
class ResourceConfig(_Section):
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per actor (fractions allowed).")


class PromptSourceConfig(_Section):
    path: str | None = Field(DEFAULT_PROMPTS_PATH, min_length=1, description="Prompt file (.txt, T2I-CompBench .json, GenEval .jsonl; relative = to the working dir, then the repo); null = the world's own training prompts.")
    format: Literal["auto", "txt", "t2i_compbench", "geneval"] = Field("auto", description="File format; 'auto' = by extension and content.")
    categories: list[str] | None = Field(None, min_length=1, description="Keep only these categories (null = all).")
    limit: int | None = Field(None, ge=1, description="Keep at most this many prompts (after the category filter; null = all).")
    shuffle: bool = Field(True, description="Walk the prompts in a fresh seeded order each epoch (false = file order).")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address ('auto' or host:port); null = start a local Ray.")
    num_samplers: int = Field(1, ge=1, le=MAX_ACTORS, description="Sampler actors (generation).")
    num_scorers: int = Field(1, ge=1, le=MAX_ACTORS, description="Scorer actors (regions + judge + reward map).")
    sampler_resources: ResourceConfig = Field(default_factory=ResourceConfig, description="Ray resources per sampler actor.")
    scorer_resources: ResourceConfig = Field(default_factory=ResourceConfig, description="Ray resources per scorer actor.")
    learner_resources: ResourceConfig = Field(default_factory=ResourceConfig, description="Ray resources of the learner actor.")
    sample_batch_size: int = Field(4, ge=1, description="Prompts per sampler call.")
    buffer_capacity: int = Field(256, ge=1, description="Replay buffer capacity in samples (oldest dropped first).")
    max_staleness: int = Field(4, ge=0, description="Drop samples whose policy version lags the learner by more than this.")
    recency_bias: float = Field(0.0, ge=0, description="Sampling preference for recent samples (0 = uniform).")
    max_in_flight_batches: int = Field(4, ge=1, description="Bound on sample batches being generated or scored (backpressure).")
    mode: Literal["online", "rounds"] = Field("online", description="online: samplers generate continuously with the latest weights; rounds: generate a pool of round_samples from one frozen version, train round_epochs epochs over it, publish, repeat (the paper's recipe, iterated).")
    round_samples: int = Field(256, ge=1, description="Rounds mode: samples generated and judged per round, all with the round's frozen weights.")
    round_epochs: int = Field(4, ge=1, description="Rounds mode: epochs over the round's pool (each kept sample is served this many times).")
    ahead_batches: int = Field(4, ge=1, description="Generate at most this many learner batches ahead of the learner (in the buffer or in flight), and at most max_staleness - 1: more would only go stale or be evicted.")
    sampler_calls_in_flight: int = Field(2, ge=1, description="Sample calls queued per sampler actor (2 = the next batch is ready when one finishes).")
    scorer_calls_in_flight: int = Field(4, ge=1, description="Score calls in flight per scorer actor (its batches are judged concurrently).")
    scorer_concurrency: int = Field(8, ge=1, description="Ray max_concurrency of each async scorer actor (bounds its concurrent calls).")
    drain_timeout_s: float = Field(60.0, gt=0, description="At stop: how long in-flight sample/score work may take before it is counted as lost.")
    learner_restart_timeout_s: float = Field(600.0, gt=0, description="How long the driver waits for a crashed learner to come back (Ray restarts it from its latest checkpoint) before it stops the run.")
    judge_outage_failure_rate: float = Field(0.5, gt=0, le=1, description="Pause sampling when at least this share of the recent scored samples failed in the judge (1 = only when all failed).")
    judge_outage_pause_s: float = Field(5.0, gt=0, description="First pause of sampling during a judge outage; doubles while it lasts (at most 60 s), one probe batch between pauses.")
    max_restarts: int = Field(3, ge=-1, description="Ray actor restarts on failure (-1 = unlimited).")
    weight_transport: Literal["object_store", "shm", "gloo", "nccl"] = Field("object_store", description="How new weights reach the samplers: through Ray's object store; 'shm': the learner writes each version into a standing pair of /dev/shm files and samplers on its node copy from them (other nodes, late joiners and fallbacks use the object store); or pushed by Ray Direct Transport over gloo (CPU) or NCCL (GPUs), with the object store as the fallback.")
    prompts: PromptSourceConfig = Field(default_factory=PromptSourceConfig, description="Prompt source.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Ray metrics export port (null = Ray's choice).")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.mode == "rounds" and self.buffer_capacity < self.round_samples:
            raise ValueError(f"cluster.buffer_capacity ({self.buffer_capacity}) must hold a round's pool "
                             f"(cluster.round_samples = {self.round_samples}) in rounds mode")
        if self.weight_transport == "nccl":
            fractional = {role: r.num_gpus for role, r in (("learner", self.learner_resources),
                                                          ("sampler", self.sampler_resources))
                          if r.num_gpus < 1 or r.num_gpus != int(r.num_gpus)}
            if fractional:
                raise ValueError(
                    "cluster.weight_transport='nccl' needs whole GPUs for the learner and each sampler (NCCL cannot "
                    "put two ranks on one device); got num_gpus " + ", ".join(f"{k}={v:g}" for k, v in fractional.items())
                    + ": use weight_transport='object_store' when actors share a GPU")
        return self


# -------------------------------------------------------------------------------------------- eval
class EvalPromptsConfig(PromptSourceConfig):
    path: str | None = Field(None, min_length=1, description="Evaluation prompt file (GenEval .jsonl, T2I-CompBench .json, .txt; relative = to the working dir, then the repo); null = the world's held-out prompts (shapes).")
    shuffle: bool = Field(False, description="Unused by evaluation (prompts are taken in file order).")


class EvalConfig(_Section):
    """Evaluation of generated images (`srum eval`, and the in-run phase `run.eval_every` for policies whose
    world has no evaluator of its own): k images per prompt graded 0-100 by a VLM with the evaluation prompt
    of rewards/eval_prompts.py (not the reward's), or the shapes world's geometric evaluator."""

    prompts: EvalPromptsConfig = Field(default_factory=EvalPromptsConfig, description="Evaluation prompts: file, format, categories, limit.")
    seed: int = Field(10_000, ge=0, description="Seed of the first evaluation image; image j of prompt i uses seed + i * k + j, the same for every model compared.")
    judge_model: str | None = Field(None, min_length=1, description="OpenAI backend only: the evaluator's served model when it differs from the judge section's (e.g. a larger VLM; null = the same).")
    judge_endpoints: list[str] | None = Field(None, min_length=1, description="OpenAI backend only: the evaluator's server URLs when they differ from the judge section's (null = the same).")
    mode: Literal["structured", "text"] = Field("structured", description="How the grade is read: JSON-schema output {score 0-100, explanation} or parsed 'Score:' text.")
    max_tokens: int = Field(256, ge=8, description="Max tokens of one grading answer.")
    batch_size: int = Field(8, ge=1, description="Prompts per sampler call while generating evaluation images.")
    num_samplers: int = Field(1, ge=1, le=MAX_ACTORS, description="Sampler actors of `srum eval` (resources: cluster.sampler_resources).")

    @field_validator("judge_endpoints")
    @classmethod
    def _urls(cls, v: list[str] | None) -> list[str] | None:
        from pydantic import ValidationError

        if v is not None:
            try:
                OpenAIJudgeConfig(endpoints=v)  # the same rules as judge.endpoints
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v


# ------------------------------------------------------------------------------------------ config
class SRUMConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and budget.")
    policy: PolicyConfig = Field(default_factory=DiffusersPolicyConfig, description="Generation module (the policy).")
    judge: JudgeConfig = Field(default_factory=TransformersJudgeConfig, description="Understanding module used as judge.")
    regions: RegionsConfig = Field(default_factory=SamRegionsConfig, description="Region proposals.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward-map semantics and ablations.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Loss and optimiser recipe.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray actors, buffer and prompts.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation: prompts, grader and samplers of `srum eval` and run.eval_every.")

    @model_validator(mode="after")
    def _check(self) -> SRUMConfig:
        if self.cluster.buffer_capacity < self.learner.batch_size:
            raise ValueError(
                f"cluster.buffer_capacity ({self.cluster.buffer_capacity}) must be >= "
                f"learner.batch_size ({self.learner.batch_size})"
            )
        if (self.eval.judge_model or self.eval.judge_endpoints) and self.judge.backend != "openai":
            raise ValueError(f"eval.judge_model / eval.judge_endpoints need judge.backend='openai' (got "
                             f"{self.judge.backend!r}); the evaluator otherwise grades with the judge section's model")
        return self
