"""Checkpoints: exact resume, atomic `latest`, clear errors on missing/corrupted files and config drift."""

from __future__ import annotations

import json
import random
import shutil
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


# ------------------------------------------------------------------------------------ reliability
def test_resaving_a_step_keeps_the_good_copy_and_an_interrupted_replacement_loses_nothing(tmp_path, monkeypatch):
    learner = make()
    learner.train_step(batch(0))
    first = save_checkpoint(tmp_path, learner.state_dict())
    learner.train_step(batch(1))
    second = save_checkpoint(tmp_path, learner.state_dict())
    stamp = (second / "meta.json").stat().st_mtime_ns
    assert save_checkpoint(tmp_path, learner.state_dict()) == second  # the final re-save of the same step ...
    assert (second / "meta.json").stat().st_mtime_ns == stamp  # ... leaves the complete copy alone
    (second / "rng.pt").write_bytes(b"broken")  # now the copy is broken: a re-save replaces it, new first
    real_replace, calls = ckpt.os.replace, []

    def crash_on_switch(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the broken copy was moved aside, the new one not yet in: the process dies
            raise KeyboardInterrupt("killed mid-save")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_switch)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, learner.state_dict())
    monkeypatch.undo()
    assert find_latest(tmp_path) == first  # latest names a step that is gone: the newest complete one
    resumed = make()
    assert load_checkpoint(tmp_path, resumed) == first and resumed.step == 1


def test_corrupt_latest_falls_back_to_an_earlier_step_with_a_warning(tmp_path, caplog):
    learner = make()
    for i in range(2):
        learner.train_step(batch(i))
        save_checkpoint(tmp_path, learner.state_dict())
    (tmp_path / "step_000002" / "trainable.safetensors").write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="srum.checkpoint"):
        assert find_latest(tmp_path) == tmp_path / "step_000001"
    assert "step_000002" in caplog.text and "newest complete" in caplog.text
    (tmp_path / "step_000001" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="no other complete checkpoint"):
        find_latest(tmp_path)  # checkpoints, but none usable: never a silent start from scratch


def test_latest_must_name_a_step_dir_inside_the_root(tmp_path):
    learner = make()
    learner.train_step(batch(0))
    save_checkpoint(tmp_path / "run", learner.state_dict())
    outside = tmp_path / "step_000007"
    shutil.copytree(tmp_path / "run" / "step_000001", outside)
    (tmp_path / "run" / "latest").write_text("../step_000007\n")
    assert find_latest(tmp_path / "run") == tmp_path / "run" / "step_000001"  # not followed outside


def test_malformed_meta_is_a_checkpoint_error(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    meta_path = root / "step_000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for bad in ("2", 2.5, True, None, -1):
        meta_path.write_text(json.dumps({**meta, "step": bad}))
        with pytest.raises(CheckpointError, match="step must be an int"):
            read_meta(root / "step_000002")


def test_old_checkpoints_are_pruned(tmp_path):
    learner = make(keep_checkpoints=2)
    for i in range(4):
        learner.train_step(batch(i))
        learner.checkpoint(tmp_path, service={"prompts": {"epoch": 0}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003", "step_000004"]
    resumed = make()
    resumed.resume(tmp_path)
    assert resumed.step == 4 and resumed.resumed_service == {"prompts": {"epoch": 0}}
