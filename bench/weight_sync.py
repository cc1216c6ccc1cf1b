"""Benchmark: weight sync from the learner to N samplers, each transport against one in-process copy.

Side by side in one run, for synthetic float32 states of ``--sizes-mb`` (default 0.3, 64, 256 MB, 16
tensors) and ``--samplers`` (default 1, 2, 4) receiver actors on a local Ray bound to 127.0.0.1:

- ``object_store``: what the learner and the driver run (:mod:`cluster.push`):
  :func:`actors.weights.publish_state` (one ``ray.put`` of numpy arrays), then the reference pushed to
  every receiver's ``receive`` (Ray maps the arrays from shared memory; the receiver's CPU parameters
  take them as their data, as a sampler's do);
  wall time until all N loaded the version.
- ``pull``: the fallback a sampler runs after a lost push or a restart, :func:`actors.weights.maybe_sync`
  (one ``latest_if_changed`` round trip to the weight store, a zero-copy fetch, the same load).
- ``gloo``: Ray Direct Transport as the driver pushes it (:class:`cluster.push.WeightPusher`): the
  source's RDT method returns a copy of its tensors, each receiver gets the reference as its argument
  and loads the tensors it received; the collective group is built once, before timing.
- ``shm``: the same-node transport (:mod:`actors.shm_weights`) as the learner host and the driver run it:
  the state copied into the idle file of a standing pair in ``/dev/shm``, the descriptor pushed to every
  receiver's ``receive_shm``, which copies from the mapped file into its own parameters, the store-copy
  task (it waits for those receives) started and its reference published to the weight store; wall time
  until all N loaded it. The store's copy then runs untimed before the next version, as it runs during
  the next learner step in the service.
- ``copy``: one in-process ``copy_`` of the same tensors (the floor every ratio is measured against).

    python bench/weight_sync.py [--sizes-mb 0.3,64,256] [--samplers 1,2,4] [--reps 5]

Ends with ``RESULT`` lines: the best transport's ratio to one copy at 64 MB and 256 MB with 2 samplers,
the fixed cost at 0.3 MB with 2 samplers in ms, and every transport's time per size (2 samplers).
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the local Ray on 127.0.0.1 (read at import)
os.environ.pop("RAY_ADDRESS", None)  # always our own local cluster

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ray  # noqa: E402
import torch  # noqa: E402
from _pipeline_util import median  # noqa: E402

from actors.shm_weights import ShmReader, ShmWriter, receive_shm, submit_store_copy  # noqa: E402
from actors.weights import WeightStore, as_tensors, maybe_sync, publish_state  # noqa: E402
from cluster.control import NAMESPACE  # noqa: E402
from cluster.push import WeightPusher  # noqa: E402
from learner.base import TrainableState  # noqa: E402

TARGETS = {"weight_sync_ratio_64mb": 4.0, "weight_sync_ratio_256mb": 3.0, "weight_sync_fixed_ms": 5.0}
N_TENSORS = 16


def log(msg: str) -> None:
    print(msg, flush=True)


def make_state(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    per = max(1, nbytes // 4 // N_TENSORS)
    return {f"w{i}": torch.randn(per, generator=g) for i in range(N_TENSORS)}


class Source:
    """The learner's side: its tensors, and the method whose return Ray Direct Transport moves."""

    def __init__(self, nbytes: int):
        self.state = make_state(nbytes)

    def bump(self) -> None:
        for t in self.state.values():
            t.add_(1.0)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}  # what LearnerHost.weights() sends

    def ping(self) -> int:
        return 1


class Receiver(TrainableState):
    """A sampler's side: parameters of the same shapes, loaded as a sampler loads them
    (``load_trainable_state(share=True)``: CPU arrays of the right dtype are used in place, no copy)."""

    def __init__(self, nbytes: int, store: Any):
        self._params = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in make_state(nbytes).items()}
        self.store, self.version = store, -1
        self.reader, self.shared = ShmReader(), False

    def load(self, state: dict[str, Any], version: int) -> None:
        self.load_trainable_state(state, version, share=True)
        self.shared = True

    def load_copy(self, state: dict[str, Any], version: int) -> None:  # as SamplerActor._load_copy
        if self.shared:
            for p in self._params.values():
                p.data = torch.empty_like(p.data)
            self.shared = False
        self.load_trainable_state(state, version)

    def receive_shm(self, desc: Any) -> int:
        receipt = receive_shm(self.reader, desc, self.version, ray.get_runtime_context().get_node_id(), self.load_copy)
        assert receipt.via == "shm", receipt
        return self.version

    def pull(self) -> int:
        return int(maybe_sync(self.store, self.version, self.load))

    def receive(self, state: dict[str, Any], version: int) -> int:
        self.load(as_tensors(state), version)
        return self.version

    def ping(self) -> int:
        return 1


