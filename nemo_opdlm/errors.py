"""The package's exceptions: one hierarchy, at the bottom of the import graph (imports nothing).

One job: name the kinds of problem a user can fix, so that the command line can print any of them as
one line (``cli.py`` catches :class:`OPDLMError`) and callers and tests can tell them apart. Every
message names the field or file at fault and the remedy. Anything else that escapes is a bug and
keeps its traceback.

- :class:`ConfigError`: a config value (a recipe, a YAML file, a ``key=value`` override, an argument).
- :class:`DataError`: a dataset (file, record, field).
- :class:`CheckpointError`: a checkpoint or weights file that is missing, damaged or of another model.
- :class:`ConvertError`: a Hugging Face <-> megatron-core conversion that cannot proceed
  (``convert/errors.py`` and ``checkpoint/errors.py`` refine it).
- :class:`CollectiveError`: a collective across ranks timed out or lost a rank (``runtime/collective_errors.py``).
- :class:`NonFiniteLossError`: training diverged (too many non-finite steps in a row);
  :class:`NonFiniteStateError`: the student's weights or optimizer state are not finite (nothing saved).

Each also derives from the builtin a caller would have caught before (``ValueError`` for bad values,
``RuntimeError`` for runs), so existing ``except ValueError`` code keeps working.

:func:`describe_os_error` turns an ``OSError`` (an unwritable directory, a full disk, a read-only
filesystem) into the same kind of one-line message; :func:`guarded` runs a command and prints any of
them as that line (:func:`error_line`), exit status 2, for ``opdlm`` and the tools alike.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class OPDLMError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(OPDLMError, ValueError):
    """An invalid or inconsistent config value; the message names the key."""


class DataError(OPDLMError, ValueError):
    """A dataset cannot be used as configured; the message names the file / field and the fix."""


class CheckpointError(OPDLMError, RuntimeError):
    """A checkpoint (or a weights file) is missing, incomplete, damaged or of another model."""


class ConvertError(OPDLMError, ValueError):
    """A conversion cannot proceed; nothing has been written to the target."""


class CollectiveError(OPDLMError, RuntimeError):
    """A collective across ranks timed out (a rank stopped or hung) or a rank left mid-collective;
    the message names the collective's place, the rank(s) to look at and the remedy."""


class NonFiniteLossError(OPDLMError, RuntimeError):
    """Too many consecutive steps had a non-finite loss, teacher target or gradient norm."""


class NonFiniteStateError(NonFiniteLossError):
    """The student's weights or optimizer state are not finite; no checkpoint of them was written."""


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: what happened to which path, and what to do."""
    path = err.filename if err.filename is not None else "?"
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"disk full: no space left to write {path} ({reason}): free space on that disk or write elsewhere"
    if err.errno == errno.EROFS:
        return f"{path} is on a read-only filesystem: write somewhere else"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for {path}: write somewhere you may, or change its permissions"
    if err.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a directory"
    if err.errno == errno.EISDIR:
        return f"{path} is a directory, not a file"
    if err.errno == errno.ENOENT:
        return f"{path} does not exist"
    if err.errno == errno.EEXIST:
        return f"{path} exists and is not a directory" if os.path.isfile(path) else f"{path} already exists"
    return f"{reason}: {path}"


DEBUG_ENV = "OPDLM_DEBUG"
"""Set (to anything but 0) to see the traceback of a user error, as ``opdlm --debug`` does."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(prog: str, err: BaseException) -> str:
    """The one line a user sees for ``err``: the program, the kind and the message (newlines folded)."""
    if isinstance(err, ConfigError):
        kind, text = "config error", str(err)
    elif isinstance(err, OSError) and not isinstance(err, OPDLMError):
        kind, text = f"error ({type(err).__name__})", describe_os_error(err) + f" ({DEBUG_ENV}=1 for the traceback)"
    else:
        kind, text = f"error ({type(err).__name__})", str(err)
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return f"{rank}{prog}: {kind}: " + " ".join(text.split("\n"))


LAUNCHER_ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
"""Where torchrun's agent asks a worker to leave its error (read back as the failure's message)."""


def report_to_launcher(line: str) -> None:
    """Leave ``line`` where torchrun's agent reads a failed worker's error (its ``error_file``), so the
    launcher's one-line summary (``runtime/torchrun.py``) can quote it. A no-op outside torchrun."""
    path = os.environ.get(LAUNCHER_ERROR_FILE_ENV)
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:  # a full disk may be why we are here: the summary then says "exit code N"
        pass


def guarded(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """``fn()``, with a user error (OPDLMError, OSError) printed as one line and exit status 2.

    With ``debug`` (or ``OPDLM_DEBUG`` set) the error is raised instead, traceback and all.
    """
    try:
        return fn()
    except (OPDLMError, OSError) as err:
        if debug or debugging():
            raise
        line = error_line(prog, err)
        print(line, file=sys.stderr, flush=True)
        report_to_launcher(line)
        return 2
