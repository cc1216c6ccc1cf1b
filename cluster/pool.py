"""A scalable pool of same-kind actors: least-in-flight dispatch, scale up, and scale down by draining
(a removed actor takes no new work; once its in-flight calls have finished it is asked to stop, and it is
killed when ``stop()`` returned or after :data:`STOP_GRACE_S`, without blocking the driver's loop).

Failures (:meth:`ActorPool.finished` with the error): an actor Ray is restarting
(``ActorUnavailableError``) takes no work until a ``ping`` answers (probed every :data:`PROBE_EVERY_S`);
one whose restarts are exhausted (``ActorDiedError``) is removed from the pool, once; any other failure
(an error raised inside the call) backs the actor off for a while that doubles with each consecutive
failure (at most :data:`MAX_BACKOFF_S`). So a broken or dead actor never turns the loop into a spin of
failing calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

log = logging.getLogger("srum.pool")

STOP_GRACE_S = 30.0  # how long a retired actor's stop() may take before it is killed anyway
PROBE_EVERY_S = 1.0  # how often an actor that Ray is restarting is pinged
MAX_BACKOFF_S = 30.0  # the longest pause of an actor whose calls keep failing


@dataclass
class Member:
    actor_id: str
    handle: Any
    in_flight: int = 0
    draining: bool = False
    calls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    ready_at: float = 0.0  # takes no work before this (monotonic) time: backing off after failures
    restarting: bool = False  # Ray is restarting it: no work until a ping answers
    probe_ref: Any = None  # the pending ping of a restarting member
    stop_ref: Any = None  # the pending stop() of a retired member
    stop_deadline: float = 0.0


class ActorPool:
    """Owns the actors of one role. `factory(actor_id)` creates one remote actor (resources, restarts set by
    the caller); `scale_to(n)` grows or drains; `pick()` gives the active member with the fewest calls in
    flight, or None when every active member is at `max_in_flight_per_actor`."""

    def __init__(self, role: str, factory: Callable[[str], Any], max_in_flight_per_actor: int = 2):
        self.role = role
        self.factory = factory
        self.max_in_flight_per_actor = max_in_flight_per_actor
        self.members: dict[str, Member] = {}
        self._next_index = 0
        self.dead = 0  # members removed because Ray would not restart them
        self.epoch = 0  # +1 whenever the set of live processes changes (added, removed, restarted)

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members.values() if not m.draining]

    def size(self) -> int:
        return len(self.active)

    def scale_to(self, n: int) -> tuple[int, int]:
        """Grow to or drain down to n active actors. Returns (added, draining)."""
        if n < 0:
            raise ValueError(f"{self.role}: cannot scale to {n} actors")
        added = draining = 0
        while self.size() < n:
            actor_id = f"{self.role}-{self._next_index}"
            self._next_index += 1
            self.members[actor_id] = Member(actor_id, self.factory(actor_id))
            added += 1
            self.epoch += 1
        # drain the newest first: the oldest have warm caches and the longest history
        for member in sorted(self.active, key=lambda m: int(m.actor_id.rsplit("-", 1)[1]), reverse=True):
            if self.size() <= n:
                break
            member.draining = True
            draining += 1
        if added or draining:
            log.info("%s pool: +%d, draining %d, active %d", self.role, added, draining, self.size())
        self.reap()
        return added, draining

    def pick(self) -> Member | None:
        now = time.monotonic()
        candidates = [m for m in self.active if m.in_flight < self.max_in_flight_per_actor and not m.restarting
                      and m.ready_at <= now]
        return min(candidates, key=lambda m: (m.in_flight, m.calls), default=None)

    def started(self, member: Member) -> None:
        member.in_flight += 1
        member.calls += 1

    def finished(self, actor_id: str, error: BaseException | None = None) -> bool:
        """A call of ``actor_id`` ended (``error``: how it failed). Returns True when the actor is dead for
        good and was removed from the pool."""
        member = self.members.get(actor_id)
        if member is None:
            return False
        member.in_flight = max(0, member.in_flight - 1)
        if error is None:
            member.consecutive_failures = 0
        else:
            member.failures += 1
            member.consecutive_failures += 1
            if isinstance(error, ray.exceptions.ActorDiedError):
                return self._remove_dead(member, error)
            if isinstance(error, ray.exceptions.ActorUnavailableError):
                member.restarting = True
            else:
                member.ready_at = time.monotonic() + min(MAX_BACKOFF_S, 0.5 * 2 ** (member.consecutive_failures - 1))
        self.reap()
        return False

    def probe(self) -> list[str]:
        """Ping restarting members (never blocks): one that answers takes work again, one found dead is
        removed. Returns the ids removed."""
        dead = []
        for m in list(self.members.values()):
            if not m.restarting:
                continue
            if m.probe_ref is None:
                if m.ready_at <= time.monotonic():
                    m.probe_ref = m.handle.ping.remote()
                continue
            ready, _ = ray.wait([m.probe_ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(ready[0])
                m.restarting, m.consecutive_failures = False, 0
                self.epoch += 1
                log.info("%s is back after a restart", m.actor_id)
            except ray.exceptions.ActorDiedError as exc:
                self._remove_dead(m, exc)
                dead.append(m.actor_id)
            except ray.exceptions.RayError:  # still restarting
                m.ready_at = time.monotonic() + PROBE_EVERY_S
            m.probe_ref = None
        return dead

    def _remove_dead(self, member: Member, error: BaseException) -> bool:
        log.error("%s is dead and Ray will not restart it (cluster.max_restarts exhausted): removed from the %s "
                  "pool (%s)", member.actor_id, self.role, str(error).splitlines()[0] if str(error) else type(error))
        self.members.pop(member.actor_id, None)
        self.dead += 1
        self.epoch += 1
        return True

    def reap(self) -> list[str]:
        """Retire drained members whose in-flight work has finished (never blocks); returns the ids killed."""
        now = time.monotonic()
        done = []
        for m in self.members.values():
            if not m.draining or m.in_flight:
                continue
            if m.stop_ref is None:
                m.stop_ref, m.stop_deadline = m.handle.stop.remote(), now + STOP_GRACE_S
            ready, _ = ray.wait([m.stop_ref], timeout=0)
            if ready or now > m.stop_deadline:
                done.append(m)
        for m in done:
            ray.kill(m.handle, no_restart=True)  # a dead actor's failed stop() needs no answer
            del self.members[m.actor_id]
            self.epoch += 1
        return [m.actor_id for m in done]

    def shutdown(self, timeout_s: float = STOP_GRACE_S) -> None:
        """Stop every member (waits up to ``timeout_s`` for their stop() calls, then kills them)."""
        for member in self.members.values():
            member.draining = True
            member.in_flight = 0
        deadline = time.monotonic() + timeout_s
        while self.members and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for member in self.members.values():
            ray.kill(member.handle, no_restart=True)
        self.members.clear()
