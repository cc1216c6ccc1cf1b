"""Exact-resume checkpoints of a :class:`~learner.learner.Learner`.

Layout under a checkpoint root::

    root/
      latest                   # text: name of the newest complete step dir; written last, atomically
      step_000123/
        trainable.safetensors  # policy trainable state (LoRA adapters or full transformer)
        ema.safetensors        # EMA of the trainable tensors (only when EMA is on)
        optimizer.pt           # {"optimizer": AdamW state_dict, "scheduler": LambdaLR state_dict}
        rng.pt                 # torch CPU/CUDA, learner generator, numpy and python RNG states
        meta.json              # step, version, counters, config hashes, param names, sha256 per file

Every file is written into a temporary directory, fsynced, then the directory is renamed to
``step_NNNNNN`` and only then ``latest`` is replaced (write ``latest.tmp``, fsync, ``os.replace``),
so a crash at any point leaves the previous ``latest`` pointing at a complete checkpoint.

Loading verifies each file's sha256 from ``meta.json``, reads tensors with safetensors and the
``.pt`` files with ``torch.load(weights_only=True)`` (nothing is unpickled beyond plain containers
and tensors, all written here). Problems raise :class:`CheckpointError` naming the file.

Config: a different *training hash* (fields in :data:`learner.learner.TRAINING_FIELDS`) is an error
unless ``allow_config_change=True`` (then a warning); any other config difference is a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from learner.learner import Learner

FORMAT_VERSION = 1
LATEST = "latest"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted or does not fit this learner; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ RNG
def rng_state(learner: Learner) -> dict[str, Any]:
    """All RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "learner_generator": learner.generator.get_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def set_rng_state(learner: Learner, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    learner.generator.set_state(state["learner_generator"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


# ----------------------------------------------------------------------------------------- save
def save_checkpoint(root: str | Path, learner: Learner) -> Path:
    """Write ``root/step_NNNNNN`` for ``learner.step`` and point ``root/latest`` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(learner.step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        version, state = learner.policy.trainable_state()
        save_file(state, str(tmp / TRAINABLE_FILE), metadata={"version": str(version)})
        ema = learner.ema_state()
        if ema is not None:
            save_file(ema, str(tmp / EMA_FILE))
        torch.save({"optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict()},
                   tmp / OPTIMIZER_FILE)
        torch.save(rng_state(learner), tmp / RNG_FILE)
        files = sorted(p.name for p in tmp.iterdir())
        for f in files:
            _fsync_file(tmp / f)
        meta = {
            "format": FORMAT_VERSION, "step": learner.step, "version": version,
            "skipped_steps": learner.skipped_steps, "seed": learner.seed,
            "config_hash": learner.config_hash, "training_hash": learner.training_hash,
            "param_names": learner.param_names, "ema": ema is not None,
            "files": {f: _sha256(tmp / f) for f in files}, "saved_at": time.time(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _fsync_file(tmp / META_FILE)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = root / f".old-{name}-{time.monotonic_ns()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f"{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    return final


# ----------------------------------------------------------------------------------------- load
def find_latest(root: str | Path) -> Path | None:
    """The step dir ``root/latest`` points to, or None when ``root`` has no ``latest`` pointer.

    A pointer to a missing or incomplete step dir raises :class:`CheckpointError` (a run that has a
    checkpoint must not silently start from scratch).
    """
    if not (Path(root) / LATEST).exists():
        return None
    return resolve_step_dir(root)


def resolve_step_dir(path: str | Path) -> Path:
    """``path`` is a checkpoint root (follow ``latest``) or a step dir (has ``meta.json``)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    pointer = path / LATEST
    if not pointer.exists():
        raise CheckpointError(f"no checkpoint at {path}: missing {pointer} (and no {META_FILE} there)")
    name = pointer.read_text().strip()
    step_dir = path / name
    if not name or not (step_dir / META_FILE).exists():
        raise CheckpointError(f"{pointer} points to {name!r}, but {step_dir / META_FILE} is missing")
    return step_dir


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of a step dir (raises :class:`CheckpointError` naming the file)."""
    step_dir = Path(step_dir)
    path = step_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "files" not in meta:
        raise CheckpointError(f"{path} is not a srum checkpoint meta file (format {FORMAT_VERSION})")
    return meta


def _verify(step_dir: Path, meta: dict[str, Any]) -> None:
    for name, digest in meta["files"].items():
        path = step_dir / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint file corrupted (sha256 mismatch): {path}")


def _load(path: Path, fn: Any) -> Any:
    try:
        return fn(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc


def _check_config(meta: dict[str, Any], learner: Learner, path: Path, allow_config_change: bool) -> None:
    if meta.get("training_hash") != learner.training_hash:
        msg = (f"{path}: the training config (policy/learner fields that change the optimisation) differs "
               f"from the checkpoint's")
        if not allow_config_change:
            raise CheckpointError(msg + "; pass allow_config_change=True to resume anyway")
        warnings.warn(msg, stacklevel=3)
    elif meta.get("config_hash") != learner.config_hash:
        warnings.warn(f"{path}: config differs from the checkpoint's outside the training fields "
                      f"(e.g. run budget, judge, cluster); resuming", stacklevel=3)


def load_checkpoint(path: str | Path, learner: Learner, *, allow_config_change: bool = False,
                    verify: bool = True) -> Path:
    """Restore weights, EMA, optimiser, scheduler, counters and RNG into ``learner``.

    ``path`` is a checkpoint root (follows ``latest``) or a step dir; returns the step dir loaded
    (its meta: :func:`read_meta`)."""
    step_dir = resolve_step_dir(path)
    meta = read_meta(step_dir)
    _check_config(meta, learner, step_dir / META_FILE, allow_config_change)
    if meta.get("param_names") != learner.param_names:
        raise CheckpointError(f"{step_dir / META_FILE}: trainable parameter names differ from this "
                              f"learner's (e.g. LoRA vs full fine-tuning, or another rank/targets)")
    if verify:
        _verify(step_dir, meta)
    state = _load(step_dir / TRAINABLE_FILE, lambda p: load_file(str(p)))
    opt = _load(step_dir / OPTIMIZER_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    rng = _load(step_dir / RNG_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    ema = None
    if meta.get("ema"):
        ema = _load(step_dir / EMA_FILE, lambda p: load_file(str(p)))
    elif learner.ema is not None:
        raise CheckpointError(f"{step_dir}: checkpoint has no {EMA_FILE} but this learner keeps an EMA")
    try:
        learner.policy.load_trainable_state(state, int(meta["version"]))
        learner.optimizer.load_state_dict(opt["optimizer"])
        learner.scheduler.load_state_dict(opt["scheduler"])
        if ema is not None and learner.ema is not None:
            learner.load_ema_state(ema)
        set_rng_state(learner, rng)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {step_dir} does not fit this learner: {exc}") from exc
    learner.step = int(meta["step"])
    learner.skipped_steps = int(meta.get("skipped_steps", 0))
    return step_dir
