"""Checkpoints: exact resume, atomic `latest`, clear errors on missing/corrupted files and config drift."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import DiffusersPolicyConfig, LearnerConfig
from core.config_io import validate_config
from core.records import TrainBatch
from learner import checkpoint as ckpt
from learner.checkpoint import CheckpointError, find_latest, read_meta, save_checkpoint
from learner.learner import Learner
from learner.policy import DiffusersPolicy

PROMPTS = ["a red cube", "a blue ball"]


def make(lora_rank: int = 0, seed: int = 0, **learner_kw) -> Learner:
    pc = DiffusersPolicyConfig(lora_rank=lora_rank, device="cpu")
    lc = LearnerConfig(**{"lr": 1e-3, "warmup_steps": 5, "ema_decay": 0.9, **learner_kw})
    return Learner((pc, lc), DiffusersPolicy.from_config(pc, seed=0), seed=seed)


def batch(i: int) -> TrainBatch:
    g = torch.Generator().manual_seed(i)
    return TrainBatch(PROMPTS, torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, 32, 32, generator=g),
                      torch.rand(2, generator=g))


def load_checkpoint(path: Path, learner: Learner, **kw) -> Path:
    """Resume ``learner`` from ``path`` (what the learner host does)."""
    return learner.resume(path, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint root with step_000002 (EMA on, full fine-tuning)."""
    root = tmp_path_factory.mktemp("ckpt")
    learner = make()
    for i in range(2):
        learner.train_step(batch(i))
    save_checkpoint(root, learner.state_dict())
    return root


def copy_of(saved: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(saved, tmp_path / "c")
    return tmp_path / "c"


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_equals_uninterrupted(tmp_path: Path, lora_rank: int) -> None:
    n, m = 3, 4  # warm-up 5 spans the checkpoint, so the scheduler state matters
    full = make(lora_rank)
    full_losses = [full.train_step(batch(i))["loss"] for i in range(n + m)]

    first = make(lora_rank)
    for i in range(n):
        first.train_step(batch(i))
    torch.manual_seed(999)
    np.random.seed(5)
    random.seed(5)
    torch_draw, np_draw, py_draw = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(999)
    np.random.seed(5)
    random.seed(5)
    first.checkpoint(tmp_path)

    resumed = make(lora_rank, seed=77)       # other learner seed: the generator state must come back
    torch.manual_seed(0)
    step_dir = resumed.resume(tmp_path)
    assert step_dir == tmp_path / "step_000003" and read_meta(step_dir)["step"] == n
    assert resumed.step == n and resumed.policy.version == n
    assert torch.rand(1) == torch_draw and np.random.rand() == np_draw and random.random() == py_draw
    resumed_losses = [resumed.train_step(batch(i))["loss"] for i in range(n, n + m)]
    assert resumed_losses == pytest.approx(full_losses[n:], rel=1e-6, abs=1e-7)
    for a, b in zip(full.params, resumed.params, strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    for a, b in zip(full.ema, resumed.ema, strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    assert resumed.scheduler.get_last_lr() == pytest.approx(full.scheduler.get_last_lr())


def test_layout_and_latest_pointer(tmp_path: Path) -> None:
    learner = make()
    learner.train_step(batch(0))
    d1 = save_checkpoint(tmp_path, learner.state_dict())
    learner.train_step(batch(1))
    d2 = save_checkpoint(tmp_path, learner.state_dict())
    assert (d1.name, d2.name) == ("step_000001", "step_000002") and find_latest(tmp_path) == d2
    assert (tmp_path / "latest").read_text() == "step_000002\n"
    assert sorted(p.name for p in d2.iterdir()) == [
        "ema.safetensors", "meta.json", "optimizer.pt", "rng.pt", "trainable.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000002"]
    meta = json.loads((d2 / "meta.json").read_text())
    assert meta["step"] == 2 and meta["version"] == 2 and meta["config_hash"] == learner.config_hash
    save_checkpoint(tmp_path, learner.state_dict())      # re-saving a step replaces it cleanly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000002"]


def test_crash_mid_save_keeps_previous_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    learner = make()
    learner.train_step(batch(0))
    save_checkpoint(tmp_path, learner.state_dict())
    learner.train_step(batch(1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, learner.state_dict())
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]
    assert load_checkpoint(tmp_path, make()).name == "step_000001"


def test_missing_root_names_latest(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="missing .*latest"):
        load_checkpoint(tmp_path, make())
    (tmp_path / "latest").write_text("step_000009\n")
    with pytest.raises(CheckpointError, match="step_000009.*meta.json is missing"):
        load_checkpoint(tmp_path, make())
    with pytest.raises(CheckpointError, match="step_000009"):
        find_latest(tmp_path)


def test_missing_file_is_named(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    (root / "step_000002" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing: .*optimizer.pt"):
        load_checkpoint(root, make())


def test_corrupted_file_is_named(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    path = root / "step_000002" / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                             # flip a bit inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted .*trainable.safetensors"):
        load_checkpoint(root, make())
    path.write_bytes(bytes(data[:40]))           # truncated; checksums off -> the loader's error
    with pytest.raises(CheckpointError, match="cannot load .*trainable.safetensors"):
        load_checkpoint(root, make(), verify=False)
    (root / "step_000002" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*meta.json"):
        load_checkpoint(root, make())


class Evil:
    pass


def test_pickled_objects_are_refused(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    step = root / "step_000002"
    torch.save({"x": Evil()}, step / "rng.pt")
    with pytest.raises(CheckpointError, match="cannot load .*rng.pt"):
        load_checkpoint(root, make(), verify=False)   # weights_only=True rejects the class


def test_config_drift(saved: Path) -> None:
    with pytest.raises(CheckpointError, match="training config .*differs"):
        load_checkpoint(saved, make(lr=2e-3))
    with pytest.warns(UserWarning, match="training config"):
        load_checkpoint(saved, make(lr=2e-3), allow_config_change=True)
    with pytest.warns(UserWarning, match="outside the training fields"):
        load_checkpoint(saved, make(batch_size=8))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="parameter names differ"):
        load_checkpoint(saved, make(lora_rank=4), allow_config_change=True)


def test_srum_config_hash_is_recorded(tmp_path: Path) -> None:
    cfg = validate_config({"policy": {"device": "cpu"}, "learner": {"warmup_steps": 0}})
    learner = Learner(cfg, DiffusersPolicy.from_config(cfg.policy))
    save_checkpoint(tmp_path, learner.state_dict())
    meta = json.loads((tmp_path / "step_000000" / "meta.json").read_text())
    assert meta["config_hash"] == learner.config_hash and len(meta["config_hash"]) == 64
    cfg2 = cfg.model_copy(update={"run": cfg.run.model_copy(update={"max_steps": 5})})
    with pytest.warns(UserWarning, match="outside the training fields"):
        Learner(cfg2, DiffusersPolicy.from_config(cfg.policy)).resume(tmp_path)
