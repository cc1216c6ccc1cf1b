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
so a crash at any point leaves the previous ``latest`` pointing at a complete checkpoint. Saving a step
that already has a complete checkpoint changes nothing (the learner's state at one step is the same);
a broken copy of it is replaced only after the new one is complete (write new, then switch). After a
save, all but the newest ``keep`` complete checkpoints are pruned (``learner.keep_checkpoints``).

Reading (:func:`find_latest`): ``latest`` must name a step dir directly inside the root (no ``/``,
no ``..``). When it is missing, names nothing or names a broken checkpoint, the newest complete step
dir is used instead, with a warning; a root that holds checkpoints but no complete one is a
:class:`CheckpointError` (a run that has checkpoints must never silently start from scratch).

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
import logging
import os
import re
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


log = logging.getLogger("srum.checkpoint")
STEP_DIR = re.compile(r"step_(\d{6,})")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted or does not fit this learner; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
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
def save_checkpoint(root: str | Path, state: Mapping[str, Any], keep: int = 0) -> Path:
    """Write ``state`` (a learner state dict) as ``root/step_NNNNNN``, point ``root/latest`` at it and
    prune all but the newest ``keep`` complete checkpoints (0 = keep all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = state["meta"]
    name = step_dir_name(int(info["step"]))
    final = root / name
    if _problem(final) is not None:  # absent or broken: write it (an intact one is this very state)
        _write(root, final, state)
    pointer = root / f"{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    if keep:
        prune_checkpoints(root, keep)
    return final


def _write(root: Path, final: Path, state: Mapping[str, Any]) -> None:
    info = state["meta"]
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
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
                "files": {f: file_sha256(tmp / f) for f in files}, "saved_at": time.time()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _fsync_file(tmp / META_FILE)
        _fsync_dir(tmp)
        if final.exists():  # a broken copy: switch to the complete new one first, then remove it
            aside = root / f".broken-{final.name}-{time.monotonic_ns()}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune_checkpoints(root: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete step dirs (never the one ``latest`` names); returns the
    names deleted. Incomplete step dirs are left for a person to look at."""
    root = Path(root)
    pointed = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    complete = [d for d in _step_dirs(root) if _problem(d) is None]
    doomed = [d for d in complete[keep:] if d.name != pointed]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return [d.name for d in doomed]


# ----------------------------------------------------------------------------------------- load
def _step_dirs(root: Path) -> list[Path]:
    """``step_NNNNNN`` dirs directly under ``root``, newest step first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and STEP_DIR.fullmatch(d.name)]
    return sorted(dirs, key=lambda d: int(STEP_DIR.fullmatch(d.name).group(1)), reverse=True)


def _problem(step_dir: Path, verify: bool = True) -> str | None:
    """Why ``step_dir`` is not a complete checkpoint (None when it is one; ``verify=False`` only reads its
    meta file, not the files' checksums)."""
    if not (step_dir / META_FILE).exists():
        return f"{step_dir / META_FILE} is missing"
    try:
        meta = read_meta(step_dir)
        if verify:
            _verify(step_dir, meta)
    except CheckpointError as exc:
        return str(exc)
    return None


def find_latest(root: str | Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root``: the step dir ``latest`` names, or, when that is
    missing or broken, the newest complete step dir (with a warning). None when ``root`` holds no
    checkpoint at all; :class:`CheckpointError` when it holds some but none is complete."""
    root = Path(root)
    pointer = root / LATEST
    dirs = _step_dirs(root)
    why = None
    if pointer.exists():
        name = pointer.read_text().strip()
        if not STEP_DIR.fullmatch(name):
            why = f"{pointer} names {name!r}, which is not a step dir inside {root}"
        else:
            why = _problem(root / name, verify)
            if why is None:
                return root / name
            why = f"{pointer} points to {name!r}, but {why}"
    elif not dirs:
        return None
    for d in dirs:
        if _problem(d, verify) is None:
            log.warning("%s; resuming from %s, the newest complete checkpoint", why or f"no {pointer}", d.name)
            return d
    raise CheckpointError(f"{why or f'no {pointer}'}, and no other complete checkpoint under {root} "
                          f"({', '.join(d.name for d in dirs) or 'no step dirs'})")


def resolve_step_dir(path: str | Path, verify: bool = True) -> Path:
    """``path`` is a step dir (has ``meta.json``) or a checkpoint root (:func:`find_latest`)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    found = find_latest(path, verify)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path}: missing {path / LATEST} (and no {META_FILE} there)")
    return found


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of a step dir (raises :class:`CheckpointError` naming the file)."""
    step_dir = Path(step_dir)
    path = step_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path} is not a srum checkpoint meta file (format {FORMAT_VERSION})")
    for key in ("step", "version"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: {key} must be an int >= 0, got {value!r}")
    bad = [k for k, v in meta["files"].items() if not (isinstance(k, str) and isinstance(v, str)) or "/" in k]
    if bad:
        raise CheckpointError(f"{path}: malformed file entries {bad[:3]}")
    return meta


def _verify(step_dir: Path, meta: dict[str, Any]) -> None:
    for name, digest in meta["files"].items():
        path = step_dir / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if file_sha256(path) != digest:
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
    step_dir = resolve_step_dir(path, verify)
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
