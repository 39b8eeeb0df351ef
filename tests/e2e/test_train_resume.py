"""Checkpoints and resume: an exact resume after SIGKILL and SIGTERM, a second run on one save_dir
refused, damaged checkpoints passed over, train.exit_interval segments, the config's schedule on
resume, and a resume with another model refused."""

import dataclasses
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from nemo_opdlm.config import ConfigError, dump_yaml
from nemo_opdlm.training import step as train_step
from nemo_opdlm.training.loop import train
from tests.train_fixtures import ENV, cli_cmd, losses, make_run, read_metrics




@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    cfg = make_run(str(tmp_path), "train.steps=6", "train.save_every=1")
    straight = tmp_path / "straight.yaml"
    straight.write_text(dump_yaml(cfg))
    subprocess.run(cli_cmd(str(straight), "train.save_dir=" + str(tmp_path / "a")), env=ENV, check=True,
                   capture_output=True, timeout=300)
    want = read_metrics(tmp_path / "a")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    run_b = tmp_path / "b"
    proc = subprocess.Popen(cli_cmd(str(straight), "train.save_dir=" + str(run_b)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if "step 3/6" in line:
            # a real kill, as a scheduler kills a job: the trainer and its checkpoint helper processes
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = (run_b / "latest").read_text().strip()
    killed_at = int(latest.split("_")[1])
    assert 2 <= killed_at <= 3
    done = subprocess.run(cli_cmd(str(straight), "train.save_dir=" + str(run_b)), env=ENV, check=True,
                          capture_output=True, text=True, timeout=300)
    assert "resumed from" in done.stdout and f"at step {killed_at}" in done.stdout
    got = read_metrics(run_b)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == want[step], (step, got, want)


@pytest.mark.slow
def test_a_second_run_on_the_same_save_dir_is_refused(tmp_path):
    """Two writers on one train.save_dir interleaved metrics and moved latest backwards; the second
    is now refused in one line, before it loads any model, while the first holds the lock."""
    cfg = make_run(str(tmp_path), "train.steps=200", "train.save_every=0")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(dump_yaml(cfg))
    first = subprocess.Popen(cli_cmd(str(recipe)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(cfg.train.save_dir, ".opdlm.lock")
        deadline = time.time() + 120
        while not os.path.exists(lock) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert os.path.exists(lock), "the first run never took the lock"
        second = subprocess.run(cli_cmd(str(recipe)), env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip().splitlines()
    assert "being written by another run" in err[-1] and f"pid {first.pid}" in err[-1], err


def test_damaged_checkpoints_are_named_and_passed_over(tmp_path, capsys):
    """16 bytes of the newest checkpoint's largest shard overwritten (which resumed silently, with a
    loss 2e4 times the intact one): the damage names the file, and a resumed run falls back to the
    step before it, with losses equal to an uninterrupted run's; a truncated shard is named too."""
    from nemo_opdlm.checkpoint.manifest import damage

    cfg = make_run(str(tmp_path / "a"), "train.steps=2", "train.save_every=1")
    train(cfg)
    newest = os.path.join(cfg.train.save_dir, "step_0000002")
    shards = [os.path.join(newest, n) for n in os.listdir(newest) if n.endswith(".distcp")]
    shard = max(shards, key=os.path.getsize)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        raw = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in raw))
    assert damage(newest) and "checksum does not match" in damage(newest) and shard in damage(newest)
    assert damage(os.path.join(cfg.train.save_dir, "step_0000001")) is None
    capsys.readouterr()
    resumed = train(make_run(str(tmp_path / "a"), "train.steps=3", "train.save_every=1"))["history"]
    assert f"not resuming from {newest}" in capsys.readouterr().out
    straight = train(make_run(str(tmp_path / "b"), "train.steps=3", "train.save_dir=null"))["history"]
    assert [h["step"] for h in resumed] == [2, 3] and losses(resumed) == losses(straight)[1:]
    step3 = os.path.join(cfg.train.save_dir, "step_0000003")
    shard3 = max((os.path.join(step3, n) for n in os.listdir(step3) if n.endswith(".distcp")), key=os.path.getsize)
    with open(shard3, "r+b") as f:
        f.truncate(os.path.getsize(shard3) // 2)
    assert "truncated" in damage(step3) and shard3 in damage(step3)


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(tmp_path):
    cfg = make_run(str(tmp_path), "train.steps=200", "train.save_every=0")
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.Popen(cli_cmd(str(path)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 2/200" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "pre-emption signal: checkpoint saved" in out
    assert (tmp_path / "run" / "latest").read_text().strip().startswith("step_")


def _cosine_lr(updates, *, lr, min_lr, warmup, total):
    """megatron-core's cosine schedule after ``updates`` updates (past the warm-up)."""
    return min_lr + 0.5 * (math.cos(math.pi * (updates - warmup) / (total - warmup)) + 1.0) * (lr - min_lr)


def test_resume_follows_the_configs_learning_rate_schedule(tmp_path, capsys):
    """The rule on resume: optim.* and train.steps win over the checkpoint's schedule, which is rebuilt
    from the config at the saved update count, and the run says what changed. Before, the saved one
    won silently: optim.lr=1e-5 resumed with bit-identical losses, and train.steps 2 -> 5 kept the lr
    at its floor (1e-4) for steps 3-5. An unchanged config still resumes exactly."""
    import shutil

    original_cfg = make_run(str(tmp_path), "train.steps=4", "train.save_every=2")
    original = train(original_cfg)["history"]

    def at_step_2(name, *overrides):
        run = tmp_path / name
        shutil.copytree(original_cfg.train.save_dir, run)
        shutil.rmtree(run / "step_0000004")
        (run / "latest").write_text("step_0000002\n")
        capsys.readouterr()
        history = train(make_run(str(tmp_path), "train.steps=4", "train.save_every=2", f"train.save_dir={run}",
                                 *overrides))["history"]
        return history, capsys.readouterr().out

    same, out = at_step_2("same")
    assert losses(same) == losses(original)[2:] and "differ" not in out
    lower, out = at_step_2("lower", "optim.lr=1e-5", "optim.min_lr=1e-6")
    assert lower[0]["lr"] == _cosine_lr(2, lr=1e-5, min_lr=1e-6, warmup=1, total=4)  # step 3 trains at it
    assert losses(lower)[0] == losses(original)[2]  # step 3's loss is before its update
    assert abs(losses(lower)[1] - losses(original)[3]) > 1e-6 * abs(losses(original)[3])
    assert "(optim.lr: 0.001 -> 1e-05; optim.min_lr: 0.0001 -> 1e-06): the config wins" in out, out

    short = make_run(str(tmp_path), "train.steps=2", f"train.save_dir={tmp_path / 'short'}")
    train(short)
    capsys.readouterr()
    extended = train(make_run(str(tmp_path), "train.steps=5", f"train.save_dir={tmp_path / 'short'}"))["history"]
    want = [_cosine_lr(n, lr=1e-3, min_lr=1e-4, warmup=1, total=5) for n in (2, 3, 4)]
    assert [h["step"] for h in extended] == [3, 4, 5]
    assert [h["lr"] for h in extended] == pytest.approx(want, rel=1e-12) and min(want) > 1e-4
    assert "train.steps (lr decay steps): 2 -> 5" in capsys.readouterr().out


def test_run_config_is_saved_and_a_resume_with_another_model_is_refused(tmp_path, capsys):
    """``config.yaml`` in the run directory and in every ``step_N/`` (covered by the manifest) reads
    back as the run's config; a resume lists every changed key and that the new config wins; a resume
    whose model differs is refused before anything loads, naming the fields; the run says what it
    builds before step 1, each checkpoint it saves, and how it ended."""
    from nemo_opdlm.recipes.lookup import resolve
    from nemo_opdlm.checkpoint.manifest import damage

    cfg = make_run(str(tmp_path), "train.steps=2", "train.save_every=1")
    capsys.readouterr()
    train(cfg)
    out = capsys.readouterr().out
    run = cfg.train.save_dir
    for where in (run, os.path.join(run, "step_0000001"), os.path.join(run, "step_0000002")):
        assert resolve(os.path.join(where, "config.yaml")) == cfg, where
    assert damage(os.path.join(run, "step_0000002")) is None
    with open(os.path.join(run, "step_0000002", "manifest.json")) as f:
        assert "config.yaml" in f.read()
    lines = [line for line in out.splitlines() if line.startswith("[opdlm]")]
    assert lines[0].startswith("[opdlm] run tiny: distill.method=opdlm, 2 steps, TP=1 PP=1 DP=1; building:")
    assert lines[1].startswith("[opdlm] built in ") and "step 1 of 2 starts" in lines[1]
    assert [line.split(" (")[0] for line in lines if "saved checkpoint" in line] == [
        f"[opdlm] saved checkpoint {run}/step_0000001", f"[opdlm] saved checkpoint {run}/step_0000002"]
    assert lines[-1].startswith("[opdlm] completed: steps 1-2 of 2 in ") and f"last checkpoint {run}/step_0000002" in lines[-1]

    with pytest.raises(ConfigError, match=r"cannot resume from .*step_0000002: the config's model differs .*"
                                          r"model.rotary_base: 10000.0 -> 500.0; model.norm_eps: 1e-06 -> 1e-05"):
        train(make_run(str(tmp_path), "train.steps=3", "model.rotary_base=500", "model.norm_eps=1e-5"))
    capsys.readouterr()
    train(make_run(str(tmp_path), "train.steps=3", "train.save_every=1", "optim.lr=2e-3", "rollout.threshold=0.8"))
    out = capsys.readouterr().out
    assert (f"resuming with a config that differs from {run}/step_0000002/config.yaml: rollout.threshold: 0.9 -> "
            "0.8; optim.lr: 0.001 -> 0.002; train.steps: 2 -> 3. This run's config wins") in out, out
    assert resolve(os.path.join(run, "config.yaml")).optim.lr == 2e-3  # the run directory's: the latest start's


def test_exit_interval_runs_a_schedule_in_segments_that_resume_exactly(tmp_path):
    """``train.exit_interval=2`` of 5 steps: runs that stop after steps 2 and 4 with a checkpoint
    (status ``exited``), each started again to resume, then the last step; the losses and the
    learning rates are the uninterrupted run's (one schedule over all 5 steps)."""
    whole = train(make_run(str(tmp_path / "whole"), "train.steps=5", f"train.save_dir={tmp_path / 'a'}"))
    seg = make_run(str(tmp_path / "whole"), "train.steps=5", "train.exit_interval=2", f"train.save_dir={tmp_path / 'b'}")
    runs = [train(seg) for _ in range(3)]
    assert [(r["status"], r["step"]) for r in runs] == [("exited", 2), ("exited", 4), ("completed", 5)]
    assert sorted(os.listdir(tmp_path / "b")).count("step_0000002") == 1
    history = [h for r in runs for h in r["history"]]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert losses(history) == losses(whole["history"])
    assert [h["lr"] for h in history] == [h["lr"] for h in whole["history"]]
    with pytest.raises(ConfigError, match="train.exit_interval stops the run to be resumed: set train.save_dir"):
        make_run(str(tmp_path / "whole"), "train.exit_interval=2", "train.save_dir=null")


def test_a_conversion_continues_at_a_larger_block(tmp_path, monkeypatch, capsys):
    """Two steps at block 4, then the run resumed at block 8 (``recipes.base.continued_at_block``):
    the resumed steps' rollouts are decoded on block 8's schedule, their states mask and attend in
    blocks of 8, and the checkpoint records block 8 (an evaluation or export reads it from there);
    the same resume that also changes a model field is refused, naming it."""
    from nemo_opdlm.checkpoint.format import read_checkpoint_meta
    from nemo_opdlm.models.masks import NOISY
    from nemo_opdlm.recipes.base import continued_at_block

    seen = []
    real = train_step.step_batch

    def record(cfg, resp, *args, **kwargs):
        out = real(cfg, resp, *args, **kwargs)
        seen.append((resp.schedule.block_size, out.rows["meta"]))
        return out

    monkeypatch.setattr(train_step, "step_batch", record)
    first = make_run(str(tmp_path), "train.steps=2", "rollout.max_length=16", "rollout.min_length=16")
    train(first)
    later = continued_at_block(first, name="tiny_b8", block_size=8, steps=4)
    with pytest.raises(ConfigError, match=r"model differs .*model.rotary_base: 10000.0 -> 500.0"):
        train(dataclasses.replace(later, model=later.model.replace(rotary_base=500.0)))
    capsys.readouterr()
    run = train(later)
    assert (run["status"], run["step"]) == ("completed", 4)
    assert "diffusion.block_size: 4 -> 8" in capsys.readouterr().out
    assert [b for b, _ in seen] == [4, 4, 8, 8]
    for block, meta in seen:
        for row in meta:  # the xt copy's positions share a block id per block: block_size of them
            counts = torch.unique(row[0][row[1] == NOISY], return_counts=True)[1]
            assert counts.max().item() == block, (block, counts)
    step4 = read_checkpoint_meta(os.path.join(first.train.save_dir, "step_0000004"))
    step2 = read_checkpoint_meta(os.path.join(first.train.save_dir, "step_0000002"))
    assert (step2["diffusion"]["block_size"], step4["diffusion"]["block_size"]) == (4, 8)
