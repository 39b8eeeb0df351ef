"""The trainer end to end on a tiny Qwen3: methods, exact resume after SIGKILL, TP/PP parity,
micro-batch invariance, a falling KL, and bad inputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nemo_opdlm.config import ConfigError, dump_yaml
from nemo_opdlm.data.prompts import DataError
from nemo_opdlm.training import step as train_step
from nemo_opdlm.training.loop import NonFiniteLossError, train
from tests.dist import ROOT, torchrun
from tests.convert_models import save_hf
from tests.train_fixtures import make_run

ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def losses(history):
    return [h["loss"] for h in history]


def read_metrics(run_dir):
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row["loss"]  # a resumed run's lines replace the killed run's
    return by_step


@pytest.mark.parametrize("method", ["opdlm", "random_mask", "off_policy", "sft", "ar"])
def test_every_method_trains(tmp_path, method):
    cfg = make_run(str(tmp_path), f"distill.method={method}", "train.save_dir=null", "train.steps=2")
    result = train(cfg)
    assert result["status"] == "completed" and len(result["history"]) == 2
    # the logged lr is the one the step trained at: 0 at step 1 (warm-up from 0), the peak at step 2
    assert [h["lr"] for h in result["history"]] == [0.0, cfg.optim.lr]
    for h in result["history"]:
        assert math.isfinite(h["loss"]) and h["loss"] > 0 and h["train/loss_tokens"] > 0
        assert math.isfinite(h["grad_norm"])
    if method in ("opdlm", "random_mask"):
        assert result["history"][0]["rollout/tokens_generated"] > 0


def test_shifted_student_trains_and_its_checkpoint_says_so(tmp_path):
    """``diffusion.shift_logits`` trains (rollouts and loss on the shifted columns), is recorded in the
    checkpoint's diffusion metadata, and evaluation's loader reads it back. The checkpoint carries the
    teacher's HF config and the tokenizer, so evaluation needs no tokenizer argument."""
    from nemo_opdlm.convert.hf_config import read_hf_config
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    cfg = make_run(str(tmp_path), "diffusion.shift_logits=true", "train.steps=2", "train.save_every=2")
    result = train(cfg)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
    ckpt = os.path.join(cfg.train.save_dir, "step_0000002")
    meta = json.load(open(os.path.join(ckpt, "opdlm_convert.json")))
    assert meta["diffusion"] == {"block_size": 4, "mask_token_id": 99, "shift_logits": True,
                                 "block_grid": cfg.diffusion.block_grid}
    assert meta["step"] == 2 and meta["hf_config"] == read_hf_config(cfg.init.teacher_hf)
    assert os.path.isfile(os.path.join(ckpt, "hf_assets", "tokenizer.json"))
    with runtime(ParallelLayout()) as rt:
        loaded = load_model(rt.ctx, ckpt=ckpt)  # the tokenizer from the checkpoint's own hf_assets
        assert loaded.shift_logits is True and loaded.block_size == 4 and loaded.mask_token_id == 99
        assert loaded.tokenizer.get_vocab() == load_model(rt.ctx, ckpt=ckpt, tokenizer=cfg.init.teacher_hf).tokenizer.get_vocab()
        assert load_model(rt.ctx, ckpt=ckpt, tokenizer=cfg.init.teacher_hf, shift_logits=False).shift_logits is False
        from nemo_opdlm.convert.mcore_to_hf import export_checkpoint

        out = str(tmp_path / "exported")  # no hf_source: the checkpoint's own config and tokenizer
        export_checkpoint(ckpt, out, rt.ctx)
        exported = json.load(open(os.path.join(out, "config.json")))
        assert exported["mask_token_id"] == 99 and exported["shift_logits"] is True
        assert os.path.isfile(os.path.join(out, "tokenizer.json"))
        generation = json.load(open(os.path.join(out, "generation_config.json")))  # EOS ids: generate stops
        assert generation["eos_token_id"] is not None and generation["block_size"] == 4
        assert os.path.isfile(os.path.join(out, "README.md"))


def test_absolute_grid_trains_is_recorded_and_other_grids_are_refused(tmp_path, capsys):
    """``diffusion.block_grid=absolute`` trains (its rows framed: some prompts here leave 1-3 tokens
    in the first block), is recorded in the checkpoint, and is what evaluation decodes on; decoding
    on the other grid is refused unless asked for, and so is a resume at the other grid, naming both.
    A checkpoint saved before the setting existed reads as 'response', and says so."""
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    framed = []
    real = train_step.on_grid

    def spy(*args):
        out = real(*args)
        framed.append(out.given)
        return out

    import unittest.mock as mock
    cfg = make_run(str(tmp_path), "diffusion.block_grid=absolute", "diffusion.shift_logits=true", "train.steps=2",
                   "train.save_every=2")
    with mock.patch.object(train_step, "on_grid", spy):
        result = train(cfg)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
    assert any(g is not None and g.any() for g in framed)  # heads were framed and trained around
    ckpt = os.path.join(cfg.train.save_dir, "step_0000002")
    meta_path = os.path.join(ckpt, "opdlm_convert.json")
    assert json.load(open(meta_path))["diffusion"]["block_grid"] == "absolute"
    with runtime(ParallelLayout()) as rt:
        loaded = load_model(rt.ctx, ckpt=ckpt)
        assert loaded.block_grid == "absolute" and loaded.diffusion.block_grid == "absolute" and loaded.note is None
        with pytest.raises(ConfigError, match=r"trained on the 'absolute' block grid, not 'response' \(--block-grid\)"):
            load_model(rt.ctx, ckpt=ckpt, block_grid="response")
        assert load_model(rt.ctx, ckpt=ckpt, block_grid="response", allow_grid_mismatch=True).block_grid == "response"
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_0000002: it was trained on the 'absolute' "
                                          r"block grid and the config asks for 'response' \(diffusion.block_grid\)"):
        train(make_run(str(tmp_path), "diffusion.block_grid=response", "diffusion.shift_logits=true",
                       "train.steps=3"))
    # saved before the setting existed: no block_grid in the metadata (its manifest rewritten to match)
    from nemo_opdlm.convert.dist_checkpoint import write_manifest

    meta = json.load(open(meta_path))
    del meta["diffusion"]["block_grid"]
    json.dump(meta, open(meta_path, "w"))
    write_manifest(ckpt)
    with runtime(ParallelLayout()) as rt:
        legacy = load_model(rt.ctx, ckpt=ckpt)
    assert legacy.block_grid == "response" and "records no diffusion.block_grid" in legacy.note


