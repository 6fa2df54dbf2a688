"""When a wait is a stall: the phases a rank reports, and the rules that tell busy from stuck.

Pure functions of the records the ranks send each other (Watchdog._record: step, phase,
seconds in it, the collective in flight and how long it has waited), so the decision is
tested without MPI. The thread, the messages and the protocol are in watchdog.py.
"""

from __future__ import annotations

import time

PHASES = {
    "setup": "setting up (data, model, first broadcast)",
    "batch": "assembling its batch",
    "step": "in the training step (forward, backward, gradient reduce, Adam)",
    "after step": "after the step (log, consistency check)",
    "evaluation": "evaluating",
    "checkpoint": "writing or waiting for a checkpoint",
    "plot": "drawing the loss plot",
    "done": "finishing",
}
# Phases that may legitimately keep a rank away from the collectives for long (data loading,
# evaluation, plotting, checkpoint I/O, the end of the run); a rank's first training step
# (compiling kernels, possibly with a cold cache) counts too. The others are waited for in
# them, up to LONG_PHASE_LIMIT, however short --stall-timeout is.
LONG_PHASES = ("setup", "batch", "evaluation", "checkpoint", "plot", "done")
LONG_PHASE_LIMIT = 600.0  # s, or 10 x --stall-timeout when that is longer
SHORT_PHASE_LIMIT = 30.0  # s, or --stall-timeout when longer: a training step slower than a tiny
# --stall-timeout is slow, not stalled



class Progress:
    """Where the main thread is. Written by the training loop, read by the watchdog thread.

    ``done`` is ``(step, sampler_state)`` of the last step this rank completed
    (None before the first): what a checkpoint written after a stall saves.
    """

    __slots__ = ("step", "phase", "since", "done")

    def __init__(self):
        self.step, self.phase, self.since, self.done = 0, "setup", time.perf_counter(), None

    def enter(self, phase: str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.phase, self.since = phase, time.perf_counter()

    def completed(self, step: int, sampler_state: dict) -> None:
        self.done = (step, sampler_state)
        self.step, self.phase, self.since = step, "after step", time.perf_counter()


def legitimately_away(rec: dict, timeout: float) -> bool:
    """A rank outside the collectives that answers, and has not spent longer in its phase
    than that phase may take (a long one, or a training step)."""
    first_step = rec["phase"] == "step" and rec.get("done") is None  # compiling
    if rec["phase"] in LONG_PHASES or first_step:
        return rec["in_phase"] < max(LONG_PHASE_LIMIT, 10 * timeout)
    return rec["in_phase"] < max(SHORT_PHASE_LIMIT, timeout)


def stalled(answers: dict, silent, timeout: float) -> bool:
    """After a rank waited ``timeout`` in a collective: is the job stalled, or only busy?

    ``answers``: rank -> record of every rank that answered a ping; ``silent``: the ranks
    that did not (None: another rank began the stall protocol meanwhile, so join it).
    Stalled: a rank does not answer, a rank outside the collectives has spent longer in
    its phase than the phase may take, or every rank has waited ``timeout`` in a
    collective (calls that do not match). Busy: the ranks away are loading data,
    compiling, evaluating, plotting, writing a checkpoint (up to max(600 s, 10 x timeout))
    or in a training step (up to max(30 s, timeout)).
    """
    if silent is None or silent:
        return True
    away = [rec for rec in answers.values() if rec.get("op") is None]
    if not away:
        return min(rec["waited"] for rec in answers.values()) >= timeout
    return not all(legitimately_away(rec, timeout) for rec in away)
