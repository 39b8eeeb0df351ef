"""What stops or refuses a run: non-finite losses, teacher weights and gradient norms, an infinite
learning rate, bad inputs, and no library warnings on a CLI run."""

import math
import os
import subprocess

import pytest

from nemo_opdlm.config import ConfigError, dump_yaml
from nemo_opdlm.data.prompts import DataError
from nemo_opdlm.training import step as train_step
from nemo_opdlm.training.loop import NonFiniteLossError, train
from tests.train_fixtures import ENV, cli_cmd, make_run


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

    def build(cfg, parallel, teacher_parallel=None, resume_from=None):
        s = real(cfg, parallel, teacher_parallel, resume_from)
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
    from nemo_opdlm.checkpoint.manifest import damage

    fresh = make_run(str(tmp_path), "optim.lr=inf", "train.steps=4", "train.save_every=1",
                     f"train.save_dir={tmp_path / 'fresh'}")
    with pytest.raises(NonFiniteStateError, match=r"not saving step 1: .*NaN/inf \(weight .*no checkpoint is written"):
        train(fresh)
    assert not [n for n in os.listdir(fresh.train.save_dir) if "step_" in n or n == "latest"]

    train(make_run(str(tmp_path), "train.steps=1", "optim.warmup_steps=0"))  # a good checkpoint at step 1
    run = tmp_path / "run"
    with pytest.raises(NonFiniteStateError, match=r"not saving step 2: .*NaN/inf \(weight .*"
                                                  r"the last good checkpoint step_0000001 stays latest"):
        train(make_run(str(tmp_path), "optim.lr=inf", "train.steps=4", "train.save_every=1"))
    assert (run / "latest").read_text().strip() == "step_0000001"
    assert [n for n in os.listdir(run) if "step_" in n] == ["step_0000001"]  # nothing of step 2, staged or not
    assert damage(str(run / "step_0000001")) is None


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


def test_cli_run_prints_no_known_library_warnings(tmp_path):
    """``opdlm train`` without PYTHONWARNINGS: megatron-core's Transformer Engine / Apex notices and
    its deprecation notices are filtered in the process (18 lines reached stderr before)."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_yaml(make_run(str(tmp_path), "train.steps=1", "optim.warmup_steps=0", "train.save_dir=null")))
    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run(cli_cmd(str(cfg_path)), env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "warnings.warn" not in out.stderr, out.stderr
    assert "[opdlm] completed: steps 1-1 of 1" in out.stdout
