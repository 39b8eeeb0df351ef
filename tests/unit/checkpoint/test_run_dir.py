"""The run directory: one writer, stale locks taken over, leftovers cleared, where a run starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nemo_opdlm.errors import CheckpointError
from nemo_opdlm.checkpoint import run_dir as R


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


def test_a_fresh_start_drops_the_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    """Such a run left steps 1.. in metrics.jsonl; the next starts at step 0 and used to append, so
    step 1 was listed twice. A run from step 0 (no checkpoint to resume) truncates them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    for resume in (True, False):
        lock, start = R.open_run(str(run), resume=resume, overwrite=False, latest="latest", note=lambda m: None)
        lock.release()
        assert start is None and (run / "metrics.jsonl").read_text() == ""
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")


def test_an_empty_latest_pointer_and_a_file_named_like_a_checkpoint(tmp_path):
    """An empty ``latest`` is said so (it read "latest names , which ..."): the newest checkpoint is
    used, or with none the run is refused with what to do. A file named ``step_N`` is refused at
    start, not at the save that meets it."""
    notes = []
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("\n")
    with pytest.raises(CheckpointError, match=r"latest is empty and .* holds no complete checkpoint: delete .*latest"):
        R.open_run(str(run), resume=True, overwrite=False, latest="latest", note=notes.append)
    newest = _step(run, 3)
    lock, start = R.open_run(str(run), resume=True, overwrite=False, latest="latest", note=notes.append)
    lock.release()
    assert start == newest and notes[-1] == f"{run / 'latest'} is empty: resuming from the newest complete checkpoint {newest}"
    (run / "step_0000005").write_text("x")
    with pytest.raises(CheckpointError, match=r"step_0000005 is a file, where the run saves its checkpoints as step_N "
                                              r"directories: remove or move it"):
        R.open_run(str(run), resume=True, overwrite=False, latest="latest", note=notes.append)
    assert not (run / R.LOCK).exists()
