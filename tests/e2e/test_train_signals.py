"""Signals through the launchers (the process group, the process tree, torchrun alone, SIGUSR1):
each ends in a checkpoint, exit 0, and an exact resume."""

import os
import signal
import subprocess
import sys
import time

import pytest

from nemo_opdlm.config import dump_yaml
from tests.train_fixtures import ENV, cli_cmd, make_run, read_metrics


SIGNAL_STEPS = 8


TORCHRUN = "nemo_opdlm.runtime.torchrun"  # what slurm/opdlm_job.sh launches with LAUNCHER=torchrun


def _descendants(pid):
    """``pid`` and every process below it (children first found through /proc's parent ids)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except OSError:
                pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def _signal_all(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _torchrun_cmd(recipe, *overrides, launcher=TORCHRUN):
    from tests.dist import _free_port
    return [sys.executable, "-m", launcher, "--nproc_per_node=2", f"--master_port={_free_port()}",
            "--master_addr=127.0.0.1", "-m", "nemo_opdlm.cli", "train", "--recipe", str(recipe), *overrides]


@pytest.fixture(scope="module")
def signal_recipe(tmp_path_factory):
    """An 8-step recipe that checkpoints every step, and its uninterrupted losses on 1 process."""
    base = tmp_path_factory.mktemp("signals")
    recipe = base / "run.yaml"
    recipe.write_text(dump_yaml(make_run(str(base), f"train.steps={SIGNAL_STEPS}", "train.save_every=1")))
    subprocess.run(cli_cmd(str(recipe), f"train.save_dir={base / 'straight'}"), env=ENV, check=True,
                   capture_output=True, timeout=600)
    return recipe, read_metrics(base / "straight")


@pytest.fixture(scope="module")
def signal_recipe_2ranks(signal_recipe, tmp_path_factory):
    """The same recipe's uninterrupted losses on 2 data-parallel ranks under torchrun."""
    recipe = signal_recipe[0]
    straight = tmp_path_factory.mktemp("signals2") / "straight"
    subprocess.run(_torchrun_cmd(recipe, f"train.save_dir={straight}"), env=ENV, check=True, capture_output=True,
                   timeout=600)
    return recipe, read_metrics(straight)


