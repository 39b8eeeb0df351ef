"""``python -m nemo_opdlm.runtime.torchrun [torchrun args]``: torchrun that passes a pre-emption on.

One job: launch workers exactly as ``torchrun`` does, except that SIGTERM and SIGUSR1 are forwarded
to the workers as a request to stop, and the agent goes on monitoring them. Non-goals: what the
workers do with the signal (``runtime/preemption.py``, ``training/loop.py``).

Why not plain torchrun: its agent treats SIGTERM as its own death. It signals every worker's process
group, SIGKILLs them after ``--shutdown-timeout`` (30 s) whether or not their checkpoint is written,
and exits 1 with a ``SignalException`` traceback even when every worker saved and exited 0. It does
not handle SIGUSR1 at all, so a SIGUSR1 to the job's process tree (``scancel --signal=USR1``,
``sbatch --signal=USR1@...`` to all tasks) kills the agent (exit -10) while its workers, which got
the signal too, are still saving. Here the signal reaches each worker's process group (where torchrun
would have sent it), the workers checkpoint at the end of their step and exit 0, and the agent ends
as after any run: 0 when every worker succeeded. SIGINT, SIGHUP and SIGQUIT stay torchrun's.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional, Sequence

from nemo_opdlm.runtime.preemption import PREEMPTION_SIGNALS


def worker_groups(parent: Optional[int] = None) -> list[int]:
    """Process groups of ``parent``'s children that lead their own group (torchrun starts every
    worker with ``start_new_session``); read from ``/proc`` (Linux)."""
    parent = os.getpid() if parent is None else parent
    groups = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == parent and int(fields[2]) == int(name):
            groups.append(int(name))
    return groups


def _forward(signum: int, frame) -> None:
    """Pass the signal to every worker's group; with no worker yet, die of it as torchrun would."""
    groups = worker_groups()
    if not groups:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for pgid in groups:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:  # that worker just exited
            pass


def main(argv: Optional[Sequence[str]] = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import record

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    forwarded = {s.name for s in PREEMPTION_SIGNALS}
    args.signals_to_handle = ",".join(s for s in (n.strip() for n in args.signals_to_handle.split(","))
                                      if s and s not in forwarded)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _forward)
    record(torchrun.run)(args)


if __name__ == "__main__":
    main()
