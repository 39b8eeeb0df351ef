"""The run directory (``train.save_dir``): one writer at a time, and what a starting run finds there.

One job: before a run writes anything under ``save_dir``, take the directory's lock (refusing a
second writer, taking over a lock its dead owner left), clear what a killed save left behind, and
decide where the run starts. Non-goals: writing checkpoints (``format.py``, ``training/checkpoint.py``).

The lock is ``save_dir/.opdlm.lock``: JSON naming its holder (host, pid, Slurm job, start time),
created exclusively and touched every ``HEARTBEAT_S`` seconds by a daemon thread of rank 0. A
lock counts as left by a dead run when its holder is a process of this host that no longer exists,
when it carries this Slurm job's id (a requeued job is never running twice), or when nobody has
touched it for ``STALE_S`` seconds; anything else is a live writer, and the run is refused. Only
rank 0 touches the file; every rank gets the verdict.

Where a run starts: the checkpoint ``latest`` names; without that pointer (deleted, or never
written by a killed first save) the newest complete ``step_N`` directory, said so. A run that would
start from step 0 in a directory that already holds checkpoints (``train.resume=false``) is
refused unless ``train.overwrite=true``, which removes them (and ``metrics.jsonl``, ``config.yaml`` and
the W&B run id) first. A resumed
run's ``metrics.jsonl`` is cut back to the resumed step (a run from step 0's to nothing), so steps a
killed run logged after its last checkpoint are not listed twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from nemo_opdlm.checkpoint.staging import process_alive
from nemo_opdlm.errors import CheckpointError, describe_os_error
from nemo_opdlm.runtime.comm import broadcast_object, is_rank0

LOCK = ".opdlm.lock"
HEARTBEAT_S = 30.0
"""How often the holder touches its lock."""
STALE_S = 300.0
"""A lock nobody touched for this long is a dead run's."""
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
"""The config of the run that last started here (each ``step_N/`` has the one that wrote it: ``run_config.py``)."""
WANDB_ID = "wandb_run_id"
"""The W&B run id a resumed run continues (``metrics.start_wandb``); a replaced run gets a new one."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def stale_reason(holder: dict, age_s: float) -> Optional[str]:
    """Why a lock held by ``holder`` and last touched ``age_s`` ago is a dead run's (None: it is live)."""
    me = _holder()
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not process_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it is this Slurm job's ({me['slurm_job_id']}) earlier run, before a requeue"
    if age_s > STALE_S:
        return f"nobody touched it for {age_s:.0f} s (> {STALE_S:.0f} s)"
    return None


@dataclass
class RunLock:
    """A held lock: touched by a daemon thread until :meth:`release`."""

    path: str
    _stop: threading.Event
    _thread: threading.Thread
    created: bool = False
    """The run created ``save_dir``: a run that fails before writing anything leaves no empty directory."""

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with open(self.path) as f:
                if json.load(f).get("pid") != os.getpid():
                    return  # taken over meanwhile: not ours to remove
            os.remove(self.path)
            if self.created:
                os.rmdir(os.path.dirname(self.path))  # only if empty
        except (OSError, ValueError):
            pass


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            return


def _take(save_dir: str, note: Callable[[str], None]) -> Optional[str]:
    """Rank 0: create or take over the lock; returns the reason for a refusal, or None. A directory
    that cannot be created or written (permissions, a file in the path, a read-only filesystem, a
    full disk) is a refusal too, so that every rank stops with it before the models load."""
    try:
        return _take_lock(save_dir, note)
    except OSError as err:
        return f"train.save_dir={save_dir} cannot be written: {describe_os_error(err)}"


