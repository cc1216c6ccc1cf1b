"""Run control: desired actor counts (live scaling), the status snapshot and the stop flag.

:class:`Controller` is a plain class; the driver makes it the named actor ``srum_controller`` in
namespace ``srum`` (:func:`get_or_create_controller`). The CLI, a separate Ray driver connected to
the same cluster, finds it with :func:`find_controller`:

- ``srum scale --samplers N --scorers M`` → ``Controller.scale(samplers=N, scorers=M)``; the
  driver polls :meth:`Controller.get_desired` and adds or retires actors until the counts match
  (``generation`` increases on every change, so polling is a cheap comparison; ``stop`` carries
  the stop flag in the same call).
- ``srum status`` → :meth:`Controller.get_status`: the latest snapshot the driver published with
  :meth:`Controller.set_status` (throughput, buffer, versions, lag, judge health) plus a
  ``control`` section (desired counts, stop flag, snapshot age); ``{}`` before the first snapshot.
- ``srum stop`` → :meth:`Controller.request_stop`: the driver finishes (final checkpoint) at its
  next poll.

The driver calls :meth:`Controller.reset` at start, so a controller left from an earlier run in
the same namespace starts clean.

The controller is not detached by default: it dies with the driver's job, so "no controller" means
"no srum job is running".
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from core.config import MAX_ACTORS

log = logging.getLogger("srum.control")

__all__ = [
    "CONTROLLER_NAME",
    "NAMESPACE",
    "MAX_ACTORS",
    "Controller",
    "ControllerNotFound",
    "ScaleError",
    "release_controller",
    "validate_counts",
    "get_or_create_controller",
    "find_controller",
]

CONTROLLER_NAME = "srum_controller"
NAMESPACE = "srum"

SUBMIT_HINT = (
    "start one with `ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
    "python -m srum.main --config configs/default.yaml` (or `srum run`)"
)


class ScaleError(ValueError):
    """An invalid scale request (bad count, nothing to change, job stopping)."""


class ControllerNotFound(RuntimeError):
    """No Ray cluster, or no running srum job (no controller actor) on it."""


def _check_count(role: str, value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScaleError(f"{role} must be an integer, got {value!r}")
    if value < minimum:
        raise ScaleError(f"{role} must be >= {minimum} (the pipeline stalls without one), got {value}")
    if value > maximum:
        raise ScaleError(f"{role} must be <= {maximum}, got {value}")
    return value


def validate_counts(
    samplers: int | None = None, scorers: int | None = None, judges: int | None = None, *,
    max_count: int = MAX_ACTORS,
) -> dict[str, int]:
    """Validate a scale request; returns ``{role: count}`` for the roles given.

    Counts must be integers in ``[1, max_count]`` and at least one must be given.
    """
    out: dict[str, int] = {}
    for role, value in (("samplers", samplers), ("scorers", scorers), ("judges", judges)):
        if value is not None:
            out[role] = _check_count(role, value, 1, max_count)
    if not out:
        raise ScaleError("nothing to scale: give samplers, scorers and/or judges")
    return out


class Controller:
    """Desired counts, latest status snapshot and stop flag of one srum job. Plain class."""

    def __init__(self, samplers: int = 1, scorers: int = 1, *, max_count: int = MAX_ACTORS) -> None:
        self.max_count = max_count
        self.reset(samplers, scorers)

    def reset(self, samplers: int = 1, scorers: int = 1, run_name: str | None = None,
              judges: int | None = None) -> dict[str, Any]:
        """Start over for a new run: counts, status, stop flag and history; returns :meth:`get_desired`.
        ``judges``: the judge replicas the run launches (None: it launches none, and they cannot be scaled)."""
        counts = validate_counts(samplers, scorers, judges, max_count=self.max_count)
        self._desired = dict(counts)
        self._generation = 0
        self._run_name = run_name
        self._status: dict[str, Any] = {}
        self._status_at: float | None = None
        self._stop_reason: str | None = None
        self._started_at = time.time()
        self._history: list[dict[str, Any]] = []
        return self.get_desired()

    def ping(self) -> str:
        """Liveness check."""
        return "ok"

    # ------------------------------------------------------------------ scaling
    def scale(self, samplers: int | None = None, scorers: int | None = None,
              judges: int | None = None) -> dict[str, Any]:
        """Set the desired sampler, scorer and/or judge-replica counts; returns :meth:`get_desired`.

        Raises :class:`ScaleError` for counts that are not integers in ``[1, max_count]``, when
        none is given, for judges when the run launches none, or when the job is stopping.
        """
        counts = validate_counts(samplers, scorers, judges, max_count=self.max_count)
        if judges is not None and "judges" not in self._desired:
            raise ScaleError("this run does not launch its judge servers (judge.launch is unset): scale the "
                             "servers behind judge.endpoints yourself")
        if self._stop_reason is not None:
            raise ScaleError(f"the job is stopping ({self._stop_reason}); scale requests are refused")
        changed = {k: v for k, v in counts.items() if self._desired[k] != v}
        if changed:
            self._desired.update(changed)
            self._generation += 1
            self._history.append({"at": time.time(), "generation": self._generation, **self._desired})
        return self.get_desired()

    def get_desired(self) -> dict[str, Any]:
        """``{"samplers": n, "scorers": m, ["judges": j,] "generation": g, "stop": bool}``; ``g`` grows on every
        change."""
        return {**self._desired, "generation": self._generation, "stop": self._stop_reason is not None}

    def scale_history(self) -> list[dict[str, Any]]:
        """Every accepted change: time, generation, counts."""
        return copy.deepcopy(self._history)

    # ------------------------------------------------------------------ status
    def set_status(self, status: dict[str, Any]) -> None:
        """Replace the status snapshot (called by the driver; must be a dict of plain values)."""
        if not isinstance(status, dict):
            raise TypeError(f"status must be a dict, got {type(status).__name__}")
        self._status = copy.deepcopy(status)
        self._status_at = time.time()

    def get_status(self) -> dict[str, Any]:
        """The driver's latest snapshot with a ``control`` section added (``run``, ``desired``,
        ``stop_requested``, ``stop_reason``, ``updated_at``, ``age_s``, ``uptime_s``); ``{}`` before
        the driver's first :meth:`set_status`."""
        if self._status_at is None:
            return {}
        now = time.time()
        out = copy.deepcopy(self._status)
        out["control"] = {
            "run": self._run_name,
            "desired": self.get_desired(),
            "stop_requested": self._stop_reason is not None,
            "stop_reason": self._stop_reason,
            "updated_at": self._status_at,
            "age_s": now - self._status_at,
            "uptime_s": now - self._started_at,
        }
        return out

    # ------------------------------------------------------------------ stop
    def request_stop(self, reason: str = "requested") -> bool:
        """Ask the driver to stop; returns False when a stop was already requested."""
        if self._stop_reason is not None:
            return False
        self._stop_reason = reason or "requested"
        return True

    def stop_requested(self) -> bool:
        return self._stop_reason is not None


