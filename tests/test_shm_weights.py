"""The shared-memory weight transport (``cluster.weight_transport: shm``): the layout, pack and unpack, torn
and bad buffers, the double-buffer ack rule, the files' life cycle, a sampler's receive (another node, a
missing file, a read torn under it), and with a local Ray a learner host that publishes twice through
shm to two samplers, and a sampler whose file is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from actors.components import Bundle, Components
from actors.learner_host import LearnerHost
from actors.sampler import SamplerActor
from actors.shm_layout import (
    HEADER_BYTES,
    BadBuffer,
    DoubleBuffer,
    ShmDescriptor,
    TornBuffer,
    begin_write,
    layout_digest,
    pack,
    plan_layout,
    read_header,
    unpack,
)
from actors.shm_weights import ShmReader, ShmWriter, receive_shm, remove_stale, store_copy
from actors.weights import WeightStore, as_tensors
from core.config_io import load_config
from learner.base import TrainableState
from tests.ray_cluster import local_ray

pytestmark = pytest.mark.timeout(300)


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int64) + seed,
            "h": torch.randn(4, generator=g).to(torch.bfloat16), "m": torch.tensor([True, False, seed % 2 == 0])}


def buffer_for(s: dict[str, torch.Tensor], version: int) -> tuple[torch.Tensor, ShmDescriptor]:
    entries, nbytes = plan_layout(s)
    digest = layout_digest(entries, nbytes)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    pack(buf, entries, s, version, digest)
    return buf, ShmDescriptor("mem", 0, version, entries, nbytes, digest)


def clone_all(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in views.items()}


# ------------------------------------------------------------------------------------------- pure
def test_layout_aligns_every_tensor_after_the_header_and_digest_tells_layouts_apart():
    entries, nbytes = plan_layout(state())
    assert [e.name for e in entries] == ["a", "b", "h", "m"] and entries[0].offset == HEADER_BYTES
    assert all(e.offset % 64 == 0 for e in entries) and nbytes >= entries[-1].offset + entries[-1].nbytes
    assert [e.nbytes for e in entries] == [60, 56, 8, 3] and entries[2].dtype == "bfloat16"
    other = dict(state(), a=torch.zeros(5, 3))  # same bytes, another shape
    assert layout_digest(entries, nbytes) != layout_digest(plan_layout(other)[0], nbytes)
    with pytest.raises(TypeError, match="complex"):
        plan_layout({"c": torch.zeros(2, dtype=torch.complex64)})


def test_pack_then_unpack_gives_the_tensors_back_with_their_dtypes():
    s = state(3)
    buf, desc = buffer_for(s, 7)
    h = read_header(buf)
    assert h["start"] == h["done"] == 7 and h["nbytes"] == desc.nbytes and h["digest"] == desc.digest
    got = unpack(buf, desc, clone_all)
    assert set(got) == set(s) and all(got[k].dtype == s[k].dtype and torch.equal(got[k], s[k]) for k in s)


def test_torn_and_bad_buffers_are_detected():
    s = state()
    buf, desc = buffer_for(s, 1)
    with pytest.raises(TornBuffer):  # the buffer holds version 1, not 2
        unpack(buf, ShmDescriptor(desc.path, 0, 2, desc.entries, desc.nbytes, desc.digest), clone_all)
    with pytest.raises(TornBuffer, match="start=2 done=-1"):  # a write under way
        unpack(_writing(buf, desc), desc, clone_all)

    def rewrite_during_copy(views):  # the writer comes back while the reader copies
        out = clone_all(views)
        pack(buf, desc.entries, state(1), 2, desc.digest)
        return out

    with pytest.raises(TornBuffer):
        unpack(buf, desc, rewrite_during_copy)
    buf, desc = buffer_for(s, 1)
    with pytest.raises(BadBuffer, match="bytes"):
        unpack(buf[:-64], desc, clone_all)
    bad = buf.clone()
    bad[:8] = 0
    with pytest.raises(BadBuffer, match="header"):
        unpack(bad, desc, clone_all)
    with pytest.raises(BadBuffer, match="header"):  # another layout's digest
        unpack(buf, ShmDescriptor("mem", 0, 1, desc.entries, desc.nbytes, desc.digest ^ 1), clone_all)


def _writing(buf: torch.Tensor, desc: ShmDescriptor) -> torch.Tensor:
    b = buf.clone()
    begin_write(b, desc.digest, 2)
    return b


def test_double_buffer_rewrites_a_slot_only_when_its_readers_are_done():
    db, done = DoubleBuffer(), set()
    assert db.idle() == 0
    db.written(0, 10, ["copy10"])
    assert db.lease(10, ["r1", "r2"]) and not db.lease(99, ["x"])  # no slot holds 99: nothing to protect
    assert db.idle() == 1 and db.pending(1, done.__contains__) == []
    db.written(1, 11)
    assert db.idle() == 0 and db.pending(0, done.__contains__) == ["copy10", "r1", "r2"]
    done.update({"copy10", "r1"})
    assert db.pending(0, done.__contains__) == ["r2"]  # one reader still busy: slot 0 stays as it is
    done.add("r2")  # returned, or known dead (its call failed)
    assert db.pending(0, done.__contains__) == [] and db.slot_of(10) == 0
    db.written(0, 12)
    assert db.idle() == 1 and db.slot_of(10) is None and db.slot_of(11) == 1


def test_writer_alternates_files_waits_for_readers_falls_back_and_cleans_up(tmp_path):
    done, waits = set(), []
    w = ShmWriter("run/1", str(tmp_path), node_id="n1", is_done=done.__contains__,
                  wait_all=lambda tickets, s: waits.append(list(tickets)), wait_s=0.01)
    d0 = w.write(state(0), 0)
    w.lease(0, ["r0"])
    d1 = w.write(state(1), 1)
    assert d0.path != d1.path and {d0.slot, d1.slot} == {0, 1} and d0.node_id == "n1"
    assert all(os.path.getsize(p) == d0.nbytes for p in w.paths) and "run_1" in os.path.basename(d0.path)
    reader = ShmReader()
    got = reader.read(d1, clone_all)
    assert torch.equal(got["a"], state(1)["a"]) and torch.equal(got["h"], state(1)["h"])
    assert w.write(state(2), 2) is None and w.fallbacks == 1 and waits == [["r0"]]  # r0 still reads file 0
    done.add("r0")
    d2 = w.write(state(2), 2)
    assert d2.path == d0.path and torch.equal(reader.read(d2, clone_all)["b"], state(2)["b"])
    with pytest.raises(TornBuffer):  # a reader that was sent version 0 finds it overwritten
        reader.read(d0, clone_all)
    assert torch.equal(as_tensors(store_copy(d2))["h"], state(2)["h"])  # what the store-copy task returns
    w.close()
    assert not any(os.path.exists(p) for p in (d0.path, d1.path)) and list(tmp_path.iterdir()) == []


def test_remove_stale_removes_only_files_of_dead_writers_of_the_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = [f"srum-w-r-{dead}-ab12-0.bin", f"srum-w-r-{os.getpid()}-ab12-0.bin", f"srum-w-other-{dead}-ab12-1.bin"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert remove_stale("r", str(tmp_path)) == [str(tmp_path / names[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_receive_shm_copies_loads_nothing_on_another_node_and_keeps_weights_on_a_bad_file(tmp_path):
    w = ShmWriter("r", str(tmp_path), node_id="n1", is_done=lambda t: True, wait_all=None)
    desc = w.write(state(4), 4)
    loads: list[int] = []
    copy = lambda views, v: loads.append(v)  # noqa: E731
    r = receive_shm(ShmReader(), desc, 3, "n1", copy)
    assert (r.version, r.via, r.error, loads) == (4, "shm", None, [4])
    assert receive_shm(ShmReader(), desc, 4, "n1", copy).via == "kept"  # has it already
    loads.clear()
    r = receive_shm(ShmReader(), desc, 3, "n2", copy)  # another node: nothing loaded, it pulls from the store
    assert (r.version, r.via, r.error, loads) == (3, "remote", None, [])
    missing = ShmDescriptor(str(tmp_path / "gone.bin"), 0, 5, desc.entries, desc.nbytes, desc.digest, "n1")
    r = receive_shm(ShmReader(), missing, 4, "n1", copy)
    assert (r.version, r.via, loads) == (4, "kept", []) and "missing" in r.error

    def torn_copy(views, v):  # the file is rewritten while it is copied
        loads.append(v)
        w.write(state(6), 6)
        w.write(state(7), 7)

    r = receive_shm(ShmReader(), desc, 3, "n1", torn_copy)
    assert (r.version, r.via, loads) == (3, "torn", [4]) and "Torn" in r.error
    w.close()


# ------------------------------------------------------------------------------------------- with Ray
class TinyPolicy(TrainableState):
    """Stands in for a policy: two trainable tensors and a version."""

    def __init__(self, cfg, seed: int) -> None:
        self.device = torch.device("cpu")
        self._params = {"w": torch.nn.Parameter(torch.zeros(64, 32)), "b": torch.nn.Parameter(torch.zeros(32))}
        self.version = 0


def tiny_policy(cfg, seed: int) -> TinyPolicy:
    return TinyPolicy(cfg, seed)


class Host(LearnerHost):
    def step(self, value: float):
        """Set the weights to ``value`` as a learner step would, publish; the result the driver would get."""
        with torch.no_grad():
            for p in self.policy.named_trainable_parameters().values():
                p.fill_(value)
        self.policy.version += 1
        self._published, self._shm_desc = None, None
        self.publish(pushed=True)  # as train() does: the driver pushes it
        return self._published, self._shm_desc

    def lease(self, leases) -> None:
        for version, refs in leases.items():
            self.shm.lease(version, refs)

    def close_shm(self) -> None:
        self.shm.close()


class Sampler(SamplerActor):
    def weights(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.policy.named_trainable_parameters().items()}


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum-test-shm", __name__) as ray:
        yield ray


def test_a_learner_host_publishes_twice_through_shm_to_two_samplers(ray_local, tmp_path):
    ray = ray_local
    from cluster.push import WeightPusher

    cfg = load_config("configs/tiny_sd3.yaml", [f"run.output_dir={tmp_path}", "run.name=shm-test",
                                                "cluster.weight_transport=shm", "run.eval_every=0"])
    comps = Components(cfg, tiny_policy, lambda c: None, lambda c, j: None, Bundle("tiny"))
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    host = ray.remote(Host).options(num_cpus=0).remote(comps, str(tmp_path), store)
    samplers = {f"s{i}": ray.remote(Sampler).options(num_cpus=0).remote(comps, f"s{i}", store) for i in range(2)}
    pusher = WeightPusher("shm", cfg.run.name)
    pusher.store = store
    ray.get([host.ping.remote(), *(s.ping.remote() for s in samplers.values())])
    ray.get(ray.get(store.latest.remote())[1][0])  # version 0 (the host's start) is in the store: its file is free
    descs = []
    for version, value in ((1, 1.5), (2, -2.0)):
        published, desc = ray.get(host.step.remote(value))
        assert desc is not None and published == (version, []) and desc.version == version and desc.nbytes < 20_000
        descs.append(desc)
        refs = pusher.push(host, samplers, version, 0, published, desc)
        assert sorted(ray.get(list(refs))) == [version, version]
        ray.get(host.lease.remote(pusher.take_leases()))
        for s in samplers.values():
            w = ray.get(s.weights.remote())
            assert torch.equal(w["w"], torch.full((64, 32), value)) and torch.equal(w["b"], torch.full((32,), value))
        latest = ray.get(store.latest.remote())  # the store has the version too (late joiners, other nodes)
        assert latest[0] == version and torch.equal(as_tensors(ray.get(latest[1][0]))["w"], torch.full((64, 32), value))
    assert descs[0].path != descs[1].path and all(os.path.exists(d.path) for d in descs)
    assert all(ray.get(s.get_metrics.remote())["shm_failures"] == 0 for s in samplers.values())

    # a sampler whose file is missing counts a failure and keeps its weights
    os.unlink(descs[0].path)
    published, desc = ray.get(host.step.remote(3.0))
    assert desc.path == descs[0].path  # the idle file of the pair (gone from /dev/shm, still mapped by the host)
    s0 = samplers["s0"]
    assert ray.get(s0.receive_shm.remote(desc)) == 2
    m = ray.get(s0.get_metrics.remote())
    assert m["version"] == 2 and m["shm_failures"] == 1
    assert torch.equal(ray.get(s0.weights.remote())["w"], torch.full((64, 32), -2.0))
    ray.get(host.close_shm.remote())
    assert not any(os.path.exists(d.path) for d in descs)  # closing (the learner's stop) removes the pair
    pusher.close()
    for h in (host, store, *samplers.values()):
        ray.kill(h)