def _take_lock(save_dir: str, note: Callable[[str], None]) -> Optional[str]:
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK)
    mine = json.dumps(_holder())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            with open(path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = {}  # half-written by a run killed while taking it
        age = time.time() - os.path.getmtime(path)
        why = stale_reason(holder, age)
        if why is None:
            return (f"{save_dir} is being written by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}, its lock touched {age:.0f} s ago): "
                    f"stop it or set train.save_dir to another directory; if that run is dead, delete {path}")
        note(f"taking over the lock of {save_dir}: {why}")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(mine)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
        return None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(mine)
    except OSError:  # a full disk: no empty lock left to refuse the next run for 5 minutes
        os.remove(path)
        raise
    return None


def acquire(save_dir: str, note: Callable[[str], None] = print) -> Optional[RunLock]:
    """Take ``save_dir``'s lock (collective: every rank calls it; rank 0 holds it). Raises
    CheckpointError on every rank when another live run holds it."""
    created = is_rank0() and not os.path.isdir(save_dir)
    refusal = _take(save_dir, note) if is_rank0() else None
    refusal = broadcast_object(refusal)
    if refusal:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(save_dir)  # the empty directory this refused run made
        raise CheckpointError(refusal)
    if not is_rank0():
        return None
    stop = threading.Event()
    path = os.path.join(save_dir, LOCK)
    thread = threading.Thread(target=_heartbeat, args=(path, stop), name="opdlm-run-lock", daemon=True)
    thread.start()
    return RunLock(path, stop, thread, created)


def clear_leftovers(save_dir: str, note: Callable[[str], None] = print) -> None:
    """Remove the staging directories and pointer temporaries a killed save left (under the lock)."""
    if not os.path.isdir(save_dir):
        return
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(".step_") and ".tmp-" in name and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            note(f"removed {path}, the staging directory of a save that did not finish")
        elif name.startswith(".latest") and name.endswith(".tmp"):
            os.remove(path)


def step_dirs(save_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoints under ``save_dir`` (renamed into place only when
    complete, so a ``step_N`` with megatron's ``metadata.json`` is whole), oldest first."""
    out = []
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            if name.startswith("step_") and name[5:].isdigit() and \
                    os.path.isfile(os.path.join(save_dir, name, "metadata.json")):
                out.append((int(name[5:]), os.path.join(save_dir, name)))
    return sorted(out)


def resume_point(save_dir: str, latest: str, note: Callable[[str], None] = print,
                 damage: Callable[[str], Optional[str]] = lambda _: None) -> Optional[str]:
    """The checkpoint a resumed run starts from: ``latest``'s, else the newest complete step (said
    so); a checkpoint ``damage`` finds fault with is passed over for the one before it (said so)."""
    pointer = os.path.join(save_dir, latest)
    steps = [path for _, path in step_dirs(save_dir)]
    candidates = list(reversed(steps))
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        ckpt = os.path.join(save_dir, name)
        if not name:
            _empty_pointer(pointer, save_dir, steps, note)
        elif ckpt in steps:
            candidates = [ckpt] + [p for p in reversed(steps) if p < ckpt]
        elif steps:
            note(f"{pointer} names {name}, which is not a complete checkpoint: trying {steps[-1]} instead")
        else:
            raise CheckpointError(f"{pointer} names {name}, which is not a complete checkpoint, and {save_dir} "
                                  "holds no other: delete the pointer to start afresh")
    elif steps:
        note(f"{save_dir} has no {latest} pointer: resuming from its newest complete checkpoint")
    for ckpt in candidates:
        problem = damage(ckpt)
        if problem is None:
            return ckpt
        note(f"not resuming from {ckpt}: {problem}")
    if candidates:
        raise CheckpointError(f"every checkpoint in {save_dir} is damaged (the newest: {damage(candidates[0])}); "
                              "restore them, or set train.resume=false train.overwrite=true to start over")
    return None


def _empty_pointer(pointer: str, save_dir: str, steps: list[str], note: Callable[[str], None]) -> None:
    """An empty ``latest`` (its write cut short, or emptied by hand) names nothing: the newest complete
    checkpoint is used instead, said so; with none, the run is refused with what to do (it used to
    print "latest names , which ...")."""
    if steps:
        note(f"{pointer} is empty: resuming from the newest complete checkpoint {steps[-1]}")
        return
    raise CheckpointError(f"{pointer} is empty and {save_dir} holds no complete checkpoint: delete {pointer} to "
                          "start afresh, or set train.save_dir to another directory")


def check_step_names(save_dir: str) -> None:
    """Refuse, at start, a file named like a checkpoint (``step_N``) in ``save_dir``: the run saves
    its checkpoints as ``step_N/`` directories there, and the save that met it would fail only
    then, hours in, with another tool's remedy."""
    if not os.path.isdir(save_dir):
        return
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith("step_") and name[5:].isdigit() and not os.path.isdir(path):
            raise CheckpointError(f"train.save_dir={save_dir}: {path} is a file, where the run saves its checkpoints "
                                  "as step_N directories: remove or move it, or set train.save_dir to another "
                                  "directory")


def start_fresh(save_dir: str, latest: str, overwrite: bool, note: Callable[[str], None] = print) -> None:
    """A run from step 0 (``train.resume=false``): refuse a directory with checkpoints unless
    ``overwrite``, which removes them, the pointer and the metrics first."""
    existing = step_dirs(save_dir)
    if not existing:
        return
    if not overwrite:
        raise CheckpointError(
            f"{save_dir} already holds {len(existing)} checkpoint(s) (newest {os.path.basename(existing[-1][1])}) and "
            "train.resume=false would start over on top of them: set train.resume=true to continue that run, "
            "train.overwrite=true to replace it, or another train.save_dir")
    for _, path in existing:
        shutil.rmtree(path)
    for name in (latest, METRICS, CONFIG, WANDB_ID):
        if os.path.exists(os.path.join(save_dir, name)):
            os.remove(os.path.join(save_dir, name))
    note(f"train.overwrite: removed the {len(existing)} checkpoint(s) and the metrics of the run in {save_dir}")


def truncate_metrics(save_dir: str, step: int) -> None:
    """Drop ``metrics.jsonl`` lines after ``step`` (a killed run's steps past its last checkpoint; the
    resumed run logs them again). The file is rewritten atomically."""
    path = os.path.join(save_dir, METRICS)
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                at = json.loads(line).get("step", 0)
            except ValueError:
                at = step + 1  # a line cut by the kill
            if at <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def step_of(ckpt: str) -> int:
    """The step of a ``step_N`` checkpoint directory."""
    return int(os.path.basename(ckpt)[5:])


def open_run(save_dir: str, *, resume: bool, overwrite: bool, latest: str, note: Callable[[str], None] = print,
             damage: Callable[[str], Optional[str]] = lambda _: None) -> tuple[Optional[RunLock], Optional[str]]:
    """Lock ``save_dir``, clear what a killed save left, and find the checkpoint to resume from
    (None: start at step 0). Collective: rank 0 decides, every rank gets the verdict (or the
    CheckpointError); ``damage`` checks a candidate checkpoint's files. The caller releases the
    lock when the run ends."""
    lock = acquire(save_dir, note)
    try:
        verdict: tuple[str, Optional[str]] = ("start", None)
        if is_rank0():
            try:
                clear_leftovers(save_dir, note)
                check_step_names(save_dir)
                if resume:
                    verdict = ("start", resume_point(save_dir, latest, note, damage))
                else:
                    start_fresh(save_dir, latest, overwrite, note)
                # a killed run's lines past the step this run starts at (all of them from step 0: a run
                # killed before its first checkpoint) would be listed twice
                truncate_metrics(save_dir, step_of(verdict[1]) if verdict[1] is not None else 0)
            except CheckpointError as err:
                verdict = ("error", str(err))
        kind, value = broadcast_object(verdict)
        if kind == "error":
            raise CheckpointError(value)
        return lock, value
    except BaseException:
        if lock is not None:
            lock.release()
        raise
