"""Weight publication and sync: versions, fetch-only-when-behind, rollback, sizes, and (with a local Ray)
the object-store path, a dead owner and a dead store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.weights import (
    BF16Array,
    SyncResult,
    SyncStats,
    WeightStore,
    as_tensors,
    maybe_sync,
    publish_state,
    state_nbytes,
    to_cpu_state,
)
from learner.base import TrainableState
from tests.ray_cluster import local_ray, wait_until_dead, wait_until_lost


class CountingStore(WeightStore):
    """A plain store that counts the checks and how often they handed out the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = self.handed_out = 0

    def latest_if_changed(self, version):
        self.checks += 1
        out = super().latest_if_changed(version)
        self.handed_out += out[1] is not None
        return out


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


def test_to_cpu_state_is_numpy_without_copies_and_loads_back():
    w = torch.ones(3, requires_grad=True)
    half = torch.ones(2, dtype=torch.bfloat16)
    out = to_cpu_state({"w": w, "h": half, "step": 3})
    assert isinstance(out["w"], np.ndarray) and out["w"].ctypes.data == w.data_ptr()  # a view, no copy
    # numpy has no bfloat16: its bits travel as int16, still a view
    assert isinstance(out["h"], BF16Array) and out["h"].bits.ctypes.data == half.data_ptr()
    assert out["step"] == 3 and state_nbytes(out) == 3 * 4 + 2 * 2
    back = as_tensors(out)
    assert torch.equal(back["w"], torch.ones(3))
    assert back["h"].dtype == torch.bfloat16 and torch.equal(back["h"], half) and back["h"].data_ptr() == half.data_ptr()


class Params(TrainableState):
    def __init__(self, **tensors: torch.Tensor) -> None:
        self._params = {k: torch.nn.Parameter(v) for k, v in tensors.items()}
        self.version = 0


def test_share_uses_cpu_tensors_of_the_dtype_in_place_and_copies_the_rest():
    p = Params(w=torch.zeros(3), h=torch.zeros(2, dtype=torch.bfloat16))
    w, h64 = torch.arange(3.0), torch.ones(2, dtype=torch.float64)
    p.load_trainable_state({"w": w, "h": h64}, 5, share=True)
    assert p._params["w"].data_ptr() == w.data_ptr()  # shared: no copy
    assert p._params["h"].dtype == torch.bfloat16 and torch.equal(p._params["h"].float(), torch.ones(2))  # copied
    assert p.version == 5
    p.load_trainable_state({"w": torch.ones(3), "h": h64}, 6)  # default: a copy into the (shared) tensor
    assert torch.equal(w, torch.ones(3))  # the copy wrote through the shared memory: why share is for samplers


def test_a_sampler_shares_the_object_store_arrays(ray_local):
    ray = ray_local
    state = {"w": torch.randn(256, 64)}
    ref = ray.put(to_cpu_state(state))
    p = Params(w=torch.zeros(256, 64))
    fetched = as_tensors(ray.get(ref))
    p.load_trainable_state(fetched, 1, share=True)
    assert p._params["w"].data_ptr() == fetched["w"].data_ptr() and torch.equal(p._params["w"], state["w"])
    assert not ray.get(ref)["w"].flags.writeable  # object-store memory: read-only, shared by every reader


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
    pub = publish_state(store, 3, {"w": torch.arange(4.0)}, use_ray=False)
    assert pub.seconds >= 0.0 and isinstance(pub.payload["w"], np.ndarray)
    r = maybe_sync(store, 0, load, stats)
    assert (int(r), r.synced, r.failed, r.lag) == (3, True, False, 0)
    assert len(load.calls) == 1 and load.calls[0][1] == 3
    assert torch.equal(load.calls[0][0]["w"], torch.arange(4.0))
    # Current: one round trip, and the store hands out no weights.
    r = maybe_sync(store, 3, load, stats)
    assert (int(r), r.synced) == (3, False)
    assert (store.checks, store.handed_out, len(load.calls)) == (3, 1, 1)
    # min_lag: one version behind is not worth a fetch when pushes bring the weights (RDT), two are
    publish_state(store, 4, {"w": torch.arange(4.0) + 1}, use_ray=False)
    assert not maybe_sync(store, 3, load, stats, min_lag=2).synced
    publish_state(store, 5, {"w": torch.arange(4.0) + 2}, use_ray=False)
    assert maybe_sync(store, 3, load, stats, min_lag=2).synced
    assert (stats.checks, stats.syncs, stats.failed, stats.last_version) == (5, 2, 0, 5)
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
            return publish_state(store, version, {"w": np.ones(3)}).seconds

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
    wait_until_dead(ray, store)
    stats = SyncStats()
    r = maybe_sync(store, 0, Loader(), stats, timeout_s=10)
    assert (int(r), r.failed, stats.failed) == (0, True, 1)
    assert "Actor" in stats.last_error
