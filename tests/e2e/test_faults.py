"""The pieces of the launcher-fault handling that need no processes (issue 26 item 5): the timeout
key, the one-line messages for a timed-out collective and for failed workers, the parent watch.
The end-to-end cases (a SIGKILLed torchrun, a SIGSTOPped rank, failed workers) are in
``test_train_signals.py``."""

import os
from types import SimpleNamespace

import pytest

from nemo_opdlm.config import apply_overrides, from_dict, to_dict
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.runtime.collective_errors import PEER_GONE, TIMEOUT, Reports, describe, failure_kind
from nemo_opdlm.runtime.distributed import ParallelLayout
from nemo_opdlm.runtime.orphans import ParentWatch
from nemo_opdlm.runtime.torchrun import failure_summary


def test_timeout_minutes_defaults_to_30_accepts_fractions_and_refuses_zero():
    assert ParallelLayout().timeout_minutes == 30.0
    def layout(value: str) -> ParallelLayout:  # as a ``parallel.timeout_minutes=...`` override reads it
        return from_dict(ParallelLayout, apply_overrides({"parallel": to_dict(ParallelLayout())},
                                                         [f"parallel.timeout_minutes={value}"])["parallel"])

    assert layout("0.1").timeout_minutes == pytest.approx(0.1)
    for bad in ("0", "-1", ".nan"):
        with pytest.raises(ConfigError, match="parallel.timeout_minutes must be > 0"):
            layout(bad)


def test_gloo_errors_are_recognised():
    assert failure_kind(RuntimeError("[../unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation "
                                     "to complete")) == TIMEOUT
    assert failure_kind(RuntimeError("[../pair.cc:553] Connection closed by peer [127.0.0.1]:4. GLHF!")) == PEER_GONE
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = RuntimeError("Connection reset by peer")
    assert failure_kind(wrapped) == PEER_GONE
    assert failure_kind(RuntimeError("CUDA out of memory")) is None and failure_kind(ValueError("x")) is None


def test_the_timeout_line_names_the_rank_that_never_reported():
    line = describe(TIMEOUT, "step 4 (checkpoint save)", 0.25, "Timed out waiting 15000ms for recv operation",
                    Reports({0: TIMEOUT, 2: TIMEOUT}, True), rank=0, world=3)
    assert line.startswith("a collective in step 4 (checkpoint save) timed out after waiting 0.25 min")
    assert "rank 1 likely stuck" in line and "raise parallel.timeout_minutes (now 0.25)" in line
    assert "store did not answer" in describe(TIMEOUT, "setup", 30, "x", Reports({0: TIMEOUT}, False), 0, 2)
    stuck = describe(PEER_GONE, "step 3 (pre-emption check)", 0.25, "Connection closed by peer",
                     Reports({0: TIMEOUT, 1: PEER_GONE}, True), rank=1, world=2)
    assert "rank 0 timed out waiting for this rank (1)" in stuck
    assert "another rank exited" in describe(PEER_GONE, "setup", 30, "x", Reports({1: PEER_GONE}, True), 1, 2)


def _failure(exitcode, message="", timestamp=0, error_file="/tmp/err.json"):
    return SimpleNamespace(exitcode=exitcode, message=message, timestamp=timestamp,
                           error_file=error_file if message else "<N/A>", signal_name=lambda: "SIGTERM")


def test_failed_workers_summary_quotes_the_first_error_and_keeps_the_user_status():
    line, status = failure_summary({0: _failure(-15, "[rank 0] opdlm train: error (X): first", timestamp=5),
                                    1: _failure(2, "[rank 1] opdlm train: error (X): second", timestamp=6)},
                                   2, None)
    assert status == 2  # rank 0 said its line, then torchrun's SIGTERM caught it exiting
    assert line == ("opdlm launcher: 2 of 2 ranks failed (exit 2); first error (rank 0): [rank 0] opdlm train: "
                    "error (X): first; logs: each rank's lines above")
    line, status = failure_summary({1: _failure(-9)}, 2, "/logs")
    assert status == 137 and "first error (rank 1): killed by signal SIGTERM (9); logs: /logs" in line


def test_parent_watch_only_under_torchrun():
    assert ParentWatch.start(environ={}).parent is None
    watch = ParentWatch(parent=os.getppid())
    assert not watch.orphaned()
    watch.check()  # returns: the parent is alive
    assert ParentWatch(parent=os.getppid() + 1_000_000).orphaned()
