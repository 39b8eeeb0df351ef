"""Write a directory completely or not at all: stage it next to the target, then rename.

One job: the all-or-nothing directory protocol shared by the importer, the exporter and the
trainer's checkpoints, for one process or for every rank of a job (rank 0 owns the staging
directory, every rank writes into it, rank 0 renames it into place after a barrier). A failure
removes the staging directory, so a target either does not exist, is the previous complete
version, or is the new complete version.

What a killed writer leaves is found and cleared by the next writer of the same target: staging
and moved-aside directories are named ``.NAME.tmp-PID@HOST.XXXX`` / ``.NAME.old-PID@HOST.XXXX``,
and one whose process is gone (on this host; elsewhere: untouched for ``STALE_S``) is removed (a
previous version moved aside is put back if the target is missing). A write that fails because the
disk is full is re-raised as ``OSError(ENOSPC)`` naming the target, whatever the writer's own error
said (torch's zip writer says "unexpected pos 704 vs 598"). ``--overwrite`` replaces only a
directory that holds nothing but what the writer itself writes (:class:`OutputKind`), never a
directory with the user's other files in it.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from nemo_opdlm.checkpoint.errors import TargetExistsError
from nemo_opdlm.runtime.comm import barrier, broadcast_object, is_rank0

STALE_S = 3600.0
"""A leftover of a writer on another host counts as dead once untouched this long."""
FULL_BYTES = 16 * 1024**2
"""A write that failed with less free space than this on the target's disk failed for lack of it."""


@dataclass(frozen=True)
class OutputKind:
    """What a writer puts in its target directory: ``--overwrite`` replaces only such a directory."""

    name: str
    """What the directory is, for messages ('Hugging Face export')."""
    patterns: tuple[str, ...]
    """``fnmatch`` patterns of every entry the writer creates at the top of its target."""

    def owns(self, entry: str) -> bool:
        return any(fnmatch.fnmatchcase(entry, p) for p in self.patterns)


def check_target(target: str, overwrite: bool, kind: Optional[OutputKind] = None) -> None:
    """Refuse an existing target unless ``overwrite``; refuse a target that is a file; with ``kind``,
    refuse to overwrite a directory holding anything that writer does not write."""
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise TargetExistsError(f"{target} exists and is not a directory; choose another output path")
        if not overwrite:
            raise TargetExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
        foreign = sorted(n for n in os.listdir(target) if kind is not None and not kind.owns(n))
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            entries = "entry" if len(foreign) == 1 else "entries"
            raise TargetExistsError(
                f"{target} is not a previous {kind.name}: it holds {len(foreign)} {entries} one does not ({shown}), "
                "which --overwrite would delete; choose a new output directory or move them")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise TargetExistsError(f"the parent directory of {target} does not exist")


def process_alive(pid: int) -> bool:
    """A process ``pid`` exists on this host (possibly someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tag(target: str, what: str) -> str:
    """The name prefix of this process's staging ('tmp') or moved-aside ('old') directory."""
    return f".{os.path.basename(target)}.{what}-{os.getpid()}@{socket.gethostname()}."


def _leftover_owner_gone(path: str, owner: str) -> bool:
    pid, _, host = owner.partition("@")
    if host == socket.gethostname() and pid.isdigit():
        return not process_alive(int(pid))
    return time.time() - os.path.getmtime(path) > STALE_S  # another host's, or named before owners were


def clear_leftovers(target: str, note: Callable[[str], None] = print) -> None:
    """Clear what a killed writer of ``target`` left beside it (its staging directory; a previous
    version it had moved aside, put back when the target is missing). A live writer's are kept."""
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        for what in ("tmp", "old"):
            prefix = f".{name}.{what}-"
            path = os.path.join(parent, entry)
            if not entry.startswith(prefix) or not os.path.isdir(path):
                continue
            owner = entry[len(prefix):].rpartition(".")[0]
            if not _leftover_owner_gone(path, owner):
                continue
            if what == "old" and not os.path.lexists(target):
                os.rename(path, target)
                note(f"restored {target} from {path}, where a writer killed while replacing it had moved it")
            else:
                shutil.rmtree(path, ignore_errors=True)
                note(f"removed {path}, left by a writer of {target} that did not finish")


def current_umask() -> int:
    """This process's umask. Read from ``/proc/self/status`` (Linux >= 4.7), since ``os.umask`` can
    only read it by setting it (a moment in which another thread's files get the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_mode_plain(path: str) -> None:
    """Give a directory ``tempfile.mkdtemp`` created the mode a plain ``mkdir`` would have (0777 less
    the umask, typically 0755): mkdtemp makes it 0700, and once renamed into place a checkpoint or
    export other users of a shared cluster (or a group) could not read. The setgid bit a shared
    group directory passes on is kept."""
    setgid = os.stat(path).st_mode & stat.S_ISGID
    os.chmod(path, (0o777 & ~current_umask()) | setgid)


def _commit(staging: str, target: str) -> None:
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=_tag(target, "old"), dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, what caused it, and the per-rank failures a checkpoint exception wraps."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            wrapped = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback summary)
            if isinstance(wrapped, BaseException):
                todo.append(wrapped)


def _disk_full(err: BaseException, target: str, measure_at: str) -> Optional[OSError]:
    """``err`` as the ENOSPC it stands for when writing ``target``, if the disk is full (else None).

    Writers report a full disk in their own words (torch's zip writer: "unexpected pos 704 vs 598",
    wrapped in a CheckpointException by megatron's async writer), so the causes are searched for
    ENOSPC and, failing that, the free space at ``measure_at`` is measured (before the staging
    directory is removed and frees it)."""
    full_codes = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    free: Optional[int] = None
    if not any(isinstance(e, OSError) and e.errno in full_codes for e in _causes(err)):
        try:
            free = shutil.disk_usage(measure_at).free
        except OSError:
            return None
        if free >= FULL_BYTES:
            return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = (lines[-1] if lines else type(err).__name__)[:200]  # the innermost error's own words
    more = "" if free is None else f", {free} bytes free"
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}{more}; the writer said: {said}", target)


@contextlib.contextmanager
def staged_dir(target: str, overwrite: bool, kind: Optional[OutputKind] = None,
               note: Callable[[str], None] = print) -> Iterator[str]:
    """Yield a staging directory on every rank; on success it becomes ``target``.

    Every rank must enter and leave together (the checks here are collective-free and identical
    on all ranks, so a refused target raises everywhere before anything is created). Rank 0 first
    clears what a killed writer of the same target left (:func:`clear_leftovers`).
    """
    target = os.path.abspath(target)
    check_target(target, overwrite, kind)
    staging = ""
    if is_rank0():
        clear_leftovers(target, note)
        staging = tempfile.mkdtemp(prefix=_tag(target, "tmp"), dir=os.path.dirname(target))
        make_mode_plain(staging)  # the target gets this mode when the staging directory is renamed
    staging = broadcast_object(staging)
    try:
        yield staging
        barrier()
        if is_rank0():
            _commit(staging, target)
        barrier()
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        full = None
        if not isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            full = _disk_full(err, target, staging if os.path.isdir(staging) else os.path.dirname(target))
        if is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
        if full is not None:
            raise full from err
        raise
