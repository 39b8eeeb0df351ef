"""Progress output and metric sinks (stdout, metrics.jsonl, TensorBoard, W&B) on one rank.

One job: record a step's scalars where a user looks for them. Only the logging rank (last
pipeline stage, first tensor- and data-parallel rank: where the losses are) writes.
``metrics.jsonl`` is strict JSON: non-finite values (a skipped step's loss) are ``null``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

from nemo_opdlm.checkpoint.run_dir import WANDB_ID


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def json_line(row: dict[str, Any]) -> str:
    """One strict-JSON line: a non-finite value (a skipped step's NaN loss) is written as null,
    since bare ``NaN`` / ``Infinity`` are rejected by strict JSON readers."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def describe_run(cfg: Any, tp: int, pp: int, dp: int) -> str:
    """The line printed before anything loads: what is being built, from where, at which layout (the
    build takes tens of seconds at real sizes, and used to be silent)."""
    init = cfg.init
    source = init.teacher_hf or init.teacher_checkpoint or "random weights"
    teacher = "" if cfg.teacher_model is None else (f"; teacher {cfg.teacher.num_layers} x {cfg.teacher.hidden_size} "
                                                   f"from {source}, student from {init.student_hf}")
    data = cfg.data.path if cfg.data is not None else "(none)"
    own, layout = cfg.parallel.teacher, f"TP={tp} PP={pp} DP={dp}"
    if own is not None:
        world = tp * pp * cfg.parallel.cp * dp
        layout += f" (teacher TP={own.tp} PP={own.pp} DP={cfg.parallel.teacher_dp(world)})"
    return (f"run {cfg.name}: distill.method={cfg.distill.method}, {cfg.train.steps} steps, {layout}; "
            f"building: tokenizer ({init.tokenizer or source}), prompts ({data}), then the models "
            f"({cfg.model.family} {cfg.model.num_layers} x {cfg.model.hidden_size} from {source}{teacher})")


def run_summary(status: str, start: int, step: int, total: int, history: list[dict[str, float]], seconds: float,
                last_checkpoint: Optional[str], save_dir: Optional[str]) -> str:
    """The closing line: what ran, how fast, where the result is."""
    ran = [h for h in history if h["step"] > start]
    losses = [h["loss"] for h in ran if "loss" in h and math.isfinite(h["loss"])]
    tokens = [h["throughput/tokens_per_s"] for h in ran if "throughput/tokens_per_s" in h]
    parts = [f"{status}: steps {start + 1}-{step} of {total} in {_fmt_time(seconds)}" if ran else
             f"{status}: no step run (already at step {start} of {total})"]
    if losses:
        parts.append(f"loss {losses[0]:.4g} -> {losses[-1]:.4g}" if len(losses) > 1 else f"loss {losses[0]:.4g}")
    if tokens:
        parts.append(f"{sum(tokens) / len(tokens):.4g} tokens/s")
    if last_checkpoint:
        parts.append(f"last checkpoint {last_checkpoint}")
    elif not save_dir:
        parts.append("no checkpoint (train.save_dir is not set)")
    if save_dir:
        parts.append(f"metrics and config.yaml in {save_dir}")
    return "; ".join(parts)


def wandb_run_id(out_dir: str) -> str:
    """The run directory's W&B run id: the one stored there, else a new one, stored first."""
    import secrets
    import string

    path = os.path.join(out_dir, WANDB_ID)
    if os.path.isfile(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def start_wandb(project: str, run_name: str, config: dict[str, Any], out_dir: Optional[str]) -> Any:
    """``wandb.init`` for this run. With a run directory, W&B's files go under it (``out_dir/wandb``)
    and the run id stored there is resumed (``resume='allow'``: the same W&B run after a requeue,
    a new one the first time); without one, a fresh W&B run in W&B's default directory."""
    import wandb  # a configured W&B project must not be dropped silently

    if not out_dir:
        return wandb.init(project=project, name=run_name, config=config)
    run_id = wandb_run_id(out_dir)
    return wandb.init(project=project, name=run_name, config=config, id=run_id, resume="allow", dir=out_dir)


class MetricsLogger:
    """Writes one line per logged step, ``metrics.jsonl`` and optional TensorBoard/W&B scalars."""

    def __init__(self, *, enabled: bool, total_steps: int, out_dir: Optional[str], tensorboard_dir: Optional[str],
                 wandb_project: Optional[str], run_name: str, config: dict[str, Any]) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.first_step: Optional[int] = None
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        tb_dir = tensorboard_dir or (os.path.join(out_dir, "tensorboard") if out_dir else None)
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tb_dir)
            except ImportError:
                print("[opdlm] tensorboard not installed: no TensorBoard scalars", file=sys.stderr)
        if wandb_project:
            self.wandb = start_wandb(wandb_project, run_name, config, out_dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.perf_counter() - scalars.get("time/step_s", 0.0)
        done = step - self.first_step
        per_step = (time.perf_counter() - self.start) / max(done, 1)
        eta = per_step * (self.total_steps - step)
        shown = " ".join(
            f"{k.split('/')[-1]}={v:.4g}" for k, v in scalars.items()
            if k in ("loss", "kl", "ce", "rollout/tokens_per_round", "time/rollout_s", "time/train_s",
                     "throughput/tokens_per_s", "lr", "grad_norm")
        )
        print(f"[opdlm] step {step}/{self.total_steps} {shown} eta={_fmt_time(eta)}", flush=True)
        if self.jsonl:
            self._write_line(json_line(dict(step=step, **scalars)) + "\n")
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def _write_line(self, line: str) -> None:
        """Append ``line`` to metrics.jsonl; an OSError (a full disk) names the file, which a write
        to an open file leaves out (the user saw "no space left to write ?")."""
        try:
            self.jsonl.write(line)
            self.jsonl.flush()
        except OSError as err:
            if err.filename is None:
                err.filename = self.jsonl.name
            raise

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"[opdlm] {message}", flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
