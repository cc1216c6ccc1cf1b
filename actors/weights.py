"""Versioned weight publication (learner) and its copy to samplers through Ray's object store.

The learner host calls :func:`publish_state` every ``sync_every`` steps: the trainable state (LoRA
adapters only when training LoRA) is moved to CPU as numpy arrays and put into the object store ONCE;
the :class:`WeightStore` actor (made remote by the driver, :mod:`cluster.driver`) keeps only
``(version, [ref])``. The driver pushes the reference to every sampler (:mod:`cluster.push`); a
sampler that starts, restarts or missed pushes calls :func:`maybe_sync`: one round trip to the store
(``latest_if_changed``), then one fetch. Readers on the learner's node map the arrays from shared
memory; a CPU sampler shares them as its weights without a copy (``load_trainable_state(share=True)``).

Ownership: the object is owned by the process that ``ray.put`` it (the learner host). If that
process dies the ref in the store is dead: ``ray.get`` raises ``OwnerDiedError`` /
``ObjectLostError``. :func:`maybe_sync` catches that (and timeouts, and a dead store), keeps the
sampler on its current weights, counts a failed sync and logs it; the restarted learner publishes a
fresh version from its checkpoint (``publish(..., allow_rollback=True)`` when that version is not
newer than the store's). A sampler sharing an object's memory keeps it alive (Ray pins a buffer while
an array maps it) until it loads the next version.

Ray Direct Transport (gloo / NCCL) pushes are in :mod:`cluster.push`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "WeightStore",
    "SyncStats",
    "SyncResult",
    "publish_state",
    "maybe_sync",
    "state_nbytes",
    "BF16Array",
    "to_cpu_state",
    "STORE_ACTOR_NAME",
]

log = logging.getLogger(__name__)

STORE_ACTOR_NAME = "srum_weights"
_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.uint8,
                 torch.bool}  # dtypes numpy has (bfloat16 has none: it travels as BF16Array)

NO_VERSION = -1


class WeightStore:
    """Holds the latest published ``(version, [ref])`` and its metadata. Plain class.

    ``refs`` are wrapped in a list so Ray passes them to the actor by reference (a top-level
    ``ObjectRef`` argument would be resolved, copying the weights into the store's process).
    Only the latest version is kept: older refs are released so Ray can free them.
    """

    def __init__(self) -> None:
        self._version = NO_VERSION
        self._refs: list[Any] = []
        self._meta: dict[str, Any] = {}
        self._published_at: float | None = None
        self._publishes = 0
        self._rollbacks = 0

    def publish(
        self, version: int, refs: list[Any], meta: Mapping[str, Any] | None = None, *, allow_rollback: bool = False
    ) -> int:
        """Make ``refs`` the latest weights at ``version``; returns the version.

        Versions must increase; ``allow_rollback=True`` accepts a version not newer than the
        current one (a learner restarted from an older checkpoint). Samplers sync whenever their
        version differs from the store's, so they follow a rollback too.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        if not isinstance(refs, list) or not refs:
            raise TypeError(
                f"publish expects a non-empty list of ObjectRefs (wrapped so Ray does not resolve them), got {refs!r}"
            )
        if version <= self._version:
            if not allow_rollback:
                raise ValueError(
                    f"weight version {version} is not newer than the published version {self._version}; "
                    "a restarted learner should continue from store.version() + 1 or pass allow_rollback=True"
                )
            self._rollbacks += 1
        self._version = version
        self._refs = list(refs)
        self._meta = dict(meta or {})
        self._published_at = time.time()
        self._publishes += 1
        return version

    def latest_if_changed(self, version: int) -> tuple[int, list[Any] | None]:
        """One round trip for a sampler's check: ``(latest version, [ref])`` when it differs from
        ``version``, ``(latest version, None)`` when it does not (-1: nothing published yet)."""
        if self._version == NO_VERSION or self._version == version:
            return self._version, None
        return self._version, list(self._refs)

    def latest(self) -> tuple[int, list[Any]] | None:
        """``(version, [ref])`` of the latest publication, or None before the first."""
        if self._version == NO_VERSION:
            return None
        return self._version, list(self._refs)

    def version(self) -> int:
        """Latest published version, -1 before the first publication."""
        return self._version

    def info(self) -> dict[str, Any]:
        """Version, metadata (e.g. nbytes, step) and publication counters."""
        return {
            "version": self._version,
            "meta": dict(self._meta),
            "published_at": self._published_at,
            "publishes": self._publishes,
            "rollbacks": self._rollbacks,
        }


@dataclass
class SyncStats:
    """Per-sampler counters of :func:`maybe_sync` (``asdict`` for ``get_metrics``)."""

    checks: int = 0
    syncs: int = 0
    failed: int = 0
    last_version: int = NO_VERSION
    last_fetch_s: float = 0.0
    last_load_s: float = 0.0
    total_sync_s: float = 0.0
    last_error: str | None = None

    @property
    def last_sync_s(self) -> float:
        return self.last_fetch_s + self.last_load_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_sync_s"] = self.last_sync_s
        return d


class SyncResult(int):
    """What :func:`maybe_sync` returns: the sampler's version after the call (it IS that int), plus
    ``synced`` (new weights loaded), ``failed`` (fetch failed, weights kept), ``seconds`` (fetch +
    load), ``latest_version`` (the store's version, -1 when unknown; lag = latest_version - version)
    and ``error``."""

    synced: bool
    failed: bool
    seconds: float
    latest_version: int
    error: str | None

    def __new__(
        cls,
        version: int,
        *,
        synced: bool = False,
        failed: bool = False,
        seconds: float = 0.0,
        latest_version: int = NO_VERSION,
        error: str | None = None,
    ) -> SyncResult:
        obj = super().__new__(cls, version)
        obj.synced, obj.failed, obj.seconds = synced, failed, seconds
        obj.latest_version, obj.error = latest_version, error
        return obj

    @property
    def version(self) -> int:
        return int(self)

    @property
    def lag(self) -> int:
        """Versions behind the store (0 when current or unknown)."""
        return max(0, self.latest_version - int(self))

    def __repr__(self) -> str:
        return (
            f"SyncResult(version={int(self)}, synced={self.synced}, failed={self.failed}, "
            f"seconds={self.seconds:.4f}, latest_version={self.latest_version}, error={self.error!r})"
        )


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors / arrays in a (nested) state dict; other leaves count 0."""
    if isinstance(state, Mapping):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    if isinstance(state, BF16Array):
        return int(state.bits.nbytes)
    numel = getattr(state, "numel", None)
    elem = getattr(state, "element_size", None)
    if callable(numel) and callable(elem):  # torch.Tensor
        return int(numel() * elem())
    nbytes = getattr(state, "nbytes", None)
    if isinstance(nbytes, int):  # numpy
        return nbytes
    return 0


@dataclass(frozen=True)
class BF16Array:
    """A bfloat16 tensor on the wire: its bits as an int16 numpy array (numpy has no bfloat16), so it too
    travels out of band and is mapped from shared memory without a copy."""

    bits: np.ndarray


def to_cpu_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state as it travels through the object store: CPU numpy arrays (Ray stores them out of band and
    readers map them from shared memory without a copy; bfloat16 as :class:`BF16Array`); other values as
    they are. CUDA tensors are moved to the CPU (a CPU-only sampler could not unpickle them)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if hasattr(v, "detach"):
            v = v.detach()
            if v.device.type != "cpu":
                v = v.to("cpu")
            v = v.contiguous()
            if v.dtype == torch.bfloat16:
                out[k] = BF16Array(v.view(torch.int16).numpy())
            else:
                out[k] = v.numpy() if v.dtype in _NUMPY_DTYPES else v
        else:
            out[k] = v
    return out


def as_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """Numpy arrays (and :class:`BF16Array`) of a fetched state as torch tensors sharing their memory:
    read-only views of the object store; load them with ``copy_`` or share them with a module that never
    writes its weights (``load_trainable_state(..., share=True)``)."""
    with warnings.catch_warnings():  # from_numpy warns on read-only arrays; the view is only read
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v.bits).view(torch.bfloat16) if isinstance(v, BF16Array)
                else torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


def _call(obj: Any, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
    """Call ``method`` on a plain object or an actor handle (then wait for the result)."""
    fn = getattr(obj, method)
    remote = getattr(fn, "remote", None)
    if remote is None:
        return fn(*args, **kwargs)
    import ray

    return ray.get(remote(*args, **kwargs), timeout=timeout_s)


class Published(NamedTuple):
    """What :func:`publish_state` did: its seconds, the payload (an ``ObjectRef`` under Ray) and, when it
    did not wait, the store's pending answer."""

    seconds: float
    payload: Any
    ack: Any = None


def publish_state(
    store: Any,
    version: int,
    state: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    *,
    allow_rollback: bool = False,
    use_ray: bool | None = None,
    wait: bool = True,
) -> Published:
    """Put ``state`` into the object store once and publish it at ``version``; returns the seconds
    taken (CPU copy + put + publish call) and the payload (the ref the driver can push to samplers).

    ``store`` is a :class:`WeightStore` or its actor handle. ``use_ray=None`` uses the object
    store when Ray is initialised; otherwise the state dict itself is published (in-process path).
    The publication's meta gets ``nbytes``, ``n_tensors``, ``put_s`` (see :meth:`WeightStore.info`).
    ``wait=False`` (an actor handle) does not wait for the store's answer: the caller gets the payload a
    round trip sooner and checks :attr:`Published.ack` later (the learner host does, at its next publish).
    """
    import ray

    if use_ray is None:
        use_ray = ray.is_initialized()
    t0 = time.perf_counter()
    cpu_state = to_cpu_state(state)
    nbytes = state_nbytes(cpu_state)
    payload = ray.put(cpu_state) if use_ray else cpu_state
    t1 = time.perf_counter()
    full_meta = {"nbytes": nbytes, "n_tensors": len(cpu_state), "put_s": t1 - t0, **dict(meta or {})}
    remote = getattr(store.publish, "remote", None)
    if remote is not None and not wait:
        ack = remote(version, [payload], full_meta, allow_rollback=allow_rollback)
        return Published(time.perf_counter() - t0, payload, ack)
    _call(store, "publish", version, [payload], full_meta, allow_rollback=allow_rollback)
    return Published(time.perf_counter() - t0, payload)


def maybe_sync(
    store: Any,
    current_version: int,
    load_fn: Callable[[dict[str, Any], int], Any],
    stats: SyncStats | None = None,
    *,
    timeout_s: float | None = 120.0,
    min_lag: int = 1,
) -> SyncResult:
    """Load the latest published weights when ``current_version`` differs from the store's.

    One round trip to the store (:meth:`WeightStore.latest_if_changed`), then one zero-copy fetch when
    behind by at least ``min_lag`` versions (a rollback, i.e. a lower version, always syncs).
    Returns the new version as a :class:`SyncResult` (an ``int`` with details). ``load_fn(state,
    version)`` installs the weights (``Policy.load_trainable_state``). Nothing is fetched when the
    sampler is current or nothing is published yet. When the object cannot be fetched (owner
    died, lost, timeout) or the store is unreachable, the sampler keeps its weights: the failure is
    logged, counted in ``stats.failed`` and ``current_version`` is returned with ``failed=True``.
    Errors raised by ``load_fn`` (e.g. a shape mismatch) are bugs and propagate.
    """
    import ray
    from ray.exceptions import RayError  # OwnerDiedError, ObjectLostError, GetTimeoutError, RayActorError

    stats = stats if stats is not None else SyncStats()
    stats.checks += 1
    published = NO_VERSION
    try:
        t0 = time.perf_counter()
        published, refs = _call(store, "latest_if_changed", current_version, timeout_s=timeout_s)
        if refs is None or (published > current_version and published - current_version < min_lag):
            return SyncResult(current_version, latest_version=published)
        (payload,) = refs
        state = ray.get(payload, timeout=timeout_s) if isinstance(payload, ray.ObjectRef) else payload
        state, version = as_tensors(state), published
        t1 = time.perf_counter()
    except RayError as exc:
        stats.failed += 1
        stats.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("weight sync from version %s failed, keeping current weights: %s", current_version, stats.last_error)
        return SyncResult(current_version, failed=True, latest_version=published, error=stats.last_error)
    load_fn(state, version)
    t2 = time.perf_counter()
    stats.syncs += 1
    stats.last_version = version
    stats.last_fetch_s = t1 - t0
    stats.last_load_s = t2 - t1
    stats.total_sync_s += t2 - t0
    stats.last_error = None
    return SyncResult(version, synced=True, seconds=t2 - t0, latest_version=version)
