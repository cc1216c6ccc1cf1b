"""Same-node weight transport through a standing pair of shared-memory files (``cluster.weight_transport:
shm``): the files, the learner's writer, a sampler's reader, and the copy that keeps the weight store fed.

Files: ``/dev/shm/srum-w-<run>-<pid>-<token>-<slot>.bin``, two per learner process (``<pid>`` its process,
``<token>`` random), each sized for the published state (LoRA adapters only when training LoRA), laid out
as :mod:`actors.shm_layout` says. The learner host copies its trainable tensors straight into the idle
file (:meth:`ShmWriter.write`: one copy, a GPU's included) and returns a :class:`ShmDescriptor`; the
driver pushes that descriptor to each sampler (:mod:`cluster.push`), which checks the header, copies the
tensors into its own parameters and checks the header again (:func:`receive_shm`).

The weight store still gets every version, for samplers on other nodes, late joiners and samplers that
fall behind: the store gets the reference of :func:`submit_store_copy`, a zero-CPU task on the learner's
node that waits for the samplers' receives (at most :data:`ACK_WAIT_S`), then reads the file into the
object store; the driver submits it and publishes its reference right after the pushes (the learner
itself for the versions nobody pushes: its first and its last), so the copy is off the samplers' path. A file is rewritten only when the readers of what it held are done: the copy task and each
sampler sent its descriptor (their calls returned or failed: :class:`~actors.shm_layout.DoubleBuffer`);
otherwise the writer waits :data:`ACK_WAIT_S` and then the version goes through the object store
(counted in :attr:`ShmWriter.fallbacks`, logged).

Clean-up: :meth:`ShmWriter.close` (the learner host's ``stop``) and the writer's finaliser (a normal exit)
remove its files. After a SIGKILL (OOM killer, ``ray.kill``, a crashed node) they stay in ``/dev/shm``
until a new writer of the same run on that node starts (a restarted learner) or the driver closes on that
node (:func:`remove_stale`: files of the run whose process is gone), else until reboot or ``rm
/dev/shm/srum-w-*``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.shm_layout import (
    BadBuffer,
    DoubleBuffer,
    ShmDescriptor,
    layout_digest,
    pack,
    plan_layout,
    tensor_views,
    unpack,
)
from actors.weights import to_cpu_state

__all__ = ["SHM_DIR", "ACK_WAIT_S", "ShmWriter", "ShmReader", "ShmReceipt", "receive_shm", "remove_stale",
           "submit_store_copy", "publish_store_copy", "store_copy", "ray_is_done", "ray_wait_all"]

log = logging.getLogger("srum.shm")

SHM_DIR = "/dev/shm"
PREFIX = "srum-w-"
ACK_WAIT_S = 0.5  # how long a publish waits for the idle file's readers before using the object store
MAX_MAPPINGS = 4  # a reader keeps at most this many files mapped (two per learner process)


def _tag(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", run)[:40] or "run"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(run: str, directory: str = SHM_DIR) -> list[str]:
    """Remove the files of run ``run`` in ``directory`` whose writer process is gone; returns their paths."""
    removed = []
    pattern = re.compile(re.escape(PREFIX + _tag(run)) + r"-(\d+)-[0-9a-f]+-[01]\.bin$")
    for path in Path(directory).glob(f"{PREFIX}{_tag(run)}-*.bin"):
        m = pattern.match(path.name)
        if m and not _pid_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if removed:
        log.info("removed %d stale shared-memory weight file(s) of run %s", len(removed), run)
    return removed


def _unlink(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def ray_is_done(ticket: Any) -> bool:
    """A reader's ticket (a Ray reference) is done: its call returned or failed."""
    import ray

    return bool(ray.wait([ticket], timeout=0)[0])


def ray_wait_all(tickets: list[Any], timeout_s: float) -> None:
    import ray

    ray.wait(tickets, num_returns=len(tickets), timeout=timeout_s)


