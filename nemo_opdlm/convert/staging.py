"""Write a directory completely or not at all: stage it next to the target, then rename.

One job: the all-or-nothing directory protocol shared by the importer and the exporter, for one
process or for every rank of a job (rank 0 owns the staging directory, every rank writes into
it, rank 0 renames it into place after a barrier). A failure removes the staging directory, so a
target either does not exist, is the previous complete version, or is the new complete version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from nemo_opdlm.convert.errors import TargetExistsError
from nemo_opdlm.runtime.comm import barrier, broadcast_object, is_rank0


def check_target(target: str, overwrite: bool) -> None:
    """Refuse an existing target unless ``overwrite``; refuse a target that is a file."""
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise TargetExistsError(f"{target} exists and is not a directory; choose another output path")
        if not overwrite:
            raise TargetExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise TargetExistsError(f"the parent directory of {target} does not exist")


def _commit(staging: str, target: str) -> None:
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str, overwrite: bool) -> Iterator[str]:
    """Yield a staging directory on every rank; on success it becomes ``target``.

    Every rank must enter and leave together (the checks here are collective-free and identical
    on all ranks, so a refused target raises everywhere before anything is created).
    """
    target = os.path.abspath(target)
    check_target(target, overwrite)
    staging = ""
    if is_rank0():
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
    staging = broadcast_object(staging)
    try:
        yield staging
        barrier()
        if is_rank0():
            _commit(staging, target)
        barrier()
    except BaseException:
        if is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
        raise