def _stopped_then_resumed(proc, run, want, resume_cmd):
    """The signalled run ended with exit 0 and a checkpoint at the step it names; resuming from it
    gives every later step the uninterrupted run's loss exactly. Returns the stopping step."""
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "pre-emption signal: checkpoint saved at step" in out, out[-4000:]
    stopped = int(out.split("pre-emption signal: checkpoint saved at step ")[1].split(",")[0])
    assert (run / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert not [n for n in os.listdir(run) if n.startswith(".step_")], os.listdir(run)  # no staging left
    assert stopped < SIGNAL_STEPS
    done = subprocess.run(resume_cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"at step {stopped}" in done.stdout
    got = read_metrics(run)
    assert sorted(got) == list(range(1, SIGNAL_STEPS + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
    return stopped


def _start(cmd):
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _read_until(proc, text):
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended (exit {proc.wait()}) before printing {text!r}")


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(tmp_path, signal_recipe):
    """``kill -TERM -- -PGID`` after a checkpoint exists: the checkpoint writer's Manager process is in
    the group; it died and the pre-emption save failed with BrokenPipeError (exit 1, no checkpoint)."""
    recipe, want = signal_recipe
    run = tmp_path / "run"
    proc = _start(cli_cmd(str(recipe), f"train.save_dir={run}"))
    _read_until(proc, f"step 3/{SIGNAL_STEPS}")
    os.killpg(proc.pid, signal.SIGTERM)
    assert _stopped_then_resumed(proc, run, want, cli_cmd(str(recipe), f"train.save_dir={run}")) >= 3


@pytest.mark.slow
def test_sigterm_to_the_process_tree_during_a_save_checkpoints_and_resumes_exactly(tmp_path, signal_recipe):
    """SIGTERM to every process of the tree (as Slurm signals a job step) while the writer processes
    of step 2's save are writing: that save completes and is the checkpoint the run stops at."""
    recipe, want = signal_recipe
    run = tmp_path / "run"
    proc = _start([sys.executable, "-m", "tests.slow_save", "train", "--recipe", str(recipe), f"train.save_dir={run}"])
    _read_until(proc, f"step 2/{SIGNAL_STEPS}")
    deadline = time.time() + 120
    while True:  # the forked writers (same command line as the trainer) are in their write
        tree = _descendants(proc.pid)
        writers = [p for p in tree if p != proc.pid and _cmdline(p) == _cmdline(proc.pid)]
        if writers and any(n.startswith(".step_0000002") for n in os.listdir(run)):
            break
        assert time.time() < deadline and proc.poll() is None, "step 2's save was never seen"
        time.sleep(0.05)
    _signal_all(tree, signal.SIGTERM)
    assert _stopped_then_resumed(proc, run, want, cli_cmd(str(recipe), f"train.save_dir={run}")) == 2


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


@pytest.mark.distributed
def test_sigterm_to_torchrun_alone_checkpoints_and_resumes_exactly(tmp_path, signal_recipe_2ranks):
    """SIGTERM to the torchrun agent only (how slurm/opdlm_job.sh forwards it): the agent passes it to
    both workers' process groups and waits; both checkpoint, and the agent exits 0."""
    recipe, want = signal_recipe_2ranks
    run = tmp_path / "run"
    proc = _start(_torchrun_cmd(recipe, f"train.save_dir={run}"))
    _read_until(proc, f"step 3/{SIGNAL_STEPS}")
    proc.send_signal(signal.SIGTERM)
    assert _stopped_then_resumed(proc, run, want, _torchrun_cmd(recipe, f"train.save_dir={run}")) >= 3


@pytest.mark.distributed
def test_sigusr1_to_the_torchrun_tree_checkpoints_and_resumes_exactly(tmp_path, signal_recipe_2ranks):
    """SIGUSR1 to torchrun, its workers and their helpers (``scancel --signal=USR1``): plain torchrun
    died of it (exit -10) with its workers still running; now every worker checkpoints and the agent
    exits 0 after them."""
    recipe, want = signal_recipe_2ranks
    run = tmp_path / "run"
    proc = _start(_torchrun_cmd(recipe, f"train.save_dir={run}"))
    _read_until(proc, f"step 3/{SIGNAL_STEPS}")
    _signal_all(_descendants(proc.pid), signal.SIGUSR1)
    assert _stopped_then_resumed(proc, run, want, _torchrun_cmd(recipe, f"train.save_dir={run}")) >= 3


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_optimizer_sigkill_then_resume_gives_the_same_losses(tmp_path):
    """optim.distributed_optimizer=true at DP=2: train, checkpoint every step, SIGKILL the whole job
    at step 3, resume: every step's loss equals the uninterrupted run's (megatron-core 0.16 on torch's
    Adam: the dp_reshardable format, and each parameter's Adam step restored). That state resumes at
    DP=1; at TP=2 or into the plain optimizer it is refused with one line before any shard is read."""
    recipe = tmp_path / "run.yaml"
    recipe.write_text(dump_yaml(make_run(str(tmp_path), "train.steps=5", "train.save_every=1",
                                         "optim.distributed_optimizer=true")))
    subprocess.run(_torchrun_cmd(recipe, f"train.save_dir={tmp_path / 'a'}"), env=ENV, check=True,
                   capture_output=True, timeout=600)
    want = read_metrics(tmp_path / "a")
    assert sorted(want) == [1, 2, 3, 4, 5]

    run = tmp_path / "b"
    proc = _start(_torchrun_cmd(recipe, f"train.save_dir={run}"))
    _read_until(proc, "step 3/5")
    _signal_all(_descendants(proc.pid), signal.SIGKILL)  # the agent, its workers and their writer helpers
    proc.wait(timeout=60)
    killed_at = int((run / "latest").read_text().strip().split("_")[1])
    assert 2 <= killed_at <= 3
    done = subprocess.run(_torchrun_cmd(recipe, f"train.save_dir={run}"), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"at step {killed_at}" in done.stdout
    got = read_metrics(run)
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]

    # The state reshards over DP (a DP=1 resume reads it), not over TP/PP or into the plain optimizer.
    resumed = subprocess.run(cli_cmd(str(recipe), f"train.save_dir={run}", "train.steps=6"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "at step 5" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    for override, message in (("optim.distributed_optimizer=false", "holds distributed optimizer state"),
                              ("parallel.tp=2", "TP=1 x PP=1, and this run is TP=2 x PP=1")):
        cmd = (_torchrun_cmd(recipe, f"train.save_dir={run}", "train.steps=7", override) if "tp" in override
               else cli_cmd(str(recipe), f"train.save_dir={run}", "train.steps=7", override))
        refused = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert message in refused.stdout + refused.stderr, refused.stderr[-2000:]


# --- Faults around the launcher (issue 26, item 5): an orphaned worker, a stopped rank, failed workers ---


def _workers(launcher_pid):
    """rank -> pid of the training workers under a torchrun agent (read from their RANK variable)."""
    found = {}
    for pid in _descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env and _cmdline(pid) and b"nemo_opdlm.cli" in _cmdline(pid):
            found.setdefault(int(env[b"RANK"]), pid)  # the trainer, not its forked helpers (same RANK)
    return found


def _alive(pid):
    """Running (a zombie left for a dead parent to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _checkpoints(run):
    return sorted(n for n in os.listdir(run) if n.startswith("step_"))


@pytest.mark.distributed
def test_sigkill_to_plain_torchrun_takes_its_workers_with_it(tmp_path, signal_recipe):
    """SIGKILL to plain torchrun's agent (what a kill of the launcher's process group reaches: the
    workers run in sessions of their own): the workers lived on and committed two more checkpoints.
    Now they die within seconds, and no checkpoint or metrics line appears afterwards."""
    recipe, _ = signal_recipe
    run = tmp_path / "run"
    proc = _start(_torchrun_cmd(recipe, f"train.save_dir={run}", launcher="torch.distributed.run"))
    _read_until(proc, f"step 2/{SIGNAL_STEPS}")
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    helpers = [p for p in _descendants(proc.pid) if p != proc.pid]
    try:
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
        while any(_alive(p) for p in workers.values()) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        gone_after = time.monotonic() - killed
        assert not any(_alive(p) for p in workers.values()), f"workers still running {gone_after:.1f} s after the kill"
        steps, metrics = _checkpoints(run), (run / "metrics.jsonl").read_text()
        time.sleep(5)  # several steps' time: an orphan would have trained and saved on by now
        assert _checkpoints(run) == steps and (run / "metrics.jsonl").read_text() == metrics
        assert len(steps) < SIGNAL_STEPS
    finally:  # the checkpoint writer's spawned Manager outlives a SIGKILLed worker (idle, it writes nothing)
        _signal_all([p for p in helpers if _alive(p)], signal.SIGKILL)


@pytest.mark.distributed
def test_failed_workers_are_summarised_in_one_line_by_the_launcher(tmp_path, signal_recipe):
    """Both workers fail with a one-line error: plain torchrun followed them with a ChildFailedError
    traceback and a table; the project's launcher prints one summary line quoting the first error and
    exits with the workers' status (2)."""
    recipe, _ = signal_recipe
    done = subprocess.run(_torchrun_cmd(recipe, f"train.save_dir={tmp_path / 'run'}", "train.steps=0"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-4000:]
    summary = [line for line in done.stderr.splitlines() if line.startswith("opdlm launcher:")]
    assert len(summary) == 1, done.stderr[-4000:]
    assert summary[0].startswith("opdlm launcher: 2 of 2 ranks failed (exit 2); first error (rank "), summary[0]
    assert "): [rank " in summary[0] and "train.steps" in summary[0] and "; logs: " in summary[0], summary[0]


@pytest.mark.distributed
def test_a_stopped_rank_ends_the_job_in_one_line_per_rank_and_resumes_exactly(tmp_path, signal_recipe_2ranks):
    """SIGSTOP one worker mid-run: the other waited for the 30-minute collective timeout, which the
    config could not set. At parallel.timeout_minutes=0.25 the live rank gives up after 15 s with one
    line naming the stopped rank; continued, the stopped rank says the others gave up on it; the
    launcher adds one summary line, no traceback; resuming gives every step the uninterrupted loss."""
    recipe, want = signal_recipe_2ranks
    run = tmp_path / "run"
    proc = _start(_torchrun_cmd(recipe, f"train.save_dir={run}", "parallel.timeout_minutes=0.25"))
    _read_until(proc, f"step 3/{SIGNAL_STEPS}")
    stuck = _workers(proc.pid)[1]
    os.kill(stuck, signal.SIGSTOP)
    stopped_at = time.monotonic()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[rank 0] opdlm train: error (CollectiveError)"):
            break
    waited = time.monotonic() - stopped_at
    os.kill(stuck, signal.SIGCONT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out[-4000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
    errors = {line.split("]")[0] + "]": line for line in out.splitlines()
              if line.startswith("[rank ") and "error (CollectiveError)" in line}
    assert set(errors) == {"[rank 0]", "[rank 1]"}, out[-4000:]
    assert "timed out after waiting 0.25 min" in errors["[rank 0]"] and "rank 1 likely stuck" in errors["[rank 0]"]
    assert "raise parallel.timeout_minutes" in errors["[rank 0]"], errors["[rank 0]"]
    # rank 1, woken, either finds its peer gone (rank 0 exited first) or times out in its own next
    # collective (rank 0 still shutting down): one CollectiveError line either way
    assert ("rank 0 timed out waiting for this rank (1)" in errors["[rank 1]"]
            or "timed out after waiting 0.25 min" in errors["[rank 1]"]), errors["[rank 1]"]
    assert "error (CollectiveError)" in errors["[rank 1]"], errors["[rank 1]"]
    summary = [line for line in out.splitlines() if line.startswith("opdlm launcher: ")]
    assert len(summary) == 1 and "2 of 2 ranks failed (exit 2); first error (rank 0): " in summary[0], summary
    assert 15 <= waited < 60, waited

    done = subprocess.run(_torchrun_cmd(recipe, f"train.save_dir={run}"), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = read_metrics(run)
    assert sorted(got) == list(range(1, SIGNAL_STEPS + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]


def test_checkpoint_directories_get_a_plain_mkdir_mode(tmp_path):
    """``step_N/`` (and every staged output) was 0700 (tempfile.mkdtemp) inside a 0755 run directory:
    unreadable for the rest of a shared cluster. It now gets a plain mkdir's mode: 0777 less the umask."""
    from nemo_opdlm.checkpoint.staging import staged_dir

    old = os.umask(0o027)
    try:
        for mask in (0o022, 0o027):
            os.umask(mask)
            target = tmp_path / f"step_{mask:o}"
            with staged_dir(str(target), overwrite=False, note=lambda _: None) as staging:
                (tmp_path / staging / "f").write_text("x")
            assert (target.stat().st_mode & 0o7777) == 0o777 & ~mask
    finally:
        os.umask(old)


@pytest.mark.slow
def test_a_trained_run_s_checkpoints_have_the_run_directory_s_mode(signal_recipe):
    """The uninterrupted run of the fixture (umask 022): every step_N/ is 0755 like its run directory."""
    recipe, _ = signal_recipe
    run = recipe.parent / "straight"
    modes = {n: (run / n).stat().st_mode & 0o7777 for n in _checkpoints(run)}
    assert modes and set(modes.values()) == {run.stat().st_mode & 0o7777}, modes