class ShmWriter:
    """The learner's pair of files. ``write`` copies a state into the idle one (or returns None: its readers
    are not done), ``lease`` protects a written version from its readers' tickets, ``close`` removes them."""

    def __init__(self, run: str, directory: str = SHM_DIR, node_id: str = "",
                 is_done: Callable[[Any], bool] = ray_is_done,
                 wait_all: Callable[[list[Any], float], None] | None = ray_wait_all, wait_s: float = ACK_WAIT_S):
        self.run, self.dir, self.node_id = run, directory, node_id
        self.is_done, self.wait_all, self.wait_s = is_done, wait_all, wait_s
        self.pid, self.token = os.getpid(), secrets.token_hex(4)
        self.paths: list[str] = []
        self.layout: tuple[Any, int, int] | None = None  # entries, nbytes, digest
        self.bufs: list[torch.Tensor] = []
        self.views: list[dict[str, torch.Tensor]] = []
        self.slots = DoubleBuffer()
        self.writes = self.fallbacks = self.generation = 0
        self._files: list[str] = []  # what the finaliser removes
        self._finalizer = weakref.finalize(self, _unlink, self._files)
        remove_stale(run, directory)

    def _ensure(self, state: Mapping[str, torch.Tensor]) -> None:
        entries, nbytes = plan_layout(state)
        if self.layout is not None and self.layout[0] == entries:
            return
        self._remove_files()  # first write, or a state of another layout: a new pair
        self.generation += 1
        token = self.token if self.generation == 1 else f"{self.token}{self.generation:x}"
        stem = f"{PREFIX}{_tag(self.run)}-{self.pid}-{token}"
        self.paths = [os.path.join(self.dir, f"{stem}-{slot}.bin") for slot in (0, 1)]
        self._files.extend(self.paths)
        self.bufs = [torch.from_numpy(np.memmap(p, dtype=np.uint8, mode="w+", shape=(nbytes,))) for p in self.paths]
        self.views = [tensor_views(b, entries) for b in self.bufs]
        self.layout = (entries, nbytes, layout_digest(entries, nbytes))
        self.slots = DoubleBuffer()

    def write(self, state: Mapping[str, torch.Tensor], version: int) -> ShmDescriptor | None:
        """Copy ``state`` into the idle file at ``version``; None (counted, logged) when its readers are not
        done within ``wait_s``: the caller then publishes this version through the object store."""
        self._ensure(state)
        slot = self.slots.idle()
        pending = self.slots.pending(slot, self.is_done)
        if pending and self.wait_all is not None:
            self.wait_all(pending, self.wait_s)
            pending = self.slots.pending(slot, self.is_done)
        if pending:
            self.fallbacks += 1
            log.warning("shm weights: %d reader(s) of %s still busy after %.1f s: version %d goes through the "
                        "object store (%d fallback(s) so far)", len(pending), self.paths[slot], self.wait_s,
                        version, self.fallbacks)
            return None
        entries, nbytes, digest = self.layout  # type: ignore[misc]
        pack(self.bufs[slot], entries, state, version, digest, self.views[slot])
        self.slots.written(slot, version)
        self.writes += 1
        return ShmDescriptor(self.paths[slot], slot, version, entries, nbytes, digest, self.node_id)

    def lease(self, version: int, tickets: list[Any]) -> bool:
        """``tickets`` read ``version``: its file is not rewritten until they are done."""
        return self.slots.lease(version, tickets)

    def _remove_files(self) -> None:
        self.bufs, self.views = [], []
        _unlink(self.paths)

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) for the readers still on the files, then remove them."""
        pending = [t for s in (0, 1) for t in self.slots.pending(s, self.is_done)]
        if pending and self.wait_all is not None:
            self.wait_all(pending, timeout_s)
        self._remove_files()
        self.layout = None


@dataclass
class _Mapping:
    ino: int
    digest: int
    buf: torch.Tensor
    views: dict[str, torch.Tensor]


class ShmReader:
    """A sampler's mappings of the learner's files (kept between versions: no page faults after the first)."""

    def __init__(self) -> None:
        self._maps: dict[str, _Mapping] = {}

    def _open(self, desc: ShmDescriptor) -> _Mapping:
        try:
            st = os.stat(desc.path)
        except FileNotFoundError:
            self._maps.pop(desc.path, None)
            raise BadBuffer(f"{desc.path}: missing") from None
        if st.st_size != desc.nbytes:
            raise BadBuffer(f"{desc.path}: {st.st_size} bytes, the descriptor says {desc.nbytes}")
        m = self._maps.get(desc.path)
        if m is None or m.ino != st.st_ino or m.digest != desc.digest:
            with warnings.catch_warnings():  # read-only mapping: the views are only read
                warnings.simplefilter("ignore", UserWarning)
                buf = torch.from_numpy(np.memmap(desc.path, dtype=np.uint8, mode="r", shape=(desc.nbytes,)))
            m = _Mapping(st.st_ino, desc.digest, buf, tensor_views(buf, desc.entries))
            self._maps[desc.path] = m
            while len(self._maps) > MAX_MAPPINGS:
                self._maps.pop(next(iter(self._maps)))
        return m

    def read(self, desc: ShmDescriptor, copy_fn: Callable[[dict[str, torch.Tensor]], Any]) -> Any:
        """Check, ``copy_fn(views)``, check again (:func:`actors.shm_layout.unpack`); raises ``BadBuffer``."""
        m = self._open(desc)
        return unpack(m.buf, desc, copy_fn, m.views)


def store_copy(desc: ShmDescriptor, readers: list[Any] | None = None) -> dict[str, Any]:
    """The state of ``desc`` as the object store keeps it (numpy arrays viewing the file, which Ray copies
    into the store as this task returns; the file is leased to this task until then). ``readers``: the
    samplers' receive calls, waited for first (at most :data:`ACK_WAIT_S`) so the copy does not compete
    with them."""
    if readers:
        ray_wait_all(readers, ACK_WAIT_S)
    return ShmReader().read(desc, to_cpu_state)


_remote_store_copy: Any = None


def submit_store_copy(desc: ShmDescriptor, readers: list[Any] | None = None) -> Any:
    """Start :func:`store_copy` as a zero-CPU task on the file's node; returns its reference."""
    global _remote_store_copy
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _remote_store_copy is None:  # made remote once: each ray.remote exports the function anew
        _remote_store_copy = ray.remote(num_cpus=0, max_retries=0)(store_copy)
    strategy = NodeAffinitySchedulingStrategy(desc.node_id, soft=False) if desc.node_id else "DEFAULT"
    return _remote_store_copy.options(scheduling_strategy=strategy).remote(desc, list(readers or []))


