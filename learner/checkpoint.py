"""Exact-resume checkpoints: a learner's state dict (:meth:`learner.learner.Learner.state_dict`) on disk.

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

This module only writes and reads the dict (``meta``, ``trainable``, ``ema``, ``optimizer``, ``rng``);
whether it fits a learner (config hashes, parameter names) is the learner's check
(:meth:`~learner.learner.Learner.load_state_dict`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


# ----------------------------------------------------------------------------------------- save
def save_checkpoint(root: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a learner state dict) as ``root/step_NNNNNN`` and point ``root/latest`` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = state["meta"]
    name = step_dir_name(int(info["step"]))
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_file(dict(state["trainable"]), str(tmp / TRAINABLE_FILE), metadata={"version": str(info["version"])})
        ema = state.get("ema")
        if ema is not None:
            save_file(dict(ema), str(tmp / EMA_FILE))
        torch.save(state["optimizer"], tmp / OPTIMIZER_FILE)
        torch.save(state["rng"], tmp / RNG_FILE)
        files = sorted(p.name for p in tmp.iterdir())
        for f in files:
            _fsync_file(tmp / f)
        meta = {"format": FORMAT_VERSION, **info, "ema": ema is not None,
                "files": {f: _sha256(tmp / f) for f in files}, "saved_at": time.time()}
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


def load_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict[str, Any], Path]:
    """Read a checkpoint back into a learner state dict; ``path`` is a checkpoint root (follows
    ``latest``) or a step dir. Returns ``(state, step_dir)``; every problem is a :class:`CheckpointError`
    naming the file."""
    step_dir = resolve_step_dir(path)
    meta = read_meta(step_dir)
    if verify:
        _verify(step_dir, meta)
    return {
        "meta": {k: v for k, v in meta.items() if k not in ("format", "files", "ema", "saved_at")},
        "trainable": _load(step_dir / TRAINABLE_FILE, lambda p: load_file(str(p))),
        "ema": _load(step_dir / EMA_FILE, lambda p: load_file(str(p))) if meta.get("ema") else None,
        "optimizer": _load(step_dir / OPTIMIZER_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True)),
        "rng": _load(step_dir / RNG_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    }, step_dir