def copy_once(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, t in dst.items():
            t.copy_(src[k])
    return time.perf_counter() - t0


def bench_size(nbytes: int, n: int, reps: int) -> dict[str, float]:
    """Median seconds per sync of each transport for one size and receiver count."""
    rdt = ray.remote(enable_tensor_transport=True)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    source = rdt(Source).options(num_cpus=0).remote(nbytes)
    receivers = [rdt(Receiver).options(num_cpus=0).remote(nbytes, store) for _ in range(n)]
    ray.get([source.ping.remote(), *(r.ping.remote() for r in receivers)])
    local = make_state(nbytes, 2)
    dst = {k: torch.zeros_like(t) for k, t in local.items()}
    copy_once(local, dst)  # touch the pages once
    pusher = WeightPusher("gloo")
    writer = ShmWriter("bench", node_id=ray.get_runtime_context().get_node_id())
    out: dict[str, float] = {}
    copies: list[float] = []
    try:
        times, pulls = [], []
        for v in range(2 * (reps + 1)):
            local_v = {k: t + v for k, t in local.items()}
            copies.append(copy_once(local_v, dst))  # the in-process floor, measured beside each transfer
            t0 = time.perf_counter()
            pub = publish_state(store, v, local_v, wait=False)  # as the learner host publishes
            if v % 2:  # the fallback: the store must have the version first
                ray.get(pub.ack)
                got = ray.get([r.pull.remote() for r in receivers])
                pulls.append(time.perf_counter() - t0)
            else:
                got = ray.get([r.receive.remote(pub.payload, v) for r in receivers])
                times.append(time.perf_counter() - t0)
            assert got == [v] * n, got
        out["object_store"], out["pull"] = median(times[1:]), median(pulls[1:])
        times = []
        handles = {f"r{i}": r for i, r in enumerate(receivers)}
        for v in range(reps + 1):
            ray.get(source.bump.remote())
            t0 = time.perf_counter()
            refs = pusher.push(source, handles, 1000 + v, epoch=0)
            got = ray.get(list(refs))
            times.append(time.perf_counter() - t0)
            assert got == [1000 + v] * n, got
        out["gloo"] = median(times[1:])
        out["shm"] = bench_shm(writer, store, receivers, local, reps)
        out["copy"] = median(copies[2:])
    finally:
        writer.close()
        pusher.close()
        for h in (source, store, *receivers):
            with contextlib.suppress(Exception):
                ray.kill(h, no_restart=True)
    return out


def bench_shm(writer: ShmWriter, store: Any, receivers: list[Any], local: dict[str, torch.Tensor],
              reps: int) -> float:
    """Median seconds of the shm transport's push (after one warm-up version, which also starts the
    store-copy task's worker); a version the files could not carry fails the bench."""
    times = []
    for v in range(2000, 2000 + reps + 2):
        local_v = {k: t + v for k, t in local.items()}
        t0 = time.perf_counter()
        desc = writer.write(local_v, v)  # as LearnerHost.publish
        assert desc is not None, f"shm: version {v}'s idle file was still being read ({writer.fallbacks} fallbacks)"
        calls = [r.receive_shm.remote(desc) for r in receivers]  # as WeightPusher._push_shm
        copy = submit_store_copy(desc, calls)
        ack = store.publish.remote(v, [copy], {"transport": "shm"}, allow_rollback=True)
        got = ray.get(calls)
        times.append(time.perf_counter() - t0)
        writer.lease(v, [*calls, copy])  # as the driver's next train call hands them over
        assert got == [v] * len(receivers), got
        ray.get([copy, ack])  # the store's copy, which the service runs during the next learner step: not timed
    return median(times[1:])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="0.3,64,256")
    ap.add_argument("--samplers", default="1,2,4")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [float(x) for x in args.sizes_mb.split(",") if x]
    counts = [int(x) for x in args.samplers.split(",") if x]
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=NAMESPACE, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    rows: dict[tuple[float, int], dict[str, float]] = {}
    try:
        for mb in sizes:
            nbytes = int(mb * 1e6)
            for n in counts:
                r = bench_size(nbytes, n, args.reps)
                rows[(mb, n)] = r
                copy_s = r["copy"]
                log(f"{mb:g} MB, {n} sampler(s): object store push {1e3 * r['object_store']:.2f} ms (pull "
                    f"{1e3 * r['pull']:.2f} ms), gloo RDT {1e3 * r['gloo']:.2f} ms, shm {1e3 * r['shm']:.2f} ms; "
                    f"one in-process copy {1e3 * copy_s:.3f} ms -> ratios {r['object_store'] / copy_s:.1f} (pull "
                    f"{r['pull'] / copy_s:.1f}) / {r['gloo'] / copy_s:.1f} / {r['shm'] / copy_s:.1f} "
                    f"(medians of {args.reps})")
    finally:
        ray.shutdown()
    results: list[tuple[str, float, float | None]] = []
    for mb, name in ((64.0, "weight_sync_ratio_64mb"), (256.0, "weight_sync_ratio_256mb")):
        if (mb, 2) in rows:
            r = rows[(mb, 2)]
            results.append((name, min(r["object_store"], r["gloo"], r["shm"]) / r["copy"], TARGETS[name]))
    if (0.3, 2) in rows:
        r = rows[(0.3, 2)]
        results.append(("weight_sync_fixed_ms", 1e3 * min(r["object_store"], r["gloo"], r["shm"]),
                        TARGETS["weight_sync_fixed_ms"]))
    for (mb, n), r in rows.items():
        if n == 2:
            for t in ("object_store", "pull", "gloo", "shm"):
                results.append((f"weight_sync_ms_{t}_{mb:g}mb", 1e3 * r[t], None))
    for name, value, target in results:
        ok = "true" if target is None or value <= target else "false"
        log(f"RESULT {name} {value:.3f} target={'-' if target is None else f'{target:g}'} ok={ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
