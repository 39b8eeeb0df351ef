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
            import wandb  # a configured W&B project must not be dropped silently

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config)

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
            self.jsonl.write(json_line(dict(step=step, **scalars)) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

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
