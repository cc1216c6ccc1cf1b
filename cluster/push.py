"""New weights pushed by the driver to every live sampler, one call each, as soon as the learner has them.

``cluster.weight_transport: object_store`` (the default): the learner host puts each published version
into the object store once (numpy arrays: a sampler maps them from shared memory without a copy) and
returns the reference; the driver passes it to each sampler's ``receive`` as a top-level argument. No
round trip to the weight store is on the way; the store serves samplers that start or restart later,
and any sampler that falls two versions behind (a lost push) pulls from it.

``shm`` (same node, :mod:`actors.shm_weights`): the learner host copies each version into the idle one of
a standing pair of files in ``/dev/shm`` (one copy) and returns a descriptor of a few hundred bytes; the
driver passes it to each sampler's ``receive_shm``, which checks the file's header, copies the tensors into
its own parameters and checks the header again. Right after the pushes the driver starts the store's copy
(a zero-CPU task on the learner's node that waits for those receives, at most 0.5 s, then reads the file
into the object store) and publishes its reference to the weight store, so late joiners, samplers that
fall behind and samplers on another node (the descriptor's node id differs: they load nothing and pull at
their next batch) keep the object-store path, and the copy stays off the samplers' way. A file is
rewritten only once every reader sent it (the samplers and the copy task) has returned or died: the driver
hands the learner those calls with its next ``train`` (:meth:`WeightPusher.take_leases`); a learner whose
idle file is still being read waits 0.5 s, then sends that version through the object store (counted:
``weight_shm_fallbacks``, logged). A sampler that cannot read the file (missing, wrong size, bad header,
overwritten) counts a failure, keeps its weights and pulls from the store at its next batch.

``gloo`` | ``nccl`` (Ray Direct Transport): the learner host's
:meth:`~actors.learner_host.LearnerHost.weights` called with
``.options(tensor_transport=...)`` returns an RDT object: its tensors stay in the learner's process and
move straight to each sampler that receives the reference as a top-level argument (Ray does not let an
RDT reference be passed on inside another object, so the driver, its owner, hands it to every sampler
itself). The learner and the samplers form one collective group, rebuilt whenever its members change (a
sampler added, removed or restarted, the learner restarted). A failed push is counted and the sampler
keeps its weights; it falls back to pulling from the object store once it is two versions behind.

Two limits of Ray 2.60 found here: (1) a gloo or NCCL transfer that fails is not aborted: Ray's RDT
manager kills both ends (``ray.kill``, no restart) and destroys the group, so a sampler that dies
mid-transfer takes the learner with it and the run stops ("learner died"; resubmitting resumes from the
last checkpoint); (2) the ``torch_gloo`` backend cannot grow a group (the first
``init_process_group`` in an actor fixes its world size), so when a group cannot be rebuilt the pushes
go on through the object store for the rest of the run (logged, counted in ``fallbacks``). The object
store has neither coupling, which is why it stays the default.

Checked against Ray 2.60's documented limits: actors only (ours are), one group per backend and actor
(the driver keeps exactly one), RDT objects are references (the learner sends a copy of its weights),
no async actors and no ``max_concurrency > 1`` (learner and samplers are plain synchronous actors; the
scorers, which are async, take no part).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from actors.shm_layout import ShmDescriptor
from actors.shm_weights import publish_store_copy, remove_stale

log = logging.getLogger("srum.push")

BACKENDS = {"gloo": "torch_gloo", "nccl": "nccl"}


class WeightPusher:
    """The pushes of new versions (and, for RDT, one collective group of the learner and the live samplers)."""

    def __init__(self, transport: str, run: str = ""):
        if transport not in ("object_store", "shm", *BACKENDS):
            raise ValueError(f"weight transport {transport!r}: one of 'object_store', 'shm', "
                             f"{', '.join(map(repr, BACKENDS))}")
        self.transport, self.run = transport, run
        self.store: Any = None  # the weight store's handle (shm: the driver publishes the store's copy)
        self.leases: dict[int, list[Any]] = {}  # shm: {version: pushes of its file} not yet handed to the learner
        self.group: Any = None
        self.members: tuple[str, ...] = ()
        self.key: tuple[Any, ...] | None = None
        self.pushed_version = -1
        self.rebuilds = 0
        self.fallbacks = 0  # RDT groups that could not be built: pushes went on through the object store

    def invalidate(self) -> None:
        """The group is stale (a push failed, the learner restarted): rebuild it before the next push."""
        self.key = None

    def push(self, learner: Any, samplers: dict[str, Any], version: int, epoch: int,
             published: tuple[int, list[Any]] | None = None, shm: ShmDescriptor | None = None) -> dict[Any, str]:
        """Send ``version`` to ``samplers`` ({actor id: handle}, the live ones); ``published`` is the learner's
        last ``(version, [object ref])`` (object-store and shm transports), ``shm`` its file when that
        version went into one. Returns {call ref: actor id}, empty when there is nothing new to send or no
        sampler."""
        if version == self.pushed_version:
            return {}
        if self.transport == "shm" and shm is not None and shm.version == version:
            return self._push_shm(samplers, shm)  # even with no sampler: the store needs the version
        if not samplers:
            return {}
        if self.transport not in ("object_store", "shm"):
            key = (epoch, tuple(sorted(samplers)))
            if key != self.key:
                self._rebuild(learner, samplers, key)
        if self.transport in ("object_store", "shm"):  # shm: the learner's idle file was busy
            if published is None or published[0] != version:
                return {}
            ref = published[1][0]
        else:
            ref = learner.weights.options(tensor_transport=self.transport).remote()
        self.pushed_version = version
        return {handle.receive.remote(ref, version): actor_id for actor_id, handle in samplers.items()}

    def _push_shm(self, samplers: dict[str, Any], desc: ShmDescriptor) -> dict[Any, str]:
        """The descriptor to every sampler, then the store's copy of the file (a task that waits for their
        receives) published to the weight store."""
        refs = {h.receive_shm.remote(desc): aid for aid, h in samplers.items()}
        copy, _ = publish_store_copy(self.store, desc, list(refs))
        self.leases[desc.version] = [*refs, copy]
        self.pushed_version = desc.version
        return refs

    def take_leases(self) -> dict[int, list[Any]]:
        """The shm pushes sent since the last call, {version: [call ref]}, for the learner's next ``train``
        (it rewrites a file only once they are done)."""
        leases, self.leases = self.leases, {}
        return leases

    def _rebuild(self, learner: Any, samplers: dict[str, Any], key: tuple[Any, ...]) -> None:
        from ray.experimental.collective import create_collective_group, destroy_collective_group

        t0 = time.perf_counter()
        if self.group is not None:
            try:
                destroy_collective_group(self.group)
            except Exception as exc:  # noqa: BLE001 - a member may be gone; the new group replaces it
                log.info("destroying the old weight group: %s", exc)
        try:
            self.group = create_collective_group([learner, *samplers.values()], backend=BACKENDS[self.transport])
        except Exception as exc:  # noqa: BLE001 - e.g. a torch_gloo group cannot grow: the object store carries on
            self.group, self.transport = None, "object_store"
            self.fallbacks += 1
            log.error("cannot build the %s weight group over %s (%s): weights go through the object store from "
                      "now on", BACKENDS.get(self.transport, "RDT"), ", ".join(sorted(samplers)),
                      str(exc).splitlines()[-1][:200])
            return
        self.key, self.members = key, tuple(sorted(samplers))
        self.rebuilds += 1
        log.info("weight group over %s with the learner (%s) built in %.2f s", ", ".join(self.members),
                 self.transport, time.perf_counter() - t0)

    def close(self) -> None:
        if self.transport == "shm" and self.run:  # files of this run's learners that died without closing
            remove_stale(self.run)
        if self.group is not None:
            from ray.experimental.collective import destroy_collective_group

            try:
                destroy_collective_group(self.group)
            except Exception as exc:  # noqa: BLE001 - at shutdown the members may be gone already
                log.debug("destroying the weight group: %s", exc)
            self.group = None


def remote_class(cls: type, transport: str) -> Any:
    """``ray.remote(cls)``, with tensor transport enabled when weights are pushed (a receiving class with no
    RDT method must say so, or a transfer to it hangs until Ray's fetch timeout)."""
    return ray.remote(enable_tensor_transport=True)(cls) if transport in BACKENDS else ray.remote(cls)
