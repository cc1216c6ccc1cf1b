"""Benchmark: weight sync from the learner to sampler actors through the object store.

``publish_state`` + ``maybe_sync`` into 2 real sampler actors (wall time until both loaded the new
version) divided by one in-process ``load_trainable_state`` of the same tensors into a second policy;
full fine-tuning and LoRA (``policy.lora_rank=8``) of the tiny SD3 policy; an INFO sweep over synthetic
float32 states of ``--sizes-mb``. Local Ray on 127.0.0.1.

    python bench/weight_sync.py [--reps 30] [--sizes-mb 1,16,64]

Ends with ``RESULT <name> <value> target=<t> ok=<true|false>`` lines.
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

from actors.sampler import SamplerActor  # noqa: E402
from actors.weights import WeightStore, maybe_sync, publish_state, state_nbytes  # noqa: E402
from cluster.control import NAMESPACE  # noqa: E402
from core.config import SRUMConfig  # noqa: E402
from core.config_io import load_config  # noqa: E402
from srum.registry import compose  # noqa: E402

CONFIG = ROOT / "configs" / "tiny_sd3.yaml"
TARGETS = {"weight_sync_ratio_full": 3.0, "weight_sync_ratio_lora": 3.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def kill(*handles: Any) -> None:
    for h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h, no_restart=True)


class BenchSampler(SamplerActor):
    """The real sampler actor plus ``sync_now()``: exactly the sync it runs before every batch."""

    def sync_now(self) -> dict[str, Any]:
        before = self.policy.version
        self._sync()
        return {"version": self.policy.version, "synced": self.policy.version != before}


class StateHolder:
    """A sampler stand-in holding an arbitrary state dict (for the INFO size sweep only)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], store: Any):
        self.state = {k: torch.zeros(s) for k, s in shapes.items()}
        self.store, self.version = store, -1

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], version: int) -> None:
        for k, p in self.state.items():
            p.copy_(state[k])

    def sync_now(self) -> dict[str, Any]:
        res = maybe_sync(self.store, self.version, self.load)
        self.version = int(res)
        return {"version": self.version, "synced": res.synced}


def _sync_loop(store: Any, receivers: list[Any], state: dict[str, torch.Tensor], local_load: Any,
               warmup: int, reps: int) -> dict[str, Any]:
    t_local, t_remote, t_publish = [], [], []
    for r in range(warmup + reps):
        v = r + 1
        t0 = time.perf_counter()
        local_load(state, v)
        t1 = time.perf_counter()
        publish_state(store, v, state)
        t2 = time.perf_counter()
        res = ray.get([s.sync_now.remote() for s in receivers])
        t3 = time.perf_counter()
        if not all(x["synced"] and x["version"] == v for x in res):
            raise RuntimeError(f"a sampler did not load version {v}: {res}")
        if r >= warmup:
            t_local.append(t1 - t0)
            t_remote.append(t3 - t1)
            t_publish.append(t2 - t1)
    return {"local_s": median(t_local), "remote_s": median(t_remote), "publish_s": median(t_publish),
            "ratio": median(t_remote) / median(t_local), "nbytes": state_nbytes(state)}


def bench_weight_sync(cfg: SRUMConfig, warmup: int, reps: int) -> dict[str, Any]:
    """publish_state + maybe_sync into 2 real sampler actors vs one in-process load_trainable_state."""
    res = cfg.cluster.sampler_resources
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    parts = compose(cfg)
    samplers = [ray.remote(BenchSampler).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
        parts, f"sync-{i}", store) for i in range(2)]
    ray.get([s.ping.remote() for s in samplers])
    src, dst = parts.policy(cfg.run.seed), parts.policy(cfg.run.seed + 1)
    _, state = src.trainable_state()
    try:
        return _sync_loop(store, samplers, state, dst.load_trainable_state, warmup, reps)
    finally:
        kill(*samplers, store)


def bench_sync_size(nbytes: int, n_tensors: int, warmup: int, reps: int, num_cpus: float) -> dict[str, Any]:
    """Same publish/sync path for a synthetic float32 state of ``nbytes`` (INFO: fixed vs per-byte cost)."""
    per = max(1, nbytes // 4 // n_tensors)
    shapes = {f"w{i}": (per,) for i in range(n_tensors)}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    local = StateHolder(shapes, None)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    holders = [ray.remote(StateHolder).options(num_cpus=num_cpus).remote(shapes, store) for _ in range(2)]
    try:
        return _sync_loop(store, holders, state, local.load, warmup, reps)
    finally:
        kill(*holders, store)




def weight_sync(args: argparse.Namespace, results: dict[str, float]) -> None:
    log("== weight sync: publish_state + maybe_sync into 2 sampler actors vs in-process load_trainable_state")
    cfg = None
    for lora, name in ((0, "weight_sync_ratio_full"), (8, "weight_sync_ratio_lora")):
        cfg = load_config(args.config, ["regions.proposer=none", f"policy.lora_rank={lora}"])
        r = bench_weight_sync(cfg, 3, args.sync_reps)
        results[name] = r["ratio"]
        log(f"   {'LoRA r=8' if lora else 'full FT '}: {r['nbytes'] / 1e6:.3f} MB; 2 samplers "
            f"{r['remote_s'] * 1e3:.2f} ms (of which publish {r['publish_s'] * 1e3:.2f} ms) vs in-process "
            f"{r['local_s'] * 1e3:.3f} ms -> ratio {r['ratio']:.1f} (medians of {args.sync_reps})")
    for mb in [float(x) for x in args.sync_sizes_mb.split(",") if x]:
        r = bench_sync_size(int(mb * 1e6), 16, 2, 7, cfg.cluster.sampler_resources.num_cpus)
        log(f"   INFO synthetic {mb:g} MB float32 (16 tensors), same path: 2 samplers {r['remote_s'] * 1e3:.2f} ms "
            f"(publish {r['publish_s'] * 1e3:.2f} ms) vs in-process {r['local_s'] * 1e3:.2f} ms -> ratio {r['ratio']:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--sync-reps", type=int, default=30)
    ap.add_argument("--sync-sizes-mb", default="1,16,64", help="INFO sweep of synthetic state sizes ('' = off)")
    args = ap.parse_args(argv)
    results: dict[str, float] = {}
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=NAMESPACE, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        weight_sync(args, results)
    finally:
        ray.shutdown()
    for name, target in TARGETS.items():
        value = results[name]
        log(f"RESULT {name} {value:.3f} target={target:g} ok={'true' if value <= target else 'false'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
