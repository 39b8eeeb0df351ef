"""Workers die with their launcher: a worker whose torchrun agent is gone stops without writing.

One job: make a training worker notice that the process that launched it (torchrun's agent) has
died, and end at once, before it writes another checkpoint or metrics line. Non-goals: pre-emption
(``preemption.py``: a signal asking for a checkpoint), a rank that hangs (``collective_errors.py``).

Why: torchrun starts every worker in its own session, so a SIGKILL to the launcher's process group
(an OOM killer, ``kill -9 -- -PGID``, a wrapper script killed) leaves the workers running with no
launcher; they were seen training on and committing two more checkpoints, racing whatever restarts
the job into the same run directory. Two mechanisms:

- Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` at worker start: the kernel kills the worker the moment
  its parent dies, wherever it is (inside a collective, a save, C code). SIGKILL so that nothing can
  be written afterwards; a save cut short leaves only a staging directory, which the next writer
  clears (``checkpoint/staging.py``), and ``latest`` keeps naming the last complete checkpoint.
- :meth:`ParentWatch.check`, called by the training loop before each step and each save: compares
  ``os.getppid()`` with the parent recorded at start, for systems without ``prctl`` and for a
  parent that died before ``prctl`` took effect. It prints one line and ``os._exit``\\ s (no
  ``finally`` blocks, no atexit handlers: nothing is flushed or saved).

Only under torchrun (``TORCHELASTIC_RUN_ID`` set): a single-process ``opdlm train`` started with
``nohup`` from a shell must outlive that shell.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from dataclasses import dataclass
from typing import Optional

PR_SET_PDEATHSIG = 1
"""``<linux/prctl.h>``: deliver a signal to this process when its parent thread dies."""
ORPHAN_EXIT = 3
"""Exit status of a worker that stopped because its launcher died (distinct from 2, a user error)."""


def launched_by_torchrun(environ: Optional[dict[str, str]] = None) -> bool:
    """This process is a worker that torchrun's agent started (the agent sets TORCHELASTIC_RUN_ID)."""
    env = os.environ if environ is None else environ
    return bool(env.get("TORCHELASTIC_RUN_ID"))


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where it cannot
    (not Linux, no libc): the caller then relies on :meth:`ParentWatch.check`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class ParentWatch:
    """The parent pid recorded at start; :meth:`check` ends this process once the parent is gone."""

    parent: Optional[int]
    """The launcher's pid, or None when not watching (not under torchrun)."""
    what: str = "the launcher (torchrun's agent)"

    @classmethod
    def start(cls, environ: Optional[dict[str, str]] = None) -> "ParentWatch":
        """Watch the parent if this is a torchrun worker: arm the death signal, then check once
        (the parent may have died between this process's start and the ``prctl``)."""
        if not launched_by_torchrun(environ):
            return cls(parent=None)
        watch = cls(parent=os.getppid())
        set_parent_death_signal()
        watch.check()
        return watch

    def orphaned(self) -> bool:
        """The recorded parent is no longer this process's parent (it died; we were reparented)."""
        return self.parent is not None and os.getppid() != self.parent

    def check(self, where: str = "") -> None:
        """Exit now, writing nothing, if the launcher died (one line on stderr, status ORPHAN_EXIT)."""
        if not self.orphaned():
            return
        rank = os.environ.get("RANK", "?")
        at = f" {where}" if where else ""
        line = (f"[rank {rank}] opdlm train: stopped{at} without writing: {self.what} (pid {self.parent}) died, "
                "so this worker has no launcher; start the job again to resume from the run's latest checkpoint")
        try:
            os.write(2, (line + "\n").encode())
        except OSError:  # stderr went with the launcher
            pass
        os._exit(ORPHAN_EXIT)
