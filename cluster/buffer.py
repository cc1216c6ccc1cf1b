"""Replay buffer of scored samples: object references plus exact accounting.

:class:`ReplayBuffer` is a plain class; ``cluster/`` makes it a Ray actor
(``ray.remote(ReplayBuffer).options(num_cpus=0, ...)``). It stores :class:`~cluster.records.BufferEntry`
objects — metadata by value and an ``ObjectRef`` to the tensors — so tensors never pass through
the actor by value (refs nested in a list argument are not resolved by Ray).

Accounting. Every sample the scorers finish is *generated*: it is either added (``add``) or
reported as dropped before entering (``record_drop``, e.g. ``judge_failed``, ``zero_global``). At
any time::

    generated == trained + in_buffer + sum(dropped.values())

where ``dropped`` counts by reason: ``stale`` (older than ``max_staleness`` learner versions),
``evicted`` (FIFO overflow), ``duplicate`` (sample id seen before), the ``drop_reason`` of entries
added with ``meta.drop`` set, ``lost`` (trained entries whose object could not be fetched, moved
from ``trained`` by :meth:`ReplayBuffer.mark_lost`), ``released`` (:meth:`ReplayBuffer.release`)
and whatever reasons ``record_drop`` gets. :meth:`ReplayBuffer.check_invariant` raises
:class:`AccountingError` when the identity does not hold.

Sampling draws WITHOUT replacement (each sample is trained once, then leaves the buffer), uniformly
or with a recency bias: entry weights ∝ exp(recency_bias · rank / size), rank 0 = oldest insertion.
Weighted draws without replacement use Efraimidis–Spirakis keys log(u)/w, so a fixed ``seed`` and
the same sequence of calls give the same draws.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cluster.metrics import M_BUFFER_DROPS, M_BUFFER_SIZE, Metrics
from cluster.records import BufferEntry, SampleMeta

__all__ = [
    "AccountingError",
    "ReplayBuffer",
    "resolve_entries",
    "DROP_STALE",
    "DROP_EVICTED",
    "DROP_DUPLICATE",
    "DROP_LOST",
    "DROP_RELEASED",
    "DROP_FLAGGED",
    "DROP_JUDGE_FAILED",
    "DROP_ZERO_GLOBAL",
]

DROP_STALE = "stale"
DROP_EVICTED = "evicted"
DROP_DUPLICATE = "duplicate"
DROP_LOST = "lost"
DROP_RELEASED = "released"
DROP_FLAGGED = "flagged"  # meta.drop set without a drop_reason
DROP_JUDGE_FAILED = "judge_failed"
DROP_ZERO_GLOBAL = "zero_global"


class AccountingError(RuntimeError):
    """generated != trained + in_buffer + dropped."""


class ReplayBuffer:
    """Bounded FIFO buffer of :class:`BufferEntry` with staleness bound and recency-biased sampling.

    Args:
        capacity: maximum entries held; the oldest are evicted (counted ``evicted``) on overflow.
        max_staleness: an entry is stale when ``learner_version - meta.policy_version > max_staleness``.
        recency_bias: 0 = uniform; > 0 favours newer entries (weights ∝ exp(bias · rank / size)).
        seed: seed of the sampling generator.
        require_refs: reject entries whose ``ref`` is not a ``ray.ObjectRef`` (guards against
            tensors travelling through the actor by value). ``False`` for the in-process path.
        metrics: record ``srum_buffer_size`` and ``srum_buffer_drops{reason}`` (a no-op without Ray).
    """

    def __init__(
        self,
        capacity: int,
        max_staleness: int,
        recency_bias: float = 0.0,
        seed: int = 0,
        *,
        require_refs: bool = True,
        metrics: bool = True,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"ReplayBuffer max_staleness must be an int >= 0, got {max_staleness!r}")
        if not math.isfinite(recency_bias) or recency_bias < 0:
            raise ValueError(f"ReplayBuffer recency_bias must be finite and >= 0, got {recency_bias!r}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.recency_bias = float(recency_bias)
        self.seed = seed
        self.require_refs = require_refs
        self._rng = np.random.default_rng(seed)
        self._entries: OrderedDict[str, BufferEntry] = OrderedDict()  # oldest first
        self._generated = 0
        self._added = 0
        self._trained = 0
        self._dropped: Counter[str] = Counter()
        self._sample_calls = 0
        self._learner_version: int | None = None
        # Bounded memory of recent sample ids, to count duplicates (e.g. a retried scorer batch).
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_limit = max(16 * capacity, 4096)
        self._metrics = Metrics(enabled=metrics)

    # ------------------------------------------------------------------ writes
    def add(self, entries: Sequence[BufferEntry]) -> int:
        """Add scored samples; returns how many entered the buffer.

        Entries with ``meta.drop`` set are counted as dropped by their ``drop_reason``; entries
        already stale for the last learner version seen are counted ``stale``; repeated sample ids
        are counted ``duplicate``. Overflow evicts the oldest entries (``evicted``).
        """
        entries = list(entries)
        for e in entries:  # validate everything first: a bad call changes nothing
            self._validate(e)
        entered = 0
        for e in entries:
            self._generated += 1
            sid = e.meta.sample_id
            if sid in self._seen:
                self._drop(DROP_DUPLICATE, 1)
                continue
            self._remember(sid)
            if e.meta.drop:
                self._drop(e.meta.drop_reason or DROP_FLAGGED, 1)
                continue
            if self._is_stale(e.meta.policy_version, self._learner_version):
                self._drop(DROP_STALE, 1)
                continue
            self._entries[sid] = e
            self._added += 1
            entered += 1
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)  # the ref is released here
                self._drop(DROP_EVICTED, 1)
        self._size_changed()
        return entered

    def record_drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` samples that were generated but dropped before entering the buffer."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"record_drop reason must be a non-empty str, got {reason!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"record_drop n must be an int >= 0, got {n!r}")
        self._generated += n
        self._drop(reason, n)

    def mark_lost(self, n: int, reason: str = DROP_LOST) -> None:
        """Move ``n`` samples from *trained* to *dropped[reason]*: they were drawn but their
        objects could not be fetched (owner died, object lost); see :func:`resolve_entries`."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"mark_lost n must be an int >= 0, got {n!r}")
        if n > self._trained:
            raise ValueError(f"mark_lost n={n} exceeds the samples drawn so far ({self._trained})")
        self._trained -= n
        self._drop(reason, n)

    def evict_stale(self, learner_version: int) -> int:
        """Drop entries more than ``max_staleness`` versions behind ``learner_version``."""
        self._note_learner_version(learner_version)
        stale = [sid for sid, e in self._entries.items() if self._is_stale(e.meta.policy_version, learner_version)]
        for sid in stale:
            del self._entries[sid]
        self._drop(DROP_STALE, len(stale))
        if stale:
            self._size_changed()
        return len(stale)

    def sample(self, n: int, learner_version: int, *, min_n: int = 1) -> list[BufferEntry]:
        """Evict stale entries, then draw up to ``n`` entries without replacement.

        Returns ``[]`` when fewer than ``min_n`` entries remain (nothing is drawn then). Drawn
        entries leave the buffer and are counted as trained.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"sample n must be an int >= 0, got {n!r}")
        if not isinstance(min_n, int) or min_n < 0:
            raise ValueError(f"sample min_n must be an int >= 0, got {min_n!r}")
        self._sample_calls += 1
        self.evict_stale(learner_version)
        size = len(self._entries)
        k = min(n, size)
        if k == 0 or size < min_n:
            return []
        ids = list(self._entries.keys())
        picked = self._draw(size, k)
        out = [self._entries.pop(ids[i]) for i in picked]
        self._trained += len(out)
        self._size_changed()
        return out

    def release(self, reason: str = DROP_RELEASED) -> int:
        """Drop every entry (e.g. at shutdown) so Ray can free the objects; counted by ``reason``."""
        n = len(self._entries)
        self._entries.clear()
        self._drop(reason, n)
        self._size_changed()
        return n

    # ------------------------------------------------------------------ reads
    def size(self) -> int:
        """Entries currently held."""
        return len(self._entries)

    def peek(self, k: int = 8) -> list[SampleMeta]:
        """Metadata of the ``k`` newest entries (newest first), for status and the gallery."""
        metas = [e.meta for e in reversed(self._entries.values())]
        return metas[: max(k, 0)]

    def stats(self) -> dict[str, Any]:
        """Counters and summaries of what is held; see the module docstring for the identity."""
        metas = [e.meta for e in self._entries.values()]
        scores = [m.global_score for m in metas if m.global_score is not None]
        versions = [m.policy_version for m in metas]
        dropped = dict(sorted(self._dropped.items()))
        dropped_total = sum(dropped.values())
        return {
            "capacity": self.capacity,
            "in_buffer": len(metas),
            "generated": self._generated,
            "added": self._added,
            "trained": self._trained,
            "dropped": dropped,
            "dropped_total": dropped_total,
            "invariant_ok": self._generated == self._trained + len(metas) + dropped_total,
            "mean_global_score": _mean(scores),
            "mean_alpha": _mean([m.alpha for m in metas]),
            "mean_R": _mean([m.mean_R for m in metas]),
            "oldest_version": min(versions) if versions else None,
            "newest_version": max(versions) if versions else None,
            "learner_version": self._learner_version,
            "max_staleness": self.max_staleness,
            "recency_bias": self.recency_bias,
            "sample_calls": self._sample_calls,
        }

    def check_invariant(self) -> bool:
        """Return True, or raise :class:`AccountingError` naming every counter."""
        s = self.stats()
        if not s["invariant_ok"]:
            raise AccountingError(
                f"buffer accounting broken: generated={s['generated']} != trained={s['trained']} + "
                f"in_buffer={s['in_buffer']} + dropped={s['dropped_total']} {s['dropped']}"
            )
        return True

    # ------------------------------------------------------------------ internals
    def _drop(self, reason: str, n: int) -> None:
        if n:
            self._dropped[reason] += n
            self._metrics.inc(M_BUFFER_DROPS, n, reason=reason)

    def _size_changed(self) -> None:
        self._metrics.set(M_BUFFER_SIZE, len(self._entries))

    def _validate(self, e: BufferEntry) -> None:
        if not isinstance(e, BufferEntry):
            raise TypeError(f"ReplayBuffer.add expects BufferEntry items, got {type(e).__name__}")
        if self.require_refs:
            import ray

            if not isinstance(e.ref, ray.ObjectRef):
                raise TypeError(
                    f"BufferEntry {e.meta.sample_id!r} holds a {type(e.ref).__name__}, not a ray.ObjectRef: "
                    "put the tensors in the object store (cluster.records.make_entry) so they are not copied "
                    "through the buffer actor, or build the buffer with require_refs=False (in-process path)"
                )

    def _remember(self, sid: str) -> None:
        self._seen[sid] = None
        if len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)

    def _note_learner_version(self, v: int) -> None:
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"learner_version must be an int >= 0, got {v!r}")
        # A restarted learner may report a lower version: follow it (staleness is relative to now).
        self._learner_version = v

    def _is_stale(self, policy_version: int, learner_version: int | None) -> bool:
        return learner_version is not None and learner_version - policy_version > self.max_staleness

    def _draw(self, size: int, k: int) -> list[int]:
        """Indices (into oldest-first order) of ``k`` distinct entries, weighted by recency."""
        u = self._rng.random(size)
        if self.recency_bias == 0.0:
            keys = u
        else:
            rank = np.arange(size, dtype=np.float64)
            # Normalised so the newest weight is 1 (no overflow for large biases).
            w = np.exp(self.recency_bias * (rank - (size - 1)) / size)
            with np.errstate(divide="ignore"):
                keys = np.log(u) / w
        order = np.argsort(-keys, kind="stable")
        return [int(i) for i in order[:k]]


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else None


def resolve_entries(
    entries: Sequence[BufferEntry], timeout_s: float | None = None
) -> tuple[list[tuple[BufferEntry, Any]], list[tuple[BufferEntry, str]]]:
    """Fetch the objects behind ``entries`` (learner side).

    Returns ``(ok, lost)``: ``ok`` pairs each entry with its fetched value (normally a
    :class:`~cluster.records.TrainSample`); ``lost`` pairs entries whose object could not be fetched
    (owner died, object lost, timeout) with the error text. Entries that hold a value rather than a
    ref (in-process path) are returned as they are. Report ``len(lost)`` to the buffer with
    :meth:`ReplayBuffer.mark_lost` to keep the accounting exact.
    """
    import ray
    from ray.exceptions import GetTimeoutError, ObjectLostError, RayError

    ok: list[tuple[BufferEntry, Any]] = []
    lost: list[tuple[BufferEntry, str]] = []
    refs = [e.ref for e in entries if isinstance(e.ref, ray.ObjectRef)]
    values: dict[int, Any] = {}
    try:  # fast path: one call for the whole batch
        for i, v in enumerate(ray.get(refs, timeout=timeout_s) if refs else []):
            values[i] = v
    except (ObjectLostError, GetTimeoutError, RayError):
        values = {}
    j = 0
    for e in entries:
        if not isinstance(e.ref, ray.ObjectRef):
            ok.append((e, e.ref))
            continue
        if values:
            ok.append((e, values[j]))
        else:  # slow path: find the bad ones one by one
            try:
                ok.append((e, ray.get(e.ref, timeout=timeout_s)))
            except (ObjectLostError, GetTimeoutError, RayError) as exc:
                lost.append((e, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        j += 1
    return ok, lost