def test_static_rows_cosine_curriculum_and_domain_caps(tmp_path):
    """rollout.static_fraction, the cosine curriculum and per-domain caps reach the rollouts: capped
    rows never produce more tokens than their domain's cap, the others follow the curriculum."""
    prompts = tmp_path / "domains.jsonl"
    rows = [{"prompt": f"w{10 + i} w{20 + i}", "domain": "short" if i % 2 else "long"} for i in range(8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_run(str(tmp_path), f"data.path={prompts}", "data.response_field=null", "data.domain_field=domain",
                   "rollout.max_length_by_domain={short: 4}", "rollout.static_fraction=0.5",
                   "rollout.curriculum=cosine", "train.save_dir=null", "train.steps=2")
    seen = []
    real = train_step.get_responses

    def spy(cfg_, batch, *args):
        resp = real(cfg_, batch, *args)
        seen.append((list(batch.domains), resp.valid.sum(-1).tolist(), resp.tokens.shape[1]))
        return resp

    import unittest.mock as mock
    with mock.patch.object(train_step, "get_responses", spy):
        history = train(cfg)["history"]
    assert len(seen) == 2 and all(math.isfinite(h["loss"]) for h in history)
    for domains, lengths, width in seen:
        assert all(n <= 4 for d, n in zip(domains, lengths) if d == "short")
        assert any(n > 4 for d, n in zip(domains, lengths) if d == "long") or width <= 8
    # the cosine ramp from 8 to 16 over 2 steps, in whole blocks of 4: 8 at step 0, 12 at step 1
    assert [h["rollout/length_limit"] for h in history] == [8.0, 12.0]


def test_off_policy_teacher_rollouts_and_topk(tmp_path):
    cfg = make_run(str(tmp_path), "distill.method=off_policy", "data.response_field=null", "distill.top_k=8",
                   "train.save_dir=null", "train.steps=1")
    h = train(cfg)["history"][0]
    assert h["rollout/tokens_generated"] > 0 and math.isfinite(h["loss"])
    # 4 rows [prompt | x0 | xt] padded to the longest: the real tokens are fewer, and at least x0 and xt
    ratio = h["throughput/useful_tokens_per_s"] / h["throughput/tokens_per_s"]
    assert 2 * h["rollout/tokens_generated"] / (4 * (16 + 2 * 8)) <= ratio < 1, ratio


def test_microbatch_count_does_not_change_the_step(tmp_path):
    a = train(make_run(str(tmp_path), "train.micro_batch_size=1", "train.save_dir=null"))
    b = train(make_run(str(tmp_path), "train.micro_batch_size=4", "train.save_dir=null"))
    for x, y in zip(losses(a["history"]), losses(b["history"])):
        assert abs(x - y) <= 1e-6 * max(1.0, abs(x)), (losses(a["history"]), losses(b["history"]))


@pytest.mark.parametrize("overrides", [("distill.method=opdlm",), ("diffusion.shift_logits=true",),
                                       ("distill.method=sft", "distill.top_k=8"),
                                       ("diffusion.shift_logits=true", "diffusion.block_grid=response")])
def test_packed_rows_do_not_change_the_step(tmp_path, overrides):
    """``train.pack_tokens`` (rows of up to 16 + 2 x 16 tokens, and 3 more on the absolute grid, packed
    into 51-token sequences) trains the same losses as padded micro-batches of two rows, step after
    step, on both block grids."""
    a = train(make_run(str(tmp_path), *overrides, "train.save_dir=null"))
    b = train(make_run(str(tmp_path), *overrides, "train.pack_tokens=51", "train.save_dir=null"))
    for x, y in zip(losses(a["history"]), losses(b["history"])):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (losses(a["history"]), losses(b["history"]))
    assert [h["train/loss_tokens"] for h in a["history"]] == [h["train/loss_tokens"] for h in b["history"]]


def test_kl_falls_over_50_steps(tmp_path):
    cfg = make_run(str(tmp_path), "train.steps=50", "train.save_dir=null", "train.log_every=10",
                   "optim.lr=3e-3", "optim.min_lr=1e-3", "rollout.temperature=0", "rollout.mode=static")
    kl = [h["kl"] for h in train(cfg)["history"]]
    first, last = sum(kl[:10]) / 10, sum(kl[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    thirds = [sum(kl[i:i + 16]) / 16 for i in (0, 17, 34)]
    assert thirds[0] > thirds[1] > thirds[2], thirds


def _cli(cfg_path, *extra):
    return [sys.executable, "-m", "nemo_opdlm.cli", "train", "--recipe", cfg_path, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    cfg = make_run(str(tmp_path), "train.steps=6", "train.save_every=1")
    straight = tmp_path / "straight.yaml"
    straight.write_text(dump_yaml(cfg))
    subprocess.run(_cli(str(straight), "train.save_dir=" + str(tmp_path / "a")), env=ENV, check=True,
                   capture_output=True, timeout=300)
    want = read_metrics(tmp_path / "a")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    run_b = tmp_path / "b"
    proc = subprocess.Popen(_cli(str(straight), "train.save_dir=" + str(run_b)), env=ENV,
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
    done = subprocess.run(_cli(str(straight), "train.save_dir=" + str(run_b)), env=ENV, check=True,
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
    first = subprocess.Popen(_cli(str(recipe)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(cfg.train.save_dir, ".opdlm.lock")
        deadline = time.time() + 120
        while not os.path.exists(lock) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert os.path.exists(lock), "the first run never took the lock"
        second = subprocess.run(_cli(str(recipe)), env=ENV, capture_output=True, text=True, timeout=120)
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
    from nemo_opdlm.training.checkpoint import damage

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
    proc = subprocess.Popen(_cli(str(path)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 2/200" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "pre-emption signal: checkpoint saved" in out
    assert (tmp_path / "run" / "latest").read_text().strip().startswith("step_")


# --- pre-emption under the signals a scheduler sends (Slurm signals every process of the job step,
# torchrun's agent a worker's process group): each ends in a checkpoint, exit 0, and an exact resume

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
    subprocess.run(_cli(str(recipe), f"train.save_dir={base / 'straight'}"), env=ENV, check=True,
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
    proc = _start(_cli(str(recipe), f"train.save_dir={run}"))
    _read_until(proc, f"step 3/{SIGNAL_STEPS}")
    os.killpg(proc.pid, signal.SIGTERM)
    assert _stopped_then_resumed(proc, run, want, _cli(str(recipe), f"train.save_dir={run}")) >= 3


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
    assert _stopped_then_resumed(proc, run, want, _cli(str(recipe), f"train.save_dir={run}")) == 2


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


def _run_layout(tmp_dir, layout, name, *extra):
    rank = int(os.environ["RANK"])
    result = train(make_run(tmp_dir, layout, "train.save_dir=null", "train.steps=2", *extra))
    got = {"loss": [h.get("loss") for h in result["history"]],
           "grad_norm": [h["grad_norm"] for h in result["history"]]}
    if got["loss"][0] is not None:
        with open(os.path.join(tmp_dir, f"{name}_{rank}.json"), "w") as f:
            json.dump(got, f)


def close(got, want, tol):
    assert len(got) == len(want) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(got, want)), (got, want)


def worker_tp2(tmp_dir):
    _run_layout(tmp_dir, "parallel.tp=2", "tp2")


def worker_pp2(tmp_dir):
    _run_layout(tmp_dir, "parallel.pp=2", "pp2")


SHIFTED = ("diffusion.shift_logits=true", "rollout.static_fraction=0.5")
"""A shifted student (logits read at scattered columns) with half its rollout rows decoded statically."""


def worker_tp2_shifted(tmp_dir):
    _run_layout(tmp_dir, "parallel.tp=2", "tp2s", *SHIFTED)


def worker_pp2_shifted(tmp_dir):
    _run_layout(tmp_dir, "parallel.pp=2", "pp2s", *SHIFTED)


@pytest.mark.distributed
@pytest.mark.parametrize("shifted", [False, True])
def test_tp2_and_pp2_steps_equal_single(tmp_path, shifted):
    extra, suffix = (SHIFTED, "_shifted") if shifted else ((), "")
    history = train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=2", *extra))["history"]
    ref, ref_norm = losses(history), [h["grad_norm"] for h in history]
    torchrun(f"tests.e2e.test_train:worker_tp2{suffix}", 2, tmp_path, timeout=300)
    torchrun(f"tests.e2e.test_train:worker_pp2{suffix}", 2, tmp_path, timeout=300)
    tag = "s" if shifted else ""
    tp = [json.load(open(tmp_path / f"tp2{tag}_{r}.json")) for r in (0, 1)]
    assert tp[0] == tp[1]
    pp = json.load(open(tmp_path / f"pp2{tag}_1.json"))  # the last stage holds the loss
    for got in (tp[0], pp):
        close(got["loss"], ref, 1e-5)
        close(got["grad_norm"], ref_norm, 1e-4)


def worker_dp2(tmp_dir):
    _run_layout(tmp_dir, "distill.method=ar", "dp2")


@pytest.mark.distributed
def test_dp2_step_equals_dp1(tmp_path):
    """Same global batch on 2 data-parallel ranks: same losses, so the same updates (the AR method has
    no sampling, so both runs see identical rows; DDP averaging and loss scaling must cancel)."""
    history = train(make_run(str(tmp_path), "distill.method=ar", "train.save_dir=null", "train.steps=2"))["history"]
    torchrun("tests.e2e.test_train:worker_dp2", 2, tmp_path, timeout=300)
    got = json.load(open(tmp_path / "dp2_0.json"))
    assert got == json.load(open(tmp_path / "dp2_1.json"))  # the metrics are reduced over DP
    close(got["loss"], losses(history), 1e-6)
    close(got["grad_norm"], [h["grad_norm"] for h in history], 1e-5)  # Adam hides a gradient scale; the norm does not


def worker_dp2_packed(tmp_dir):
    counts = []
    real = train_step.make_microbatches

    def counted(*args):
        out = real(*args)
        counts.append(len(out[0]))
        return out

    train_step.make_microbatches = counted
    if os.environ["RANK"] == "0":  # rank 0 packs one row per sequence: a valid packing, more micro-batches
        from nemo_opdlm.distill import packing
        packing.plan_packing = lambda segs, budget: [[seg] for seg in segs]
    _run_layout(tmp_dir, "distill.method=sft", "dp2pack", "train.pack_tokens=51", "train.steps=3")
    with open(os.path.join(tmp_dir, f"dp2pack_counts_{os.environ['RANK']}.json"), "w") as f:
        json.dump(counts, f)


def worker_dp2_padded(tmp_dir):
    _run_layout(tmp_dir, "distill.method=sft", "dp2pad", "train.steps=3")


@pytest.mark.distributed
def test_dp2_packed_steps_equal_padded(tmp_path):
    """Packed rows at DP=2, where each rank packs its own rows into its own number of micro-batches
    (the loss scale follows the local count): the same losses and gradient norms as padded rows."""
    torchrun("tests.e2e.test_train:worker_dp2_padded", 2, tmp_path, timeout=300)
    torchrun("tests.e2e.test_train:worker_dp2_packed", 2, tmp_path, timeout=300)
    want, got = (json.load(open(tmp_path / f"{name}_0.json")) for name in ("dp2pad", "dp2pack"))
    assert got == json.load(open(tmp_path / "dp2pack_1.json"))
    close(got["loss"], want["loss"], 1e-5)
    close(got["grad_norm"], want["grad_norm"], 1e-4)
    counts = [json.load(open(tmp_path / f"dp2pack_counts_{r}.json")) for r in (0, 1)]
    assert counts == [[2, 2, 2], [1, 1, 1]], counts  # two rows per rank: apart on rank 0, together on rank 1


def test_nonfinite_loss_is_skipped_then_fatal(tmp_path, monkeypatch):
    real = train_step.make_loss_fn
    calls = {"n": 0}

    def poisoned(bad_steps, *args):
        fn = real(*args)
        calls["n"] += 1
        step = calls["n"]

        def wrapped(logits, batch):
            loss, metrics = fn(logits, batch)
            if step in bad_steps:
                loss = loss * float("nan")
                metrics = dict(metrics, loss=metrics["loss"] * float("nan"))
            return loss, metrics
        return wrapped

    monkeypatch.setattr(train_step, "make_loss_fn", lambda *args: poisoned({2}, *args))
    history = train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=3"))["history"]
    assert math.isnan(history[1]["loss"]) and math.isnan(history[1]["grad_norm"])
    assert math.isfinite(history[2]["loss"])

    calls["n"] = 0
    monkeypatch.setattr(train_step, "make_loss_fn", lambda *args: poisoned({1, 2, 3, 4}, *args))
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps.*non-finite loss"):
        train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=4", "train.max_nonfinite_in_row=2"))


def _watch_models(monkeypatch, poison_teacher=False):
    """Patch the trainer's ``build``: remember the student's parameters with their initial values,
    and optionally put one NaN into a teacher weight (the first attention projection of layer 0)."""
    import torch

    from nemo_opdlm.training import loop
    real, seen = loop.build, {}

    def build(cfg, parallel, teacher_parallel=None):
        s = real(cfg, parallel, teacher_parallel)
        if poison_teacher:
            w = next(p for n, p in s.teacher[0].named_parameters() if "linear_qkv.weight" in n)
            with torch.no_grad():
                w.view(-1)[0] = float("nan")
        seen["student"] = [(p, p.detach().clone()) for chunk in s.student for p in chunk.parameters()]
        return s

    monkeypatch.setattr(loop, "build", build)
    return seen


def _unchanged(seen):
    import torch
    return all(torch.equal(p.detach(), p0) for p, p0 in seen["student"])


def test_nan_teacher_weight_is_a_skipped_step_then_fatal(tmp_path, monkeypatch, capsys):
    """One NaN in a teacher weight makes every teacher log-prob NaN, which the KL's ``p_T > 0`` test
    turned into loss 0, kl 0: the student trained on it (grad_norm nan, then every weight NaN). Each
    such step is now skipped, said so, and the run stops after train.max_nonfinite_in_row."""
    seen = _watch_models(monkeypatch, poison_teacher=True)
    history = train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=2",
                             "train.max_nonfinite_in_row=3"))["history"]
    out = capsys.readouterr().out
    assert "step 1: non-finite teacher targets" in out and "update skipped (2 in a row)" in out, out
    assert all(math.isnan(h["grad_norm"]) for h in history)
    assert _unchanged(seen)  # no update was applied
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps, the last at step 3: "
                                                 "non-finite teacher targets"):
        train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=3", "train.max_nonfinite_in_row=3"))


def test_nonfinite_grad_norm_skips_the_update(tmp_path, monkeypatch, capsys):
    """A finite loss whose gradients are NaN: megatron-core's clipping let the NaN norm through and
    the update made every weight NaN (even at lr 0). Now the update is skipped and counted."""
    import torch

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    real = train_step.make_loss_fn

    def nan_grads(*args):
        fn = real(*args)
        return lambda logits, batch: (lambda out: (NanGrad.apply(out[0]), out[1]))(fn(logits, batch))

    monkeypatch.setattr(train_step, "make_loss_fn", nan_grads)
    seen = _watch_models(monkeypatch)
    history = train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=2",
                             "train.max_nonfinite_in_row=3"))["history"]
    assert "step 2: non-finite gradient norm (nan), update skipped (2 in a row)" in capsys.readouterr().out
    assert all(math.isfinite(h["loss"]) and math.isnan(h["grad_norm"]) for h in history)
    assert _unchanged(seen)
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps.*non-finite gradient norm"):
        train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=2", "train.max_nonfinite_in_row=2"))


def test_infinite_lr_stops_without_writing_a_nonfinite_checkpoint(tmp_path):
    """optim.lr=inf makes the first update's weights NaN (the warm-up's lr is 0 * inf). The run saved
    them (every weight and Adam moment NaN) and went on; now each save checks the state first: a run
    with no checkpoint stops without writing one, and a resumed run stops with its last good
    checkpoint still latest and intact."""
    from nemo_opdlm.errors import NonFiniteStateError
    from nemo_opdlm.training.checkpoint import damage

    fresh = make_run(str(tmp_path), "optim.lr=inf", "train.steps=4", "train.save_every=1",
                     f"train.save_dir={tmp_path / 'fresh'}")
    with pytest.raises(NonFiniteStateError, match=r"not saving step 1: .*NaN/inf \(weight .*no checkpoint is written"):
        train(fresh)
    assert not [n for n in os.listdir(fresh.train.save_dir) if "step_" in n or n == "latest"]

    train(make_run(str(tmp_path), "train.steps=1"))  # a good checkpoint at step 1
    run = tmp_path / "run"
    with pytest.raises(NonFiniteStateError, match=r"not saving step 2: .*NaN/inf \(weight .*"
                                                  r"the last good checkpoint step_0000001 stays latest"):
        train(make_run(str(tmp_path), "optim.lr=inf", "train.steps=4", "train.save_every=1"))
    assert (run / "latest").read_text().strip() == "step_0000001"
    assert [n for n in os.listdir(run) if "step_" in n] == ["step_0000001"]  # nothing of step 2, staged or not
    assert damage(str(run / "step_0000001")) is None


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


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        train(make_run(str(tmp_path), f"data.path={empty}", "train.save_dir=null"))
    with pytest.raises(DataError):
        train(make_run(str(tmp_path), "data.max_prompt_tokens=1", "train.save_dir=null"))
    with pytest.raises(ConfigError, match="does not exist"):
        train(make_run(str(tmp_path), "init.teacher_hf=null", f"init.teacher_checkpoint={tmp_path}/nope",
                       f"init.tokenizer={tmp_path}/teacher_hf", "train.save_dir=null"))
    other = tmp_path / "other_hf"
    from tests.convert_models import save_hf, save_tokenizer
    save_hf("qwen3", str(other), seed=1)
    save_tokenizer(str(other), vocab=90)  # a different vocabulary
    with pytest.raises(ConfigError, match="different tokenizers"):
        train(make_run(str(tmp_path), f"init.student_hf={other}", "train.save_dir=null"))
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'; did you mean 'train.steps'"):
        make_run(str(tmp_path), "train.stepz=3")
    with pytest.raises(ConfigError, match="rollout.min_length"):
        make_run(str(tmp_path), "rollout.min_length=0")
    for key, value, words in (("threshold", 0, "in \\(0, 1\\]"), ("threshold", 1.5, "in \\(0, 1\\]"),
                              ("temperature", -1, ">= 0"), ("top_p", 5, "in \\(0, 1\\]"), ("top_k", -2, ">= 0"),
                              ("steps_per_block", 9, r"exceeds the block size \(diffusion.block_size=4\)")):
        with pytest.raises(ConfigError, match=f"rollout.{key}.*{words}"):  # refused before any model is built
            make_run(str(tmp_path), f"rollout.{key}={value}")
    with pytest.raises(ConfigError, match=r"diffusion.mask_token_id=42 is the ordinary token 'w42'.*its mask token \(99\)"):
        train(make_run(str(tmp_path), "diffusion.mask_token_id=42", "train.save_dir=null"))
    with pytest.raises(ConfigError, match="rollout.static_fraction must be in"):
        make_run(str(tmp_path), "rollout.static_fraction=1.5")
    with pytest.raises(ConfigError, match="needs rollout.mode='dynamic'"):
        make_run(str(tmp_path), "rollout.static_fraction=0.5", "rollout.mode=static")
    with pytest.raises(ConfigError, match="rollout.curriculum must be one of"):
        make_run(str(tmp_path), "rollout.curriculum=exp")
    with pytest.raises(ConfigError, match="set data.domain_field"):
        make_run(str(tmp_path), "rollout.max_length_by_domain={math: 8}")
    with pytest.raises(ConfigError, match="max_length_by_domain.math must be an integer >= 1"):
        make_run(str(tmp_path), "rollout.max_length_by_domain={math: 0}", "data.domain_field=domain")


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
    resumed = subprocess.run(_cli(str(recipe), f"train.save_dir={run}", "train.steps=6"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "at step 5" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    for override, message in (("optim.distributed_optimizer=false", "holds distributed optimizer state"),
                              ("parallel.tp=2", "TP=1 x PP=1, and this run is TP=2 x PP=1")):
        cmd = (_torchrun_cmd(recipe, f"train.save_dir={run}", "train.steps=7", override) if "tp" in override
               else _cli(str(recipe), f"train.save_dir={run}", "train.steps=7", override))
        refused = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert message in refused.stdout + refused.stderr, refused.stderr[-2000:]


def test_run_config_is_saved_and_a_resume_with_another_model_is_refused(tmp_path, capsys):
    """``config.yaml`` in the run directory and in every ``step_N/`` (covered by the manifest) reads
    back as the run's config; a resume lists every changed key and that the new config wins; a resume
    whose model differs is refused before anything loads, naming the fields; the run says what it
    builds before step 1, each checkpoint it saves, and how it ended."""
    from nemo_opdlm.recipes.lookup import resolve
    from nemo_opdlm.training.checkpoint import damage

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


def test_cli_run_prints_no_known_library_warnings(tmp_path):
    """``opdlm train`` without PYTHONWARNINGS: megatron-core's Transformer Engine / Apex notices and
    its deprecation notices are filtered in the process (18 lines reached stderr before)."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_yaml(make_run(str(tmp_path), "train.steps=1", "train.save_dir=null")))
    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run(_cli(str(cfg_path)), env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "warnings.warn" not in out.stderr, out.stderr
    assert "[opdlm] completed: steps 1-1 of 1" in out.stdout


def _count_live_targets(monkeypatch_targets):
    """Patch the functions that make teacher targets so that every target tensor is counted while
    it is alive; returns the counter ``{"live", "peak", "made"}``."""
    import weakref

    from nemo_opdlm.teacher import route, stream, targets

    counter = {"live": 0, "peak": 0, "made": 0}
    real = targets.shifted_targets

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        counter["live"] += 1
        counter["made"] += 1
        counter["peak"] = max(counter["peak"], counter["live"])
        weakref.finalize(out.logprobs, lambda: counter.__setitem__("live", counter["live"] - 1))
        return out

    for module in (targets, stream, route):
        monkeypatch_targets(module, "shifted_targets", counted)
    return counter


def worker_pp2_targets(tmp_dir):
    """PP=2, full-vocabulary targets, one step: the live target tensors on this rank. The directory's
    name says how: ``streamed_N`` (the trainer's path) or ``upfront_N`` (every micro-batch's targets
    computed before the student's pass), N micro-batches of the step's 4 prompts."""
    from nemo_opdlm.training import loop as loop_module

    how, n = os.path.basename(tmp_dir).split("_")
    patched = []

    def patch(module, name, value):
        patched.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    counter = _count_live_targets(patch)
    real = loop_module.forward_backward
    patch(loop_module, "forward_backward",
          lambda *a, **k: real(*a, route="before_pass" if how == "upfront" else None, **k))
    _run_layout(tmp_dir, "parallel.pp=2", "targets", "distill.top_k=null", f"train.micro_batch_size={4 // int(n)}",
                "train.steps=1")
    with open(os.path.join(tmp_dir, f"live_targets_{os.environ['RANK']}.json"), "w") as f:
        json.dump(counter, f)


@pytest.mark.distributed
def test_streamed_teacher_targets_do_not_grow_with_the_micro_batch_count(tmp_path):
    """With PP=2 the teacher rides the student's pipeline pass: the last stage holds at most one or
    two micro-batches of (full-vocabulary) targets at a time, at 2 or 4 micro-batches per step,
    where computing them up front holds all of them. Equal losses to PP=1:
    ``test_tp2_and_pp2_steps_equal_single``."""
    got = {}
    for how in ("streamed_2", "streamed_4", "upfront_4"):
        run = tmp_path / how
        run.mkdir()
        torchrun("tests.e2e.test_train:worker_pp2_targets", 2, run, timeout=300)
        got[how] = [json.load(open(run / f"live_targets_{r}.json")) for r in (0, 1)]
    for how, (first, last) in got.items():
        assert first["made"] == 0 and last["made"] == int(how[-1]), (how, got)  # on the last stage only
    assert got["upfront_4"][1]["peak"] == 4, got  # the old path: every micro-batch's targets at once
    assert got["streamed_2"][1]["peak"] == got["streamed_4"][1]["peak"] <= 2, got


def worker_teacher_layout(tmp_dir):
    """One step at DP=2 (student TP=1), the teacher at the layout this directory's name gives
    (``shared``: the student's; ``tp2``/``pp2``: its own), top-k or full-vocabulary targets; every
    micro-batch's targets are computed before the student's pass and saved, with the loss and the
    gradient norm."""
    from nemo_opdlm.training import loop as loop_module

    layout, targets = os.path.basename(tmp_dir).split("_")
    from_ckpt = ("init.teacher_hf=null", f"init.tokenizer={tmp_dir}/teacher_hf",
                 f"init.teacher_checkpoint={os.path.dirname(tmp_dir)}/teacher_ckpt")
    teacher = {"shared": ("parallel.teacher=null",), "tp2": ("parallel.teacher.tp=2",),
               "tp1": ("parallel.teacher.tp=1",), "tp2pp2": ("parallel.teacher.tp=2", "parallel.teacher.pp=2"),
               "pp2": ("parallel.teacher.pp=2",), "tp2ckpt": ("parallel.teacher.tp=2",) + from_ckpt,
               "pp2ckpt": ("parallel.teacher.pp=2",) + from_ckpt}
    top_k = {"topk": "distill.top_k=16", "full": "distill.top_k=null"}
    from nemo_opdlm.teacher.route import BeforePass

    real_fb, real_prepare = loop_module.forward_backward, BeforePass.prepare
    saved = []

    def prepare(self, rows, microbatches):
        real_prepare(self, rows, microbatches)
        saved.append([{k: mb[k] for k in ("t_logprobs", "t_ids") if k in mb} for mb in microbatches])

    loop_module.forward_backward = lambda *a, **k: real_fb(*a, **dict(k, route="before_pass"))
    BeforePass.prepare = prepare
    student = ("parallel.tp=2",) if int(os.environ["WORLD_SIZE"]) == 4 else ()  # 4 ranks: student TP=2 x DP=2
    _run_layout(tmp_dir, "distill.method=opdlm", "run", *student, *teacher[layout], top_k[targets], "train.steps=2",
                "train.micro_batch_size=1")
    torch.save(saved, os.path.join(tmp_dir, f"targets_{os.environ['RANK']}.pt"))


@pytest.mark.distributed
@pytest.mark.parametrize("targets", ["topk", "full"])
def test_teacher_with_its_own_layout_gives_the_same_step(tmp_path, targets):
    """A teacher at TP=2, then at PP=2, beside a student at TP=1 x DP=2 on the same 2 ranks: its inputs
    travel to the one teacher replica and its targets back to each student replica (full-vocabulary
    targets re-cut from the teacher's 2 vocabulary shards to the student's one). The targets, losses
    and gradient norms equal those of the teacher sharing the student's layout (TP=1 x DP=2), which reads
    the HF weights. ``*ckpt`` (the top-k case): both models read a megatron-core checkpoint saved at
    TP=1, each at its own layout."""
    from tests.e2e.test_bad_inputs import tool_main

    save_hf("qwen3", str(tmp_path / "hf"), seed=0)  # make_run's teacher
    assert tool_main("import_hf")(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "teacher_ckpt")]) == 0
    got = {}
    for layout in ("shared",) + (("tp2ckpt", "pp2ckpt") if targets == "topk" else ("tp2", "pp2")):
        run = tmp_path / f"{layout}_{targets}"
        run.mkdir()
        torchrun("tests.e2e.test_train:worker_teacher_layout", 2, run, timeout=300)
        got[layout] = ([json.load(open(run / f"run_{r}.json")) for r in (0, 1)],
                       [torch.load(run / f"targets_{r}.pt") for r in (0, 1)])
    (want, want_targets) = got.pop("shared")
    assert want[0] == want[1]  # metrics are reduced over DP
    for layout, (metrics, targets_by_rank) in got.items():
        close(metrics[0]["loss"], want[0]["loss"], 1e-5)
        close(metrics[0]["grad_norm"], want[0]["grad_norm"], 1e-4)
        for rank in (0, 1):  # each student replica's own rows: the student rank holds its replica's targets
            steps, want_steps = targets_by_rank[rank], want_targets[rank]
            assert len(steps) == len(want_steps) == 2
            for mbs, want_mbs in zip(steps, want_steps):
                assert len(mbs) == len(want_mbs) == 2
                for mb, want_mb in zip(mbs, want_mbs):
                    assert sorted(mb) == sorted(want_mb), (layout, sorted(mb))
                    assert mb["t_logprobs"].shape == want_mb["t_logprobs"].shape
                    finite = want_mb["t_logprobs"].isfinite()
                    assert torch.equal(finite, mb["t_logprobs"].isfinite()), layout  # padding: -inf on both
                    torch.testing.assert_close(mb["t_logprobs"][finite], want_mb["t_logprobs"][finite],
                                               atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_teacher_layouts_on_four_ranks_recut_full_vocabulary_targets(tmp_path):
    """Student TP=2 x DP=2 on 4 ranks, full-vocabulary targets. Teacher TP=1 x DP=4 (more teacher
    replicas than student ones: two serve, two idle; each whole-vocabulary target cut into the
    student's 2 shards) and teacher TP=2 x PP=2 (one replica serving both student replicas from its
    last stage, ranks 2 and 3) give the targets, losses and gradient norms of the teacher sharing the
    student's TP=2 x DP=2."""
    got = {}
    for layout in ("shared", "tp1", "tp2pp2"):
        run = tmp_path / f"{layout}_full"
        run.mkdir()
        torchrun("tests.e2e.test_train:worker_teacher_layout", 4, run, timeout=600)
        got[layout] = ([json.load(open(run / f"run_{r}.json")) for r in range(4) if (run / f"run_{r}.json").exists()],
                       [torch.load(run / f"targets_{r}.pt") for r in range(4)])
    want, want_targets = got.pop("shared")
    for layout, (metrics, targets_by_rank) in got.items():
        close(metrics[0]["loss"], want[0]["loss"], 1e-5)
        close(metrics[0]["grad_norm"], want[0]["grad_norm"], 1e-4)
        for rank in range(4):  # ranks 0, 1: student replica 0's two vocabulary shards; 2, 3: replica 1's
            for mbs, want_mbs in zip(targets_by_rank[rank], want_targets[rank], strict=True):
                for mb, want_mb in zip(mbs, want_mbs, strict=True):
                    finite = want_mb["t_logprobs"].isfinite()
                    assert torch.equal(finite, mb["t_logprobs"].isfinite()), (layout, rank)
                    torch.testing.assert_close(mb["t_logprobs"][finite], want_mb["t_logprobs"][finite],
                                               atol=1e-5, rtol=1e-5)


def worker_own_layout_stream(tmp_dir):
    """One step at student TP=1 x DP=2, 8 prompts, full-vocabulary targets from a teacher at its own
    layout; the directory's name ``{how}_{N}_{teacher}`` says how the targets come (``stream``: the
    trainer's path, exchanged per micro-batch inside the loss; ``first``: all before the pass), in N
    micro-batches per rank, from a teacher at ``tp2`` or ``pp2``. Saves the metrics and the live
    count of exchanged target tensors on this rank."""
    import weakref

    from nemo_opdlm.training import loop as loop_module

    how, n, layout = os.path.basename(tmp_dir).split("_")
    counter = {"live": 0, "peak": 0, "made": 0}
    from nemo_opdlm.teacher import route as route_module

    real_exchange, real_fb = route_module.exchange_targets, loop_module.forward_backward

    def counted(*args, **kwargs):
        out = real_exchange(*args, **kwargs)
        for target in out:
            counter["live"] += 1
            counter["made"] += 1
            counter["peak"] = max(counter["peak"], counter["live"])
            weakref.finalize(target.logprobs, lambda: counter.__setitem__("live", counter["live"] - 1))
        return out

    route_module.exchange_targets = counted
    loop_module.forward_backward = lambda *a, **k: real_fb(*a, **dict(k, route="before_pass" if how == "first" else None))
    teacher = {"tp2": "parallel.teacher.tp=2", "pp2": "parallel.teacher.pp=2"}[layout]
    _run_layout(tmp_dir, teacher, "run", "distill.top_k=null", "train.prompts_per_step=8",
                f"train.micro_batch_size={4 // int(n)}", "train.steps=1")
    with open(os.path.join(tmp_dir, f"live_targets_{os.environ['RANK']}.json"), "w") as f:
        json.dump(counter, f)


@pytest.mark.distributed
def test_own_teacher_layout_streams_targets_per_micro_batch(tmp_path):
    """A teacher at its own layout beside a one-stage student exchanges each micro-batch's targets
    inside the loss: one target tensor alive at a time on every rank, at 2 or 4 micro-batches per
    rank, where exchanging them before the pass holds all 4; the same loss and gradient norm (and so,
    by ``test_teacher_with_its_own_layout_gives_the_same_step``, those of the shared layout)."""
    got = {}
    for how in ("first_4_tp2", "stream_4_tp2", "stream_2_pp2"):
        run = tmp_path / how
        run.mkdir()
        torchrun("tests.e2e.test_train:worker_own_layout_stream", 2, run, timeout=300)
        got[how] = ([json.load(open(run / f"live_targets_{r}.json")) for r in (0, 1)],
                    json.load(open(run / "run_0.json")))
    for how, (counts, _) in got.items():
        n = int(how.split("_")[1])
        for c in counts:
            assert c["made"] == n and c["live"] == 0, (how, counts)
            assert c["peak"] == (1 if how.startswith("stream") else n), (how, counts)
    want = got.pop("first_4_tp2")[1]
    for how, (_, metrics) in got.items():
        close(metrics["loss"], want["loss"], 1e-5)
        close(metrics["grad_norm"], want["grad_norm"], 1e-4)


PACKED_PP = {"sft": ("distill.method=sft",), "opdlm": ("distill.method=opdlm", "parallel.teacher.pp=2")}
"""Packed rows at PP=2: without a teacher, and with the teacher at its own layout (targets first)."""


def worker_pp2_packed(tmp_dir):
    method = os.path.basename(tmp_dir)
    _run_layout(tmp_dir, "parallel.pp=2", "pp2pack", "train.pack_tokens=51", "train.steps=2", *PACKED_PP[method])


@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(PACKED_PP))
def test_packed_rows_at_pp2_equal_pp1(tmp_path, method):
    """Packed sequences are exactly train.pack_tokens long, so the pipeline's buffers keep one shape:
    at PP=2 the packed steps give PP=1's losses and gradient norms (the teacher, where the method has
    one, at its own layout: its targets are computed before the student's pass)."""
    extra = tuple(o for o in PACKED_PP[method] if not o.startswith("parallel.teacher"))
    want = train(make_run(str(tmp_path), "train.save_dir=null", "train.pack_tokens=51", "train.steps=2",
                          *extra))["history"]
    run = tmp_path / method
    run.mkdir()
    torchrun("tests.e2e.test_train:worker_pp2_packed", 2, run, timeout=300)
    got = json.load(open(run / "pp2pack_1.json"))  # the last stage holds the loss
    close(got["loss"], losses(want), 1e-5)
    close(got["grad_norm"], [h["grad_norm"] for h in want], 1e-4)
