"""Pre-emption signals (SIGTERM, SIGUSR1): remembered by the trainer, kept from its helper processes.

One job: let a scheduler's stop request reach the training loop as a flag (it checkpoints at the end
of the step and exits), and keep the same signal from killing the processes a checkpoint save
depends on. Non-goals: when to save (``training/loop.py``), forwarding by a launcher
(``runtime/torchrun.py``).

Why the second part: a scheduler does not signal one process. Slurm signals every process of a job
step (the whole process tree), ``kill -- -PGID`` and torchrun's agent signal a process group. Both
reach the helpers that megatron-core's checkpoint writer starts inside the trainer's group: a
multiprocessing Manager (spawned at the first save and kept for the rest of the run: every later
save reports its write results through its queue) and one forked writer per file. The Manager runs
with the default disposition, so it dies, and the save in progress, or the next one, fails with
``BrokenPipeError`` / ``EOFError`` instead of checkpointing. :func:`held_from_children` blocks the
signals while those helpers are started, the way CPython's own ``resource_tracker`` is started: a
blocked signal mask survives ``fork`` and ``exec``, so the helpers never see the signal and finish
their writes, while this process only defers it (a blocked signal stays pending; it is not lost).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Any, Iterator, Sequence

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""What Slurm sends before a time limit (``--signal=USR1@...``) and on pre-emption / ``scancel``."""


class Preemption:
    """Remembers SIGTERM / SIGUSR1 (``seen``) so that the loop can checkpoint at the end of the step."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Preemption":
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.seen = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def held_from_children(signals: Sequence[signal.Signals] = PREEMPTION_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in the calling thread for the duration of the ``with``.

    Processes forked or spawned inside inherit the block and never receive them (a checkpoint
    writer's helpers outlive a signal sent to the whole group or tree). This process still gets
    them: another of its threads takes the signal, or it stays pending until the block is lifted,
    and the handler runs either way, so a pre-emption that arrives during a save stops the run.
    """
    # CPython starts its resource tracker (which a Manager or a Queue started inside needs) with
    # SIGINT/SIGTERM blocked and then UNBLOCKS them in the calling thread, lifting this block before
    # the helpers start: start it first (a no-op once it runs; it ignores SIGTERM itself)
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
