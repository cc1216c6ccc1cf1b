"""Rounds mode (``cluster.mode: rounds``): the paper's recipe as a loop. Each round

1. **generate**: the samplers make ``round_samples`` samples for the training prompts, all with the
   round's frozen policy version (a sampler behind it pulls before its batch), and the scorers judge them;
2. **train**: once the whole pool is judged, the learner trains ``round_epochs`` epochs over the kept
   samples (the buffer serves each one that many times, epoch by epoch, never twice in one batch);
3. **sync**: the learner publishes once, at the end of the pool, and the next round starts when every
   sampler has the new weights.

:class:`Rounds` is the phase bookkeeping the driver consults; the driver does the work (the same actors,
buffer and accounting as online mode). A resumed run starts its round again from generation: a pool in
the buffer of a dead driver is gone with it (counted ``released``).
"""

from __future__ import annotations

from typing import Any, Literal

Phase = Literal["generate", "train", "sync"]


class Rounds:
    def __init__(self, samples: int, epochs: int):
        if samples < 1 or epochs < 1:
            raise ValueError(f"a round needs samples >= 1 and epochs >= 1, got {samples} and {epochs}")
        self.samples, self.epochs = samples, epochs
        self.index = 0  # rounds started so far, minus one
        self.version = 0  # the policy version this round's pool is generated with
        self.phase: Phase = "generate"
        self.submitted = 0  # samples asked of the samplers this round
        self.pool = 0  # samples kept in the pool when training started
        self.start_step = 0  # the learner's step when this round's training started
        self.completed: list[dict[str, Any]] = []  # per finished round: index, version, pool, steps

    # ------------------------------------------------------------------ generate
    def samples_left(self) -> int:
        """Samples still to ask for this round (0 outside generation)."""
        return max(0, self.samples - self.submitted) if self.phase == "generate" else 0

    def submitted_batch(self, n: int) -> None:
        self.submitted += n

    # ------------------------------------------------------------------ the phases
    def advance(self, *, kept: int, generating: bool, training: bool, pushing: bool, version: int, step: int) -> bool:
        """Move on when the phase is done; True when a new phase began. ``kept``: samples in the buffer;
        ``generating`` / ``training`` / ``pushing``: sample or score jobs, a learner call, weight pushes in
        flight; ``version`` / ``step``: the learner's."""
        if self.phase == "generate" and self.samples_left() == 0 and not generating:
            self.phase, self.pool, self.start_step = "train", kept, step  # every sample of the round is judged
        elif self.phase == "train" and kept == 0 and not training:
            self.phase = "sync"  # the pool is used up and published: wait for the samplers to have it
        elif self.phase == "sync" and not pushing:  # the samplers have `version`: the next round generates with it
            self.completed.append({"round": self.index, "version": self.version, "pool": self.pool,
                                   "steps": step - self.start_step})
            self.index += 1
            self.version, self.phase, self.submitted, self.pool = version, "generate", 0, 0
        else:
            return False
        return True

    # ------------------------------------------------------------------ status and resume
    def status(self) -> dict[str, Any]:
        return {"round": self.index, "phase": self.phase, "version": self.version, "submitted": self.submitted,
                "target": self.samples, "pool": self.pool, "epochs": self.epochs}

    def state(self) -> dict[str, Any]:
        return {"index": self.index}

    def restore(self, state: dict[str, Any], version: int) -> None:
        """Continue at round ``state['index']`` from its generation, with the resumed weights."""
        self.index, self.version, self.phase, self.submitted, self.pool = int(state["index"]), version, "generate", 0, 0
