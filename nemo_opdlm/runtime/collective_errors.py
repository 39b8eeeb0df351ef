"""A collective that fails because of another rank becomes one line naming that rank.

One job: turn the backend's error for a collective that timed out (a rank was stopped, hung, or its
node failed) or lost its peer (another rank exited) into a :class:`~nemo_opdlm.errors.CollectiveError`
that says where it happened, how long it waited, which rank(s) to look at, and the remedy. Non-goals:
the timeout itself (``parallel.timeout_minutes``, ``distributed.py``), a launcher that died
(``orphans.py``).

Naming the stuck rank: gloo's error says only "Timed out waiting 15000ms for recv operation", not
from whom (a ring all-reduce waits on its neighbour, which may itself be waiting), so the ranks
compare notes through the rendezvous store, which lives in the torchrun agent (or in rank 0's
process under Slurm) and still answers. Each rank that meets the failure records it there, then the
ones that timed out wait a short grace period (every live rank times out within about the same
``parallel.timeout_minutes``, or sees its peer leave at once): the ranks that never report are the
ones that did not reach the failure at all: stopped (SIGSTOP, a debugger), hung, or on a failed
node. That is exact for a rank that is stopped or hung outside any collective; a rank stuck inside a
collective of its own would report too and is then not singled out, and a store that does not
answer (its host is the stuck one) is said as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch.distributed as dist

from nemo_opdlm.errors import CollectiveError

TIMEOUT, PEER_GONE = "timed out", "lost its peer"
_TIMEOUT_SIGNS = ("Timed out waiting", "timed out", "Watchdog caught collective operation timeout")
_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ECONNRESET")
_KEY = "opdlm/collective_failure/"


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, the exceptions it was raised from or during, and the per-rank failures a checkpoint
    exception (torch.distributed.checkpoint's CheckpointException) wraps."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            wrapped = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(wrapped, BaseException):
                todo.append(wrapped)


def failure_kind(err: BaseException) -> Optional[str]:
    """TIMEOUT or PEER_GONE when ``err`` is a collective's failure of that kind (gloo's or NCCL's
    RuntimeError / DistBackendError, possibly wrapped), else None."""
    for e in _chain(err):
        if not isinstance(e, RuntimeError):
            continue
        text = str(e)
        if any(sign in text for sign in _PEER_SIGNS):
            return PEER_GONE
        if any(sign in text for sign in _TIMEOUT_SIGNS):
            return TIMEOUT
    return None


def _backend_words(err: BaseException) -> str:
    """The backend's own first line, without gloo's source-file prefix ``[.../pair.cc:553] ``."""
    for e in _chain(err):
        if isinstance(e, RuntimeError) and failure_kind(e):
            line = (str(e).strip().splitlines() or [""])[0]
            line = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
            return line.split(". ", 1)[0]  # its first sentence (gloo goes on: "... GLHF!")
    return type(err).__name__


@dataclass(frozen=True)
class Reports:
    """What the ranks recorded in the rendezvous store: rank -> kind, for every rank that reported."""

    by_rank: dict[int, str]
    store_answered: bool


def compare_notes(kind: str, grace_s: float) -> Reports:
    """Record this rank's failure in the rendezvous store and read the others' (waiting up to
    ``grace_s`` for every rank to report when this one timed out). Never raises."""
    if not (dist.is_available() and dist.is_initialized()):
        return Reports({}, store_answered=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))  # a stuck store host must not add another full timeout
        store.set(f"{_KEY}{rank}", kind)
        keys = [f"{_KEY}{r}" for r in range(world)]
        deadline = time.monotonic() + (grace_s if kind == TIMEOUT else 0.0)
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.2)
        by_rank = {r: store.get(k).decode() for r, k in enumerate(keys) if store.check([k])}
        return Reports(by_rank, store_answered=True)
    except Exception:  # noqa: BLE001 - the store host is gone or stuck: say so instead
        return Reports({rank: kind}, store_answered=False)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def describe(kind: str, where: str, waited_minutes: float, backend_words: str, reports: Reports,
             rank: int, world: int) -> str:
    """The one line (without the program prefix): what failed where, whom to suspect, the remedy."""
    others = [r for r in range(world) if r != rank]
    silent = [r for r in others if r not in reports.by_rank]
    timed_out = [r for r in others if reports.by_rank.get(r) == TIMEOUT]
    head = f"a collective in {where} {kind}"
    if kind == TIMEOUT:
        head += f" after waiting {waited_minutes:g} min for the other ranks (backend: {backend_words})"
        if not reports.store_answered:
            suspect = ("the rendezvous store did not answer either, so the host it lives on (MASTER_ADDR: the "
                       "launcher, or rank 0 under Slurm) is likely stuck")
        elif silent:
            suspect = (f"{_ranks(silent)} likely stuck (it never reached this failure: stopped, hung, or its node "
                       "failed)")
        else:
            suspect = "every rank timed out, so no single rank is to blame: likely a network or collective mismatch"
        return (f"{head}; {suspect}: check that node (py-spy dump --pid, dmesg, a stopped process 'T' in ps), "
                f"or raise parallel.timeout_minutes (now {waited_minutes:g}) if a step or save legitimately "
                "keeps ranks apart that long; resume from the run's latest checkpoint")
    head += f" (backend: {backend_words})"
    if timed_out:
        return (f"{head}: {_ranks(timed_out)} timed out waiting for this rank ({rank}) and exited, so this rank was "
                "stopped or hung for longer than parallel.timeout_minutes: check this node, then resume from the "
                "run's latest checkpoint")
    return (f"{head}: another rank exited or crashed; its own error line says why: fix that, then resume from "
            "the run's latest checkpoint")


def as_collective_error(err: BaseException, where: str, timeout_minutes: float) -> Optional[CollectiveError]:
    """A :class:`CollectiveError` for ``err`` if it is a collective's timeout or lost peer, else None.
    Talks to the other ranks through the store (see the module docstring): call it once, on failure."""
    kind = failure_kind(err)
    if kind is None or not (dist.is_available() and dist.is_initialized()):
        return None
    grace_s = min(30.0, max(3.0, 0.1 * timeout_minutes * 60))
    reports = compare_notes(kind, grace_s)
    line = describe(kind, where, timeout_minutes, _backend_words(err), reports, dist.get_rank(),
                    dist.get_world_size())
    return CollectiveError(line)
