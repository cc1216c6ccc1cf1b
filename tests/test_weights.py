"""Weight publication and sync: versions, fetch-only-when-behind, rollback, sizes, and (with a local Ray)
the object-store path, a dead owner and a dead store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.weights import (
    SyncResult,
    SyncStats,
    WeightStore,
    maybe_sync,
    publish_state,
    state_nbytes,
    to_cpu_state,
)
from tests.ray_cluster import local_ray, wait_until_lost


class CountingStore(WeightStore):
    """A plain store that counts how often the weights themselves are asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.latest_calls = 0

    def latest(self):
        self.latest_calls += 1
        return super().latest()


class Loader:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int]] = []

    def __call__(self, state: dict, version: int) -> None:
        self.calls.append((state, version))


# ---------------------------------------------------------------------------------------------- plain
def test_state_nbytes_counts_tensors_and_arrays():
    state = {
        "a": torch.zeros(2, 3),  # 6 * 4 = 24
        "b": torch.zeros(4, dtype=torch.float16),  # 4 * 2 = 8
        "c": np.zeros(5, dtype=np.int64),  # 40
        "nested": {"d": [torch.zeros(1)]},  # 4
        "name": "not a tensor",  # 0
    }
    assert state_nbytes(state) == 76


def test_to_cpu_state_detaches_without_copying_cpu_tensors():
    w = torch.ones(3, requires_grad=True)
    out = to_cpu_state({"w": w, "step": 3})
    assert not out["w"].requires_grad
    assert out["w"].data_ptr() == w.data_ptr()
    assert out["step"] == 3


def test_store_versions_must_increase_unless_rollback():
    store = WeightStore()
    assert store.latest() is None and store.version() == -1
    assert store.publish(1, ["r1"], {"step": 1}) == 1
    assert store.latest() == (1, ["r1"])
    with pytest.raises(ValueError, match="not newer than the published version 1"):
        store.publish(1, ["again"])
    with pytest.raises(TypeError, match="list of ObjectRefs"):
        store.publish(2, "r2")
    store.publish(0, ["r0"], allow_rollback=True)
    info = store.info()
    assert (info["version"], info["publishes"], info["rollbacks"], info["meta"]) == (0, 2, 1, {})


def test_maybe_sync_fetches_only_when_behind():
    store, load, stats = CountingStore(), Loader(), SyncStats()
    # Nothing published: nothing fetched, nothing loaded.
    r = maybe_sync(store, 0, load, stats)
    assert isinstance(r, SyncResult) and r == 0 and not r.synced and r.latest_version == -1
    assert publish_state(store, 3, {"w": torch.arange(4.0)}, use_ray=False) >= 0.0
    r = maybe_sync(store, 0, load, stats)
    assert (int(r), r.synced, r.failed, r.lag) == (3, True, False, 0)
    assert len(load.calls) == 1 and load.calls[0][1] == 3
    assert torch.equal(load.calls[0][0]["w"], torch.arange(4.0))
    # Current: the store is asked for its version only, never for the weights.
    r = maybe_sync(store, 3, load, stats)
    assert (int(r), r.synced) == (3, False)
    assert (store.latest_calls, len(load.calls)) == (1, 1)
    assert (stats.checks, stats.syncs, stats.failed, stats.last_version) == (3, 1, 0, 3)
    assert store.info()["meta"]["nbytes"] == 16


def test_samplers_follow_a_rollback():
    store, load = WeightStore(), Loader()
    publish_state(store, 5, {"w": torch.ones(1)}, use_ray=False)
    publish_state(store, 2, {"w": torch.zeros(1)}, use_ray=False, allow_rollback=True)
    assert maybe_sync(store, 5, load) == 2
    assert torch.equal(load.calls[-1][0]["w"], torch.zeros(1))


def test_load_errors_propagate():
    store = WeightStore()
    publish_state(store, 1, {"w": torch.ones(1)}, use_ray=False)

    def broken(state, version):
        raise RuntimeError("size mismatch for w")

    with pytest.raises(RuntimeError, match="size mismatch"):
        maybe_sync(store, 0, broken)


# ---------------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum-test-weights", __name__) as ray:
        yield ray


def test_publish_through_the_object_store_and_sync_two_samplers(ray_local):
    ray = ray_local
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    state = {"lora_A": torch.randn(8, 4), "lora_B": torch.randn(4, 8)}
    publish_state(store, 1, state, {"step": 10})
    latest = ray.get(store.latest.remote())
    assert latest[0] == 1 and isinstance(latest[1][0], ray.ObjectRef)  # the store holds a ref, not tensors
    info = ray.get(store.info.remote())
    assert info["meta"]["nbytes"] == state_nbytes(state) == 256 and info["meta"]["step"] == 10
    loads = [Loader(), Loader()]
    results = [maybe_sync(store, 0, load) for load in loads]
    assert [int(r) for r in results] == [1, 1] and all(r.synced and r.seconds > 0 for r in results)
    for load in loads:
        got, version = load.calls[0]
        assert version == 1 and all(torch.equal(got[k], state[k]) for k in state)
    assert not maybe_sync(store, 1, loads[0]).synced


def test_dead_owner_keeps_current_weights_and_counts_a_failure(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Publisher:  # stands in for the learner host, which owns what it ray.puts
        def publish(self, store, version: int) -> float:
            return publish_state(store, version, {"w": np.ones(3)})

    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    pub = Publisher.remote()
    ray.get(pub.publish.remote(store, 1))
    ray.kill(pub)
    wait_until_lost(ray, ray.get(store.latest.remote())[1][0])
    stats, load = SyncStats(), Loader()
    r = maybe_sync(store, 0, load, stats, timeout_s=10)
    assert (int(r), r.synced, r.failed, r.latest_version) == (0, False, True, 1)
    assert load.calls == [] and stats.failed == 1
    assert "OwnerDied" in stats.last_error or "ObjectLost" in stats.last_error


def test_dead_store_is_a_counted_failure_not_a_crash(ray_local):
    ray = ray_local
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    publish_state(store, 1, {"w": torch.ones(2)})
    ray.kill(store)
    stats = SyncStats()
    r = maybe_sync(store, 0, Loader(), stats, timeout_s=10)
    assert (int(r), r.failed, stats.failed) == (0, True, 1)
    assert "Actor" in stats.last_error
