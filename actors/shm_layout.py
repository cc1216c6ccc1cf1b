"""The byte layout of a shared-memory weight buffer (``cluster.weight_transport: shm``), and the pure rules
around it: where each tensor lies, the header that tells a reader whether the bytes are whole, and the
double-buffer rule of which buffer the learner may write next.

A buffer is one file: a :data:`HEADER_BYTES` header, then each tensor's bytes at an offset aligned to
:data:`ALIGN` bytes, in the order of the state dict. The header holds

    magic (8 bytes) | layout digest (uint64) | total bytes (int64) | start stamp (int64) | done stamp (int64)

The writer sets ``done = -1``, ``start = version``, copies the tensors, then sets ``done = version`` (x86
keeps stores in order, so a reader that sees ``done == version`` sees the bytes written before it). A
reader checks ``start == done == version`` and the layout digest before it copies and again after: a
buffer rewritten meanwhile (torn) or never finished fails the second check (:class:`TornBuffer`), one of
another layout or size the first (:class:`BadBuffer`).

No I/O and no Ray here: the files and mappings are in :mod:`actors.shm_weights`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ALIGN", "HEADER_BYTES", "MAGIC", "BadBuffer", "TornBuffer", "TensorEntry", "ShmDescriptor",
           "plan_layout", "layout_digest", "begin_write", "end_write", "read_header", "check_header",
           "tensor_views", "pack", "unpack", "DoubleBuffer"]

ALIGN = 64  # every tensor starts on a cache line (and so on any dtype's alignment)
HEADER_BYTES = 4096
MAGIC = b"SRUMSHM1"
_HEADER = [("digest", torch.int64, 8), ("nbytes", torch.int64, 16), ("start", torch.int64, 24),
           ("done", torch.int64, 32)]
WRITING = -1  # the done stamp while a write is under way

DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


class BadBuffer(Exception):
    """The buffer is not the one the descriptor describes (missing, wrong size, magic or layout)."""


class TornBuffer(BadBuffer):
    """The buffer does not hold the described version whole (being written, or rewritten during a read)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the buffer: its state-dict key, dtype name (``float32``), shape and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShmDescriptor:
    """What the driver pushes to a sampler instead of the weights (a few hundred bytes): the buffer's file,
    the version it holds, its layout and the Ray node it lives on."""

    path: str
    slot: int
    version: int
    entries: tuple[TensorEntry, ...]
    nbytes: int
    digest: int
    node_id: str = ""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_layout(state: Mapping[str, torch.Tensor]) -> tuple[tuple[TensorEntry, ...], int]:
    """The entries of ``state`` (in its order) and the file size they need, header included."""
    entries, offset = [], HEADER_BYTES
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"shm weights: {name} has dtype {t.dtype}, not one of {sorted(DTYPES)}")
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, dtype, tuple(t.shape), offset, nbytes))
        offset = _align(offset + nbytes)
    return tuple(entries), max(offset, HEADER_BYTES)


