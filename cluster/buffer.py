"""Replay buffer of scored samples: records by value, tensors by object reference, exact accounting.

:class:`ReplayBuffer` is a plain class that lives in the driver (it only holds
:class:`~core.records.TrainSample` s, whose tensors are refs the driver owns), so adding and drawing
are local calls; the in-process loop uses it with tensors by value (``require_refs=False``).

Accounting. Every sample the scorers finish is *generated*: it is either added (:meth:`add`; a sample
whose record carries a drop reason is counted dropped by that reason) or reported as dropped before
it could be scored (:meth:`record_drop`, e.g. ``scorer_failed``). At any time::

    generated == trained + in_buffer + sum(dropped.values())

where ``dropped`` counts by :class:`~core.records.DropReason`: ``stale`` (older than ``max_staleness``
learner versions), ``evicted`` (FIFO overflow), ``duplicate`` (sample id seen before), the record's own
reason (``judge_failed``, ``global_score_zero``, ...), ``lost`` (drawn, but their tensors could not be
fetched or the learner call failed; :meth:`mark_lost`), ``rolled_back`` (trained in steps a restarted
learner undid), ``released`` (:meth:`release`) and whatever :meth:`record_drop` gets. :meth:`check_invariant` raises :class:`AccountingError` when the identity
does not hold.

Sampling draws WITHOUT replacement, uniformly or with a recency bias: entry weights ∝
exp(recency_bias · rank / size), rank 0 = oldest insertion; entries at the staleness bound (they would be
stale after the next learner version) are taken first, oldest first, so that work is trained, not dropped. Each sample is served ``max_uses`` times
(1 online: trained once; ``E`` in rounds mode: ``E`` epochs over the round's pool), never twice in one
draw and always from the entries served least so far (epoch by epoch); after its last use it leaves the
buffer and counts as *trained* (a sample counts once in the identity, however often it was served;
``served`` counts the uses).
Weighted draws without replacement use Efraimidis–Spirakis keys log(u)/w, so a fixed ``seed`` and
the same sequence of calls give the same draws.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from core.metrics import Metric, Metrics
from core.records import DropReason, SampleRecord, TrainSample

__all__ = ["AccountingError", "ReplayBuffer"]


class AccountingError(RuntimeError):
    """generated != trained + in_buffer + dropped."""


class ReplayBuffer:
    """Bounded FIFO buffer of :class:`TrainSample` with staleness bound and recency-biased sampling.

    Args:
        capacity: maximum entries held; the oldest are evicted (counted ``evicted``) on overflow.
        max_staleness: an entry is stale when ``learner_version - record.policy_version > max_staleness``.
        recency_bias: 0 = uniform; > 0 favours newer entries (weights ∝ exp(bias · rank / size)).
        seed: seed of the sampling generator.
        require_refs: reject trainable samples whose tensors are not a ``ray.ObjectRef`` (guards
            against tensors held by value in the driver). ``False`` for the in-process loop.
        metrics: record ``srum_buffer_size`` and ``srum_buffer_drops{reason}`` (a no-op without Ray).
        max_uses: times each sample is served before it leaves (epochs over a pool; 1 = once).
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
        max_uses: int = 1,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise ValueError(f"ReplayBuffer max_staleness must be an int >= 0, got {max_staleness!r}")
        if not math.isfinite(recency_bias) or recency_bias < 0:
            raise ValueError(f"ReplayBuffer recency_bias must be finite and >= 0, got {recency_bias!r}")
        if not isinstance(max_uses, int) or max_uses < 1:
            raise ValueError(f"ReplayBuffer max_uses must be an int >= 1, got {max_uses!r}")
        self.max_uses = max_uses
        self._uses: dict[str, int] = {}  # times each held entry was served (absent = 0)
        self._finished: OrderedDict[str, bool] = OrderedDict()  # recently trained ids (for mark_lost)
        self._served = 0
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.recency_bias = float(recency_bias)
        self.seed = seed
        self.require_refs = require_refs
        self._rng = np.random.default_rng(seed)
        self._entries: OrderedDict[str, TrainSample] = OrderedDict()  # oldest first
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
    def add(self, samples: Sequence[TrainSample]) -> int:
        """Add scored samples; returns how many entered the buffer.

        A sample whose record carries a drop reason is counted dropped by it; samples already stale for
        the last learner version seen are counted ``stale``; repeated sample ids ``duplicate``. Overflow
        evicts the oldest entries (``evicted``).
        """
        samples = list(samples)
        for e in samples:  # validate everything first: a bad call changes nothing
            self._validate(e)
        entered = 0
        for e in samples:
            self._generated += 1
            sid = e.sample_id
            if sid in self._seen:
                self._drop(DropReason.DUPLICATE, 1)
                continue
            self._remember(sid)
            if e.record.drop_reason is not None:
                self._drop(e.record.drop_reason, 1)
                continue
            if self._is_stale(e.policy_version, self._learner_version):
                self._drop(DropReason.STALE, 1)
                continue
            self._entries[sid] = e
            self._added += 1
            entered += 1
            while len(self._entries) > self.capacity:
                old, _ = self._entries.popitem(last=False)  # the ref is released here
                self._uses.pop(old, None)
                self._drop(DropReason.EVICTED, 1)
        self._size_changed()
        return entered

    def record_drop(self, reason: DropReason, n: int = 1) -> None:
        """Count ``n`` samples that were generated but dropped before they could be added."""
        if not isinstance(reason, DropReason):
            raise ValueError(f"record_drop reason must be a DropReason, got {reason!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"record_drop n must be an int >= 0, got {n!r}")
        self._generated += n
        self._drop(reason, n)

    def mark_lost(self, sample_ids: Iterable[str], reason: DropReason = DropReason.LOST) -> int:
        """Samples drawn whose training failed or was undone (tensors lost, a failed learner call, a rollback):
        each counts once as ``dropped[reason]``, moved from *trained* when it had left the buffer, or taken
        out of the buffer with the uses it had left (epochs). Ids it no longer knows are ignored. Returns
        how many were counted."""
        n = 0
        for sid in dict.fromkeys(sample_ids):
            if sid in self._entries:
                del self._entries[sid]
                self._uses.pop(sid, None)
                n += 1
            elif self._finished.pop(sid, False):
                self._trained -= 1
                n += 1
        self._drop(reason, n)
        if n:
            self._size_changed()
        return n

    def evict_stale(self, learner_version: int) -> int:
        """Drop entries more than ``max_staleness`` versions behind ``learner_version``."""
        self._note_learner_version(learner_version)
        stale = [sid for sid, e in self._entries.items() if self._is_stale(e.policy_version, learner_version)]
        for sid in stale:
            del self._entries[sid]
            self._uses.pop(sid, None)
        self._drop(DropReason.STALE, len(stale))
        if stale:
            self._size_changed()
        return len(stale)

    def sample(self, n: int, learner_version: int, *, min_n: int = 1) -> list[TrainSample]:
        """Evict stale entries, then draw up to ``n`` distinct entries, the least-served first.

        Returns ``[]`` when fewer than ``min_n`` entries remain (nothing is drawn then). An entry drawn for
        the ``max_uses``-th time leaves the buffer and is counted as trained.
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
        out: list[TrainSample] = []
        for level in sorted({self._uses.get(sid, 0) for sid in ids}):  # epoch by epoch
            at = [i for i, sid in enumerate(ids) if self._uses.get(sid, 0) == level]
            # last chance first: an entry at the staleness bound is stale after the next version, so it is
            # trained now rather than dropped (oldest first); the rest are drawn as configured
            last = [i for i in at if learner_version - self._entries[ids[i]].policy_version >= self.max_staleness]
            out += [self._entries[ids[i]] for i in last[: k - len(out)]]
            taken = set(last)
            rest = [i for i in at if i not in taken]
            out += [self._entries[ids[rest[j]]] for j in self._draw_among(rest, size, k - len(out))]
            if len(out) == k:
                break
        for e in out:
            uses = self._uses.get(e.sample_id, 0) + 1
            if uses >= self.max_uses:
                del self._entries[e.sample_id]
                self._uses.pop(e.sample_id, None)
                self._trained += 1
                self._finished[e.sample_id] = True
                if len(self._finished) > self._seen_limit:
                    self._finished.popitem(last=False)
            else:
                self._uses[e.sample_id] = uses
        self._served += len(out)
        self._size_changed()
        return out

    def release(self, reason: DropReason = DropReason.RELEASED) -> int:
        """Drop every entry (e.g. at shutdown) so Ray can free the objects; counted by ``reason``."""
        n = len(self._entries)
        self._entries.clear()
        self._uses.clear()
        self._drop(reason, n)
        self._size_changed()
        return n

    # ------------------------------------------------------------------ reads
    def size(self) -> int:
        """Entries currently held."""
        return len(self._entries)

    def uses_left(self) -> int:
        """Draws the held entries can still serve (``size()`` when each is served once)."""
        return self.max_uses * len(self._entries) - sum(self._uses.values())

    def peek(self, k: int = 8) -> list[SampleRecord]:
        """Records of the ``k`` newest entries (newest first), for status and the gallery."""
        records = [e.record for e in reversed(self._entries.values())]
        return records[: max(k, 0)]

    def stats(self) -> dict[str, Any]:
        """Counters and summaries of what is held; see the module docstring for the identity."""
        metas = [e.record for e in self._entries.values()]
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
            "served": self._served,
            "max_uses": self.max_uses,
        }

    def counters(self) -> dict[str, Any]:
        """The accounting as JSON data (stored with checkpoints, so a resumed run continues it)."""
        return {"generated": self._generated, "added": self._added, "trained": self._trained,
                "in_buffer": len(self._entries), "dropped": dict(self._dropped)}

    def restore(self, counters: dict[str, Any]) -> None:
        """Continue the accounting of :meth:`counters`; the entries then held are gone with the process
        that held them (counted ``released``). Only for an empty buffer."""
        if self._generated or self._entries:
            raise RuntimeError("restore() needs an empty buffer")
        self._generated, self._added = int(counters["generated"]), int(counters["added"])
        self._trained = int(counters["trained"])
        self._dropped = Counter({DropReason(k).value: int(v) for k, v in counters["dropped"].items()})
        self._drop(DropReason.RELEASED, int(counters["in_buffer"]))
        self.check_invariant()

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
    def _drop(self, reason: DropReason, n: int) -> None:
        if n:
            self._dropped[DropReason(reason).value] += n
            self._metrics.inc(Metric.BUFFER_DROPS, n, reason=reason)

    def _size_changed(self) -> None:
        self._metrics.set(Metric.BUFFER_SIZE, len(self._entries))

    def _validate(self, e: TrainSample) -> None:
        if not isinstance(e, TrainSample):
            raise TypeError(f"ReplayBuffer.add expects TrainSample items, got {type(e).__name__}")
        if self.require_refs and e.record.drop_reason is None:
            import ray

            if not isinstance(e.tensors, ray.ObjectRef):
                raise TypeError(
                    f"sample {e.sample_id!r} holds a {type(e.tensors).__name__}, not a ray.ObjectRef: the driver "
                    "keeps only references (the scorer returns the tensors as their own objects), or build the "
                    "buffer with require_refs=False (in-process loop)"
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

    def _draw_among(self, at: list[int], size: int, k: int) -> list[int]:
        """Positions in ``at`` (indices into the ``size`` entries, oldest first) of ``k`` distinct draws,
        weighted by recency (the rank is the entry's index among all ``size``)."""
        u = self._rng.random(len(at))
        if self.recency_bias == 0.0:
            keys = u
        else:
            rank = np.asarray(at, dtype=np.float64)
            # Normalised so the newest weight is 1 (no overflow for large biases).
            w = np.exp(self.recency_bias * (rank - (size - 1)) / size)
            with np.errstate(divide="ignore"):
                keys = np.log(u) / w
        order = np.argsort(-keys, kind="stable")
        return [int(i) for i in order[:k]]


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else None
