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

When workers fail, plain torchrun prints a ``ChildFailedError`` traceback and a table after the
workers' own one-line errors; here the launcher prints one line instead (:func:`failure_summary`:
how many ranks failed, the first one's error as the worker left it, where the logs are) and exits
with that worker's status (2 for a user error, 128+N for signal N).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional, Sequence

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


def _left_error(failure: Any) -> bool:
    """The worker wrote its own error (``errors.report_to_launcher``); else torchrun made one up."""
    return failure.error_file != "<N/A>" and bool(failure.message)


def _failure_message(failure: Any) -> str:
    """A failed worker's error: the line it left in its error file, else its exit code or signal."""
    if _left_error(failure):
        message = failure.message if isinstance(failure.message, str) else str(failure.message.get("message", ""))
        return " ".join(message.split())
    if failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()} ({-failure.exitcode})"
    return f"exit code {failure.exitcode} (no error line recorded)"


def exit_status(exitcode: int) -> int:
    """A worker's exit code as a shell status: itself, or 128+N for death by signal N."""
    return exitcode if exitcode >= 0 else 128 - exitcode


def failure_summary(failures: dict[int, Any], nproc: Any, log_dir: Optional[str], nnodes: str = "1") -> tuple[str, int]:
    """One line for failed workers (``ChildFailedError.failures``: global rank -> ProcessFailure) and
    the status to exit with.

    The first error is the earliest a worker wrote itself (by its time, then rank; else the earliest
    failure). The status is the first exit code a worker chose (2: a user error), else 128+N for the
    signal: once one worker fails, torchrun SIGTERMs the rest, which can catch the first worker
    still exiting after its error line, so its own status may read 143."""
    ordered = sorted(failures.items(), key=lambda kv: (not _left_error(kv[1]), kv[1].timestamp, kv[0]))
    first_rank, first = ordered[0]
    chosen = [f.exitcode for _, f in ordered if f.exitcode > 0]
    status = chosen[0] if chosen else exit_status(first.exitcode)
    where = "" if str(nnodes) in ("1", "1:1") else " on this node"
    logs = log_dir if log_dir else "each rank's lines above"
    line = (f"opdlm launcher: {len(failures)} of {nproc} ranks{where} failed (exit {status}); first error "
            f"(rank {first_rank}): {_failure_message(first)}; logs: {logs}")
    return line, status


def _run(args: Any) -> None:
    """torchrun's run, with failed workers summarised in one line (exit with the first one's status)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        line, status = failure_summary(failed.failures, args.nproc_per_node, args.log_dir, args.nnodes)
        print(line, file=sys.stderr, flush=True)
        sys.exit(status)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import record

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    forwarded = {s.name for s in PREEMPTION_SIGNALS}
    args.signals_to_handle = ",".join(s for s in (n.strip() for n in args.signals_to_handle.split(","))
                                      if s and s not in forwarded)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _forward)
    record(_run)(args)


if __name__ == "__main__":
    main()
