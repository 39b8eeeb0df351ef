"""The run directory: one writer, stale locks taken over, leftovers cleared, where a run starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nemo_opdlm.errors import CheckpointError
from nemo_opdlm.training import run_dir as R


def _step(save_dir, n):
    path = save_dir / f"step_{n:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return str(path)


def _lock(save_dir, **holder):
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / R.LOCK).write_text(json.dumps(holder))


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    notes = []
    first = R.acquire(str(tmp_path), notes.append)
    with pytest.raises(CheckpointError, match=rf"being written by another run \(pid {os.getpid()} on "):
        R.acquire(str(tmp_path), notes.append)
    first.release()
    assert not (tmp_path / R.LOCK).exists()
    R.acquire(str(tmp_path), notes.append).release()
    assert notes == []


def test_locks_of_dead_runs_are_taken_over(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = R._holder()["host"]
    notes = []
    _lock(tmp_path / "a", host=host, pid=dead.pid)
    R.acquire(str(tmp_path / "a"), notes.append).release()
    assert f"its process {dead.pid} on this host is gone" in notes[-1]
    # another host: live unless it stopped touching the lock (or it is this Slurm job before a requeue)
    _lock(tmp_path / "b", host="elsewhere", pid=1, slurm_job_id="77")
    with pytest.raises(CheckpointError, match="touched 0 s ago"):
        R.acquire(str(tmp_path / "b"), notes.append)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    R.acquire(str(tmp_path / "b"), notes.append).release()
    assert "this Slurm job's (77) earlier run" in notes[-1]
    monkeypatch.delenv("SLURM_JOB_ID")
    _lock(tmp_path / "c", host="elsewhere", pid=1)
    old = time.time() - R.STALE_S - 5
    os.utime(tmp_path / "c" / R.LOCK, (old, old))
    R.acquire(str(tmp_path / "c"), notes.append).release()
    assert "nobody touched it" in notes[-1]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / R.LOCK).write_text('{"host": "elsewh')  # cut by a kill while being written
    os.utime(tmp_path / "d" / R.LOCK, (old, old))
    R.acquire(str(tmp_path / "d"), notes.append).release()


def test_where_a_run_starts(tmp_path):
    notes = []
    assert R.open_run(str(tmp_path / "new"), resume=True, overwrite=False, latest="latest",
                      note=notes.append)[1] is None
    run = tmp_path / "run"
    _step(run, 2)
    newest = _step(run, 4)
    (run / ".step_0000006.tmp-x1y2").mkdir()  # a save killed half-way
    (run / ".step_0000006.tmp-x1y2" / "shard").write_text("partial")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7))
                                       + '{"step": 7, "lo')
    lock, start = R.open_run(str(run), resume=True, overwrite=False, latest="latest", note=notes.append)
    lock.release()
    assert start == newest and "no latest pointer" in notes[-1]  # resumed, not restarted at step 1
    assert not (run / ".step_0000006.tmp-x1y2").exists()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4]
    (run / "latest").write_text("step_0000009\n")  # names a checkpoint that is not there
    lock, start = R.open_run(str(run), resume=True, overwrite=False, latest="latest", note=notes.append)
    lock.release()
    assert start == newest and "not a complete checkpoint" in notes[-1]
    with pytest.raises(CheckpointError, match="already holds 2 checkpoint.*train.overwrite=true"):
        R.open_run(str(run), resume=False, overwrite=False, latest="latest", note=notes.append)
    assert not (run / R.LOCK).exists()  # a refused run leaves no lock behind
    lock, start = R.open_run(str(run), resume=False, overwrite=True, latest="latest", note=notes.append)
    lock.release()
    assert start is None and R.step_dirs(str(run)) == [] and not (run / "metrics.jsonl").exists()