def layout_digest(entries: Iterable[TensorEntry], nbytes: int) -> int:
    """A 63-bit digest of the layout (names, dtypes, shapes, offsets, size): a reader with another fails."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((nbytes, [(e.name, e.dtype, e.shape, e.offset, e.nbytes) for e in entries])).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def _field(buf: torch.Tensor, name: str) -> torch.Tensor:
    for key, dtype, offset in _HEADER:
        if key == name:
            return buf[offset:offset + 8].view(dtype)
    raise KeyError(name)


def begin_write(buf: torch.Tensor, digest: int, version: int) -> None:
    """Mark ``buf`` (the whole file as uint8) as being written with ``version``: readers now fail."""
    _field(buf, "done").fill_(WRITING)
    buf[:8].copy_(torch.frombuffer(bytearray(MAGIC), dtype=torch.uint8))
    _field(buf, "digest").fill_(digest)
    _field(buf, "nbytes").fill_(buf.numel())
    _field(buf, "start").fill_(version)


def end_write(buf: torch.Tensor, version: int) -> None:
    """Mark the write of ``version`` complete (after every tensor's bytes)."""
    _field(buf, "done").fill_(version)


def read_header(buf: torch.Tensor) -> dict[str, Any]:
    """The header's fields: ``magic`` (bytes), ``digest``, ``nbytes``, ``start``, ``done``."""
    out: dict[str, Any] = {"magic": bytes(buf[:8].tolist())}
    out.update({key: int(_field(buf, key).item()) for key, _, _ in _HEADER})
    return out


def check_header(buf: torch.Tensor, desc: ShmDescriptor) -> None:
    """Raise :class:`BadBuffer` (other size, magic or layout) or :class:`TornBuffer` (``desc.version`` not
    complete in it) unless ``buf`` holds ``desc.version`` whole."""
    if buf.numel() != desc.nbytes:
        raise BadBuffer(f"{desc.path}: {buf.numel()} bytes, the descriptor says {desc.nbytes}")
    h = read_header(buf)
    if h["magic"] != MAGIC or h["nbytes"] != desc.nbytes or h["digest"] != desc.digest:
        raise BadBuffer(f"{desc.path}: header {h['magic']!r}/{h['nbytes']}/{h['digest']:x} is not the described "
                        f"layout ({desc.nbytes} bytes, digest {desc.digest:x})")
    if not h["start"] == h["done"] == desc.version:
        raise TornBuffer(f"{desc.path}: holds start={h['start']} done={h['done']}, not version {desc.version} "
                         "whole (overwritten or being written)")


def tensor_views(buf: torch.Tensor, entries: Iterable[TensorEntry]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` viewing ``buf``'s bytes (no copy)."""
    return {e.name: buf[e.offset:e.offset + e.nbytes].view(DTYPES[e.dtype]).view(e.shape) for e in entries}


@torch.no_grad()
def pack(buf: torch.Tensor, entries: tuple[TensorEntry, ...], state: Mapping[str, torch.Tensor], version: int,
         digest: int, views: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``state`` (any device) into ``buf`` at ``version``: header marked, one copy per tensor, stamped."""
    views = views if views is not None else tensor_views(buf, entries)
    begin_write(buf, digest, version)
    for e in entries:
        views[e.name].copy_(state[e.name].detach())
    end_write(buf, version)


def unpack(buf: torch.Tensor, desc: ShmDescriptor, copy_fn: Callable[[dict[str, torch.Tensor]], Any],
           views: Mapping[str, torch.Tensor] | None = None) -> Any:
    """Check the header, hand the views to ``copy_fn`` (which copies them out), check again; returns what
    ``copy_fn`` returned. A :class:`TornBuffer` after the copy means what it copied is not to be used."""
    check_header(buf, desc)
    out = copy_fn(dict(views) if views is not None else tensor_views(buf, desc.entries))
    check_header(buf, desc)
    return out


@dataclass
class DoubleBuffer:
    """Which of two buffers the writer may use next. The latest complete version stays readable in its slot;
    the other slot is written only once every reader of what it held is done (``is_done(ticket)`` true for
    each of its tickets: a reader's call returned, or failed because it died)."""

    versions: list[int] = field(default_factory=lambda: [-1, -1])
    tickets: list[list[Any]] = field(default_factory=lambda: [[], []])
    latest: int = -1  # the slot of the latest complete version (-1: none yet)

    def idle(self) -> int:
        """The slot not holding the latest version."""
        return 0 if self.latest != 0 else 1

    def slot_of(self, version: int) -> int | None:
        return next((s for s in (0, 1) if self.versions[s] == version), None)

    def lease(self, version: int, tickets: Iterable[Any]) -> bool:
        """Readers were sent ``version``: its slot is not rewritten until their tickets are done. False when
        no slot holds that version any more (nothing to protect)."""
        slot = self.slot_of(version)
        if slot is None:
            return False
        self.tickets[slot].extend(tickets)
        return True

    def pending(self, slot: int, is_done: Callable[[Any], bool]) -> list[Any]:
        """The tickets of ``slot`` not done yet (done ones are dropped)."""
        self.tickets[slot] = [t for t in self.tickets[slot] if not is_done(t)]
        return list(self.tickets[slot])

    def written(self, slot: int, version: int, tickets: Iterable[Any] = ()) -> None:
        """``slot`` now holds ``version`` whole (and ``tickets`` read it already, e.g. a copy to the store)."""
        self.versions[slot], self.tickets[slot], self.latest = version, list(tickets), slot