def publish_store_copy(store: Any, desc: ShmDescriptor, readers: list[Any] | None = None) -> tuple[Any, Any]:
    """Start the store's copy of ``desc``'s file (:func:`submit_store_copy`, after ``readers``) and publish its
    reference to the weight ``store``; returns ``(copy ref, the store's answer)``."""
    copy = submit_store_copy(desc, readers)
    meta = {"nbytes": sum(e.nbytes for e in desc.entries), "n_tensors": len(desc.entries), "transport": "shm"}
    return copy, store.publish.remote(desc.version, [copy], meta, allow_rollback=True)


@dataclass(frozen=True)
class ShmReceipt:
    """What :func:`receive_shm` did: ``version`` after it and ``via``: 'shm' (copied), 'kept' (had it, or
    the file could not be read: ``error``), 'remote' (the file is on another node) or 'torn' (overwritten
    while copied: the weights are mixed, ``error``)."""

    version: int
    via: str
    error: str | None = None


def receive_shm(reader: ShmReader, desc: ShmDescriptor, current_version: int, node_id: str,
                load_copy: Callable[[dict[str, Any], int], Any]) -> ShmReceipt:
    """A sampler's receive of a pushed descriptor: on the file's node, check it, ``load_copy(views,
    version)``, check again. Nothing is loaded on another node or from a file that cannot be read (missing,
    wrong size, bad header, not whole); a read torn after the copy began (never while the lease rule holds)
    leaves mixed weights. The caller pulls from the weight store in those cases."""
    if desc.version == current_version:
        return ShmReceipt(current_version, "kept")
    if desc.node_id and node_id and desc.node_id != node_id:
        return ShmReceipt(current_version, "remote")
    copied = []

    def copy(views: dict[str, torch.Tensor]) -> None:
        copied.append(True)
        load_copy(views, desc.version)

    try:
        reader.read(desc, copy)
        return ShmReceipt(desc.version, "shm")
    except BadBuffer as exc:
        error = f"{type(exc).__name__}: {exc}"
    if not copied:
        log.warning("shm weights: cannot read version %d, keeping version %d: %s", desc.version, current_version,
                    error)
        return ShmReceipt(current_version, "kept", error)
    log.error("shm weights: version %d was overwritten while it was read (mixed weights until the next pull): %s",
              desc.version, error)
    return ShmReceipt(current_version, "torn", error)
