"""Pretraining of the shapes base generator: shipped for the default settings, else trained in-run and cached.

:func:`pretrain_base` trains the text encoder and the denoiser of :mod:`shapes.policy` together on
freshly rendered (prompt, image) pairs of the world's *training* split (categories drawn uniformly,
then a prompt, then a random layout from :func:`shapes.world.render`) with the rectified-flow MSE
(``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, logit-normal ``t`` shifted toward noise), AdamW
with linear warm-up and grad-norm clipping, prompt dropout to the empty prompt (the learned null
conditioning for CFG), and saves the weights' exponential moving average. The budget is chosen so the base
is in the paper's regime: it draws one object's shape and colour right most of the time but gets counts,
relations and two-object binding wrong (see :data:`DEFAULT_STEPS`).

Where a base comes from, in order: the cache, one safetensors file per key under ``$SRUM_CACHE/shapes``
(default ``~/.cache/srum/shapes``); the project's shipped bases (:data:`SHIPPED_DIR`, the default
settings' base, too slow to train within ``make run``); else it is trained (one thread; deterministic, so
the same settings give bit-identical weights) and cached. The key hashes the architecture, the pretraining
settings, a fingerprint of the world (its training prompts and a few reference renders) and
:data:`FORMAT_VERSION`. Writers take a file lock, so concurrent actors that all miss the cache train once
and the rest load. Keys are ``text_encoder.*`` and ``denoiser.*``; the metadata holds the vocabulary,
settings, training log and the weights' digest (:func:`weights_digest`), checked at every load.

CLI: ``python -m shapes.pretrain --steps N [--eval 2] [--cache-dir DIR]`` pretrains (or loads) and prints
held-out accuracy with :mod:`shapes.evaluator`; ``--ship`` saves into :data:`SHIPPED_DIR` (how the shipped
base was made: ``python -m shapes.pretrain --ship --eval 0``); ``--verify`` retrains from scratch and
compares the digests (exit 1 when they differ).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, safe_open, save_file

from core.config import ShapesPolicyConfig
from learner.base import resolve_device
from learner.loss import rf_interpolate, rf_target, sample_timesteps
from shapes import world
from shapes.policy import (
    ShapesArch,
    ShapesPolicy,
    TextEncoder,
    WordTokenizer,
    build_denoiser,
    denoise,
    world_vocabulary,
)

log = logging.getLogger("srum.shapes.pretrain")

FORMAT_VERSION = 2
SHIPPED_DIR = Path(__file__).with_name("bases")  # bases the project ships (``--ship``); looked up after the cache
# 4,000 steps x 16 images with the weights' moving average and training timesteps shifted toward noise (where
# the layout is decided): the base draws the right shapes and colours for one object most of the time and
# gets compositions wrong, the paper's regime (held-out by category in bench/RESULTS.md, "a base in the
# paper's regime"). Training it takes 10-30 min on one thread, longer than `make run` may spend, so the
# project ships it (shapes/bases/; `--verify` retrains it and compares the digest); other settings train in-run.
DEFAULT_STEPS = 4000


class PretrainSettings(BaseModel):
    """Pretraining recipe of the shapes base (part of the cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(DEFAULT_STEPS, ge=0, description="Optimiser steps (the budget that keeps the base imperfect).")
    batch_size: int = Field(16, ge=1, description="Rendered images per step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate after warm-up.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="Probability of training on the empty prompt (null conditioning).")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit-normal timestep distribution (mean 0).")
    timestep_shift: float = Field(3.0, gt=0, description="SD3 shift of the training timesteps (>1 favours high noise, i.e. layout; 3 beat 1 at 1,000 and 2,000 steps).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the weights' exponential moving average, which is the saved base (0 = the last weights).")
    seed: int = Field(0, description="Seed of the initial weights, data and noise.")
    split_seed: int = Field(0, description="shapes.world.make_split seed: pretraining sees only its training prompts.")


# ------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$SRUM_CACHE/shapes``, default ``~/.cache/srum/shapes``."""
    root = os.environ.get("SRUM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srum")
    return Path(root) / "shapes"


def world_fingerprint(split_seed: int = 0) -> str:
    """sha256 of the training prompts of the split and reference renders (changes when the world does)."""
    train, _ = world.make_split(split_seed)
    h = hashlib.sha256()
    h.update("\n".join(world.prompt_of(s) for s in train).encode())
    rng = np.random.default_rng(0)
    for spec in train[:: max(1, len(train) // 8)]:
        h.update(world.render(spec, 32, rng).tobytes())
    h.update(str(getattr(world, "WORLD_VERSION", "")).encode())
    return h.hexdigest()


def cache_key(arch: ShapesArch, settings: PretrainSettings) -> str:
    """Hash of everything the pretrained weights depend on (module docstring)."""
    data = {"format": FORMAT_VERSION, "arch": arch.model_dump(), "settings": settings.model_dump(),
            "world": world_fingerprint(settings.split_seed), "vocab": world_vocabulary()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def base_path(arch: ShapesArch, settings: PretrainSettings, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"shapes_base_{cache_key(arch, settings)}.safetensors"


def shipped_path(arch: ShapesArch, settings: PretrainSettings) -> Path:
    """Where the project ships the base of ``(arch, settings)`` if it ships one (:data:`SHIPPED_DIR`)."""
    return base_path(arch, settings, SHIPPED_DIR)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``state`` in name order: equal digests mean
    bit-identical weights, whatever the file's metadata (which holds timings)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def settings_from_config(cfg: ShapesPolicyConfig) -> tuple[ShapesArch, PretrainSettings, Path]:
    """Architecture (:class:`ShapesArch`'s defaults), pretraining settings and cache dir of the policy section
    (``policy.pretrain_steps``, ``pretrain_seed``, ``split_seed``; ``pretrain_cache_dir`` null =
    :func:`default_cache_dir`)."""
    settings = PretrainSettings(steps=cfg.pretrain_steps, seed=cfg.pretrain_seed, split_seed=cfg.split_seed)
    return ShapesArch(), settings, Path(cfg.pretrain_cache_dir) if cfg.pretrain_cache_dir else default_cache_dir()


# ------------------------------------------------------------------------------------------- data
class RenderedData:
    """Category-balanced batches of (prompt, x0) rendered from the training split."""

    def __init__(self, split_seed: int, image_size: int, seed: int) -> None:
        train, _ = world.make_split(split_seed)
        self.by_cat = {c: [s for s in train if s.category == c] for c in world.CATEGORIES}
        self.cats = [c for c, v in self.by_cat.items() if v]
        self.size = image_size
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int, prompt_dropout: float = 0.0) -> tuple[list[str], torch.Tensor]:
        prompts, images = [], []
        for _ in range(n):
            specs = self.by_cat[self.cats[self.rng.integers(len(self.cats))]]
            spec = specs[self.rng.integers(len(specs))]
            images.append(world.render(spec, self.size, self.rng))
            prompts.append("" if self.rng.random() < prompt_dropout else world.prompt_of(spec))
        x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return prompts, x0


# --------------------------------------------------------------------------------------- training
def build_modules(arch: ShapesArch, seed: int) -> tuple[TextEncoder, torch.nn.Module, WordTokenizer]:
    """Freshly initialised (seeded) text encoder, denoiser and the world's tokenizer."""
    tokenizer = WordTokenizer(world_vocabulary(), arch.max_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = TextEncoder(len(tokenizer), arch)
        denoiser = build_denoiser(arch)
    return text_encoder, denoiser, tokenizer


@torch.no_grad()
def update_ema(averages: list[torch.nn.Module], modules: tuple[torch.nn.Module, ...], decay: float) -> None:
    """``avg = decay * avg + (1 - decay) * current`` for every parameter and float buffer."""
    for avg, cur in zip(averages, modules, strict=True):
        for a, c in zip([*avg.parameters(), *avg.buffers()], [*cur.parameters(), *cur.buffers()], strict=True):
            if a.is_floating_point():
                a.lerp_(c.detach(), 1.0 - decay)
            else:
                a.copy_(c)


def train_base(arch: ShapesArch, settings: PretrainSettings, log_every: int = 100,
               callback: Callable[[int, TextEncoder, torch.nn.Module], None] | None = None,
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pretrain from scratch; returns ``(state, info)``: prefixed CPU tensors and a JSON-able log.

    The returned weights are the exponential moving average of the trained ones (``settings.ema_decay``;
    its decay ramps up as ``(1 + k) / (10 + k)`` over the first steps), the standard for diffusion models:
    on this world it raised held-out accuracy 1.6-2.6x at 1,000 steps (bench/RESULTS.md).
    ``callback(step, text_encoder, denoiser)`` runs at every log point with the modules that would be
    saved (the averages), e.g. to evaluate."""
    s = settings
    text_encoder, denoiser, tokenizer = build_modules(arch, s.seed)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (text_encoder, denoiser)] if s.ema_decay else None
    text_encoder.train()
    denoiser.train()
    params = [*text_encoder.parameters(), *denoiser.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.99), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, s.warmup_steps)))
    data = RenderedData(s.split_seed, arch.image_size, s.seed)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    t0 = time.perf_counter()
    history: list[tuple[int, float]] = []
    running = math.nan
    for step in range(1, s.steps + 1):
        prompts, x0 = data.batch(s.batch_size, s.prompt_dropout)
        ids, pad = tokenizer(prompts)
        embeds, pooled = text_encoder(ids, pad)
        t = sample_timesteps(len(prompts), shift=s.timestep_shift, logit_std=s.logit_std, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        v = denoise(denoiser, rf_interpolate(x0, noise, t), t, embeds, pooled)
        loss = (v - rf_target(x0, noise)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            update_ema(ema, (text_encoder, denoiser), min(s.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == s.steps:
            history.append((step, round(running, 5)))
            el = time.perf_counter() - t0
            log.info("shapes pretrain step %d/%d loss %.4f (%.1fs, %.0f ms/step)", step, s.steps, running, el,
                     1000 * el / step)
            if callback is not None:
                callback(step, *(ema or (text_encoder, denoiser)))
                text_encoder.train()
                denoiser.train()
    saved_te, saved_dn = ema or (text_encoder, denoiser)
    state = {f"text_encoder.{k}": v.detach().cpu().contiguous() for k, v in saved_te.state_dict().items()}
    state.update({f"denoiser.{k}": v.detach().cpu().contiguous() for k, v in saved_dn.state_dict().items()})
    info = {"train_seconds": round(time.perf_counter() - t0, 2), "final_loss": running, "history": history,
            "torch": torch.__version__}
    return state, info


def pretrain_base(arch: ShapesArch | None = None, settings: PretrainSettings | None = None,
                  cache_dir: str | Path | None = None, log_every: int = 100,
                  num_threads: int | None = 1) -> Path:
    """Path of the cached pretrained base for ``(arch, settings)``; trains and saves it first when it
    is not cached. Safe to call from several processes at once (file lock; one trains).

    Training runs with ``num_threads`` torch threads (restored afterwards; None = leave as is): one
    thread is the default because on a small, shared CPU several OpenMP threads per process
    oversubscribe the cores and run many times slower (measured: 2 threads were 25x slower than
    usual while other workers were busy; one thread stayed at ~110 ms/step)."""
    arch, settings = arch or ShapesArch(), settings or PretrainSettings()
    path = base_path(arch, settings, cache_dir)
    if path.exists():
        return path
    shipped = shipped_path(arch, settings)
    if shipped.exists():
        log.info("shapes base: using the shipped %s (python -m shapes.pretrain --verify retrains and compares)",
                 shipped.relative_to(SHIPPED_DIR.parent.parent))
        return shipped
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():  # another process trained it while we waited
            return path
        log.info("shapes base not cached (%s): pretraining %d steps", path.name, settings.steps)
        prev_threads = torch.get_num_threads()
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            state, info = train_base(arch, settings, log_every=log_every)
        finally:
            torch.set_num_threads(prev_threads)
        meta = {"format": str(FORMAT_VERSION), "arch": arch.model_dump_json(), "settings": settings.model_dump_json(),
                "vocab": json.dumps(WordTokenizer(world_vocabulary(), arch.max_tokens).vocab),
                "world": world_fingerprint(settings.split_seed), "info": json.dumps(info),
                "weights_sha256": weights_digest(state)}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
        log.info("shapes base saved to %s after %.1fs (loss %.4f)", path, info["train_seconds"], info["final_loss"])
    return path


def base_info(path: str | Path) -> dict[str, Any]:
    """The metadata of a cached base (arch, settings, vocab and training log decoded)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return {k: (json.loads(v) if k in ("arch", "settings", "vocab", "info") else v) for k, v in meta.items()}


def load_base(arch: ShapesArch | None = None, settings: PretrainSettings | None = None,
              cache_dir: str | Path | None = None) -> tuple[TextEncoder, torch.nn.Module, WordTokenizer]:
    """Text encoder, denoiser and tokenizer of the pretrained base (pretraining it when not cached)."""
    arch, settings = arch or ShapesArch(), settings or PretrainSettings()
    path = pretrain_base(arch, settings, cache_dir)
    text_encoder, denoiser, tokenizer = build_modules(arch, settings.seed)
    info = base_info(path)
    if info["vocab"] != tokenizer.vocab:
        raise ValueError(f"cached base {path} has a different vocabulary; delete it to retrain")
    state = load_file(str(path))
    want = info.get("weights_sha256")
    if want is not None and weights_digest(state) != want:
        raise ValueError(f"base {path} is corrupt: its weights do not match the digest it was saved with; delete it "
                         "to retrain")
    for prefix, module in (("text_encoder.", text_encoder), ("denoiser.", denoiser)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    return text_encoder, denoiser, tokenizer


def load_policy(cfg: ShapesPolicyConfig, seed: int = 0) -> ShapesPolicy:
    """The shapes policy of a policy section: the cached pretrained base (pretrained first when it is not
    cached; settings from ``policy.pretrain_*``), sampling and LoRA settings from the section.

    ``seed`` only seeds the LoRA initialisation: the base depends on ``policy.pretrain_seed``, so every run
    seed starts from the same base."""
    arch, settings, cache_dir = settings_from_config(cfg)
    text_encoder, denoiser, tokenizer = load_base(arch, settings, cache_dir)
    return ShapesPolicy(
        text_encoder, denoiser, tokenizer, arch, device=resolve_device(cfg.device),
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        sample_shift=cfg.sample_shift, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_target_modules=tuple(cfg.lora_target_modules), seed=seed,
    )


def verify(arch: ShapesArch, settings: PretrainSettings, path: Path) -> bool:
    """Retrain ``(arch, settings)`` from scratch in a temporary directory and compare its weights' digest with
    the base at ``path`` (the shipped artefact is reproducible when they are equal)."""
    import tempfile

    want = base_info(path).get("weights_sha256")
    with tempfile.TemporaryDirectory() as tmp:
        got = base_info(pretrain_base(arch, settings, tmp))["weights_sha256"]
    print(f"verify: {path.name}: shipped/cached {want}, retrained {got}: {'identical' if got == want else 'DIFFERENT'}")
    return got == want


def main(argv: list[str] | None = None) -> int:
    from shapes.evaluator import HeldoutEvaluator

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--ship", action="store_true", help=f"save into {SHIPPED_DIR} (the project's artefact)")
    ap.add_argument("--verify", action="store_true", help="retrain from scratch and compare the weights' digest")
    ap.add_argument("--eval", type=int, default=2, help="seeds per held-out prompt (0 = no eval)")
    ap.add_argument("--sample-steps", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=3.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    arch, settings = ShapesArch(), PretrainSettings(steps=args.steps, seed=args.seed)
    cache_dir = SHIPPED_DIR if args.ship else args.cache_dir
    t0 = time.perf_counter()
    path = pretrain_base(arch, settings, cache_dir)
    info = base_info(path)
    print(f"base: {path} ({time.perf_counter() - t0:.1f}s here; {info['info']['train_seconds']}s to train; "
          f"weights sha256 {info.get('weights_sha256')})")
    if args.verify and not verify(arch, settings, path):
        return 1
    if args.eval:
        te, dn, tok = load_base(arch, settings, cache_dir)
        pol = ShapesPolicy(te, dn, tok, arch, num_inference_steps=args.sample_steps, guidance_scale=args.guidance)
        t0 = time.perf_counter()
        acc = HeldoutEvaluator(seeds_per_prompt=args.eval).evaluate(pol)
        print(f"held-out accuracy ({time.perf_counter() - t0:.1f}s): " + json.dumps({k: round(v, 3) for k, v in acc.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
