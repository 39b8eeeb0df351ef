"""metrics.jsonl is strict JSON: a skipped step's NaN loss is written as null."""

from __future__ import annotations

import json
import math
import os

import pytest

from nemo_opdlm.training.metrics import json_line


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_null():
    row = _strict(json_line({"step": 3, "loss": math.nan, "grad_norm": math.inf, "kl": 0.25}))
    assert row == {"step": 3, "loss": None, "grad_norm": None, "kl": 0.25}
    assert _strict(json_line({"step": 1, "loss": 1.5})) == {"step": 1, "loss": 1.5}


def test_wandb_run_id_is_stored_in_the_run_dir_and_resumed(tmp_path, monkeypatch):
    """Real wandb, offline: the first run stores its id in the run directory and writes W&B's files
    under it; a second logger on the same directory (a requeued run) continues that run id; without
    the id file (a replaced run) a new id is drawn. Needs the `wandb` package (pip extra: wandb)."""
    wandb = pytest.importorskip("wandb")
    from nemo_opdlm.training.metrics import MetricsLogger
    from nemo_opdlm.checkpoint.run_dir import WANDB_ID

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # anything W&B wrote to the working directory would show here

    def run(first_step: int) -> str:
        log = MetricsLogger(enabled=True, total_steps=4, out_dir=str(tmp_path / "run"), tensorboard_dir=None,
                            wandb_project="opdlm-test", run_name="tiny", config={"optim": {"lr": 1e-3}})
        run_id = log.wandb.id
        for step in (first_step, first_step + 1):
            log.log(step, {"loss": 0.5 / step, "time/step_s": 0.1})
        log.close()
        return run_id

    first = run(1)
    assert (tmp_path / "run" / WANDB_ID).read_text().strip() == first and len(first) == 8
    assert run(3) == first  # resumed: the same W&B run
    offline = sorted(p.name for p in (tmp_path / "run" / "wandb").iterdir() if p.name.startswith("offline-run-"))
    # offline-run-<time>-<id>, with a "-1" suffix when both runs started in the same second
    assert len(offline) == 2 and all(name.split("-")[3] == first for name in offline), offline
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing under the working directory
    (tmp_path / "run" / WANDB_ID).unlink()
    assert run(1) != first
    assert wandb.run is None  # each logger finished its run


def test_progress_lines_say_what_is_built_and_how_the_run_ended():
    from nemo_opdlm.recipes.lookup import load_recipe, resolve
    from nemo_opdlm.training.metrics import describe_run, run_summary

    cfg = load_recipe("tiny:tiny_4l_to_2l_tp1_pp1_2g")
    line = describe_run(cfg, 1, 1, 2)
    assert line.startswith("run tiny_4l_to_2l_tp1_pp1_2g: distill.method=opdlm, 2 steps, TP=1 PP=1 DP=2; building:")
    assert "prompts (data/tiny/train.jsonl)" in line and "teacher 4 x 64 from data/tiny/hf_teacher" in line
    own = resolve("tiny:tiny_4l_to_2l_tp1_pp1_2g", ["parallel.tp=2", "parallel.teacher.tp=1"])
    assert ", TP=2 PP=1 DP=2 (teacher TP=1 PP=1 DP=4); building:" in describe_run(own, 2, 1, 2)
    history = [dict(step=3, loss=0.5, **{"throughput/tokens_per_s": 100.0}),
               dict(step=4, loss=math.nan, **{"throughput/tokens_per_s": 300.0}),
               dict(step=5, loss=0.25, **{"throughput/tokens_per_s": 200.0})]
    done = run_summary("completed", 2, 5, 5, history, 75.0, "/r/step_0000005", "/r")
    # the facts of the run, whatever the wording: status, steps, time, first and last finite loss,
    # the median throughput, where the last checkpoint and the metrics are
    assert done.startswith("completed")
    for fact in ("3-5 of 5", "0:01:15", "0.5 -> 0.25", "200 tokens/s", "/r/step_0000005", "config.yaml in /r"):
        assert fact in done, (fact, done)
    idle = run_summary("completed", 5, 5, 5, [], 0.0, None, None)
    assert "no step run" in idle and "step 5 of 5" in idle and "train.save_dir is not set" in idle


def test_tensorboard_scalars_are_written_under_the_run_directory(tmp_path):
    """The scalars a step logs read back from TensorBoard's event files, with their step numbers.
    Needs the `tensorboard` package (pip extra: log)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nemo_opdlm.training.metrics import MetricsLogger

    log = MetricsLogger(enabled=True, total_steps=3, out_dir=str(tmp_path / "run"), tensorboard_dir=None,
                        wandb_project=None, run_name="tiny", config={})
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "time/step_s": 0.1})
    log.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 6) for e in loss] == [1.0, 0.5, round(1 / 3, 6)]


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path, monkeypatch):
    """A write to an open file raises an OSError without a file name: the one-line error said "no
    space left to write ?"; it names metrics.jsonl now."""
    import errno

    from nemo_opdlm.errors import describe_os_error
    from nemo_opdlm.training.metrics import MetricsLogger

    log = MetricsLogger(enabled=True, total_steps=3, out_dir=str(tmp_path / "run"), tensorboard_dir=None,
                        wandb_project=None, run_name="tiny", config={})
    if log.tb is not None:
        log.tb.close()
        log.tb = None

    class Full:
        name = log.jsonl.name

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log.jsonl.close()
    log.jsonl = Full()
    with pytest.raises(OSError) as err:
        log.log(1, {"loss": 1.0})
    line = describe_os_error(err.value)
    assert line.startswith(f"disk full: no space left to write {tmp_path / 'run' / 'metrics.jsonl'} "), line