def get_or_create_controller(
    namespace: str = NAMESPACE,
    *,
    samplers: int = 1,
    scorers: int = 1,
    name: str = CONTROLLER_NAME,
    exclusive: bool = False,
    detached: bool = False,
) -> Any:
    """The job's controller actor handle, created when absent (Ray must be initialised).

    ``exclusive=True`` refuses to reuse an existing controller (another srum job is running in
    this namespace). The initial counts apply only when the actor is created here.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("get_or_create_controller needs Ray: call ray.init(...) first")
    if exclusive:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            pass
        else:
            raise RuntimeError(
                f"another srum job is running: actor {name!r} exists in namespace {namespace!r}; "
                "stop it (`ray job stop`) or use another namespace"
            )
    validate_counts(samplers, scorers)
    options: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": 0,
    }
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(Controller).options(**options).remote(samplers, scorers)


def release_controller(handle: Any, namespace: str = NAMESPACE, *, name: str = CONTROLLER_NAME,
                       timeout_s: float = 10.0) -> None:
    """End a run's controller and wait until its name is free, so that the next driver in this Ray session
    (a benchmark's or a test's next run) creates its own instead of borrowing one that dies with its owner."""
    import ray

    if handle is None:
        return
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    log.warning("controller %r still registered %.0f s after it was killed", name, timeout_s)


def find_controller(
    address: str | None = None,
    namespace: str = NAMESPACE,
    *,
    name: str = CONTROLLER_NAME,
    timeout_s: float = 10.0,
) -> Any:
    """Connect to the cluster at ``address`` (``None`` = ``"auto"``) and return the running job's
    controller handle, or raise :class:`ControllerNotFound` with what to do."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    if not ray.is_initialized():
        if address and address.startswith(("http://", "https://")):
            raise ControllerNotFound(
                f"{address} looks like the dashboard/job URL; srum scale/status connect as a Ray driver: "
                "give the cluster (GCS) address, e.g. 127.0.0.1:6379, or 'auto' on a cluster node"
            )
        try:
            ray.init(
                address=address or "auto",
                namespace=namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ControllerNotFound(
                f"no Ray cluster reachable at {address or 'auto'} ({type(exc).__name__}: {exc}); {SUBMIT_HINT}"
            ) from exc
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise ControllerNotFound(
            f"no srum job is running on this Ray cluster (no actor {name!r} in namespace {namespace!r}); "
            f"{SUBMIT_HINT}"
        ) from exc
    try:
        ray.get(handle.ping.remote(), timeout=timeout_s)
    except (RayActorError, GetTimeoutError) as exc:
        raise ControllerNotFound(
            f"the srum job's controller ({name!r}) is not responding ({type(exc).__name__}); the job may be "
            "ending or dead: check `ray job list`"
        ) from exc
    return handle
