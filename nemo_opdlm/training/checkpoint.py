"""Training checkpoints: megatron-core dist_checkpointing, atomic, resumable at any step.

One job: save and restore everything a run needs to continue exactly: student weights, optimizer
state, LR schedule, data cursor and step (the curriculum position is a function of the step, and
every random stream is re-derived from (seed, step, rank) at each step, so no RNG state needs
to be carried). Non-goals: HF export (``convert/``), when to save (``loop.py``).
On resume the config's ``optim.*`` and ``train.steps`` win over the saved schedule: the scheduler is
rebuilt from the config at the saved update count (``optim.resume_schedule``), so a lowered lr or a
longer run takes effect, and an unchanged config continues exactly. A student whose weights or
optimizer state are not finite is never saved (``finite.check_saveable``).

Layout: ``save_dir/step_0000042/`` (a torch_dist checkpoint the HF exporter can read: model under
``model``, plus ``opdlm_convert.json``, the tokenizer in ``hf_assets/`` and the run's ``config.yaml``)
and ``save_dir/latest`` naming the newest complete one (``run_dir.py`` decides which one a starting
run resumes from).
A checkpoint is written to a staging directory and renamed into place, and ``latest`` is replaced
atomically afterwards, so a crash while writing never damages the previous good checkpoint.
``manifest.json`` records every file's size and BLAKE2b digest; a checkpoint whose files no longer
match (truncated, cut short by a full disk, bytes overwritten) is refused at load, naming the file,
and a starting run falls back to the previous good one (``run_dir.resume_point``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from nemo_opdlm.convert.dist_checkpoint import check_readable, damage, sharded_model_state, write_metadata
from nemo_opdlm.convert.staging import staged_dir
from nemo_opdlm.errors import CheckpointError  # noqa: F401  (re-exported)
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.student import unwrap
from nemo_opdlm.runtime.comm import barrier, broadcast_object, is_rank0
from nemo_opdlm.runtime.preemption import held_from_children
from nemo_opdlm.training import run_config as run_config_file
from nemo_opdlm.training.finite import check_saveable
from nemo_opdlm.training.optim import TrainState, group_settings, resume_schedule

LATEST = "latest"


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step_{step:07d}")


def _write_latest(save_dir: str, name: str) -> None:
    tmp = os.path.join(save_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, LATEST))


def _read_latest(save_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(save_dir, LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _sharded_state(state: TrainState, is_loading: bool) -> dict[str, Any]:
    model = sharded_model_state(state.chunks)
    merged: dict[str, Any] = {}
    for part in model.values():
        merged.update(part)
    sharded = dict(model)
    sharded["optimizer"] = state.optimizer.sharded_state_dict(merged, is_loading=is_loading)
    return sharded


def save(save_dir: str, step: int, state: TrainState, *, extra: dict[str, Any], model: ModelConfig,
         diffusion: Optional[DiffusionConfig] = None, hf_config: Optional[dict[str, Any]] = None,
         assets_dir: Optional[str] = None, run_config: Any = None) -> str:
    """Save a complete checkpoint for ``step`` (collective) and point ``latest`` at it.

    Beside the state it carries what evaluation and export need without being told: the model and
    diffusion settings, the teacher's HF config (``hf_config``) and the tokenizer files of
    ``assets_dir`` (``convert.dist_checkpoint.write_metadata``), and the whole ``run_config`` (a
    RunConfig) as ``config.yaml``, covered by the manifest like every other file.

    Refuses (:class:`NonFiniteStateError`, nothing written) when the student's weights or optimizer
    state hold NaN/inf: ``latest`` keeps naming the last good checkpoint.
    """
    from megatron.core import dist_checkpointing

    check_saveable(state, step, kept=_read_latest(save_dir))
    if is_rank0():
        os.makedirs(save_dir, exist_ok=True)
    barrier()
    target = step_dir(save_dir, step)
    sharded = _sharded_state(state, is_loading=False)
    sharded["common"] = dict(extra, step=step, scheduler=state.scheduler.state_dict())
    with staged_dir(target, overwrite=True) as staging:
        with held_from_children():  # the writer's helper processes must outlive a group/tree SIGTERM
            dist_checkpointing.save(sharded, staging)
        barrier()  # every rank's shards are on disk before rank 0 lists them
        if is_rank0():
            if run_config is not None:
                run_config_file.write(staging, run_config)
            write_metadata(staging, model, hf_config=hf_config, diffusion=diffusion, assets_dir=assets_dir,
                           step=step)
    if is_rank0():
        _write_latest(save_dir, os.path.basename(target))
    barrier()
    return target


@torch.no_grad()
def load(ckpt_dir: str, state: TrainState) -> dict[str, Any]:
    """Restore weights and optimizer state from ``ckpt_dir``, and the config's schedule at the saved
    update count (``optim.resume_schedule``: the config wins). Returns the saved ``common`` dict, with
    ``schedule_changes``: how the config's optimizer settings differ from the checkpoint's."""
    from megatron.core import dist_checkpointing

    problem = broadcast_object(damage(ckpt_dir) if is_rank0() else None)  # first: a removed common.pt is damage
    if problem:
        raise CheckpointError(f"cannot resume from {ckpt_dir}: {problem}")
    check_readable(ckpt_dir)  # not a checkpoint, or a megatron-core >= 0.17 one on 0.16: say so
    sharded = _sharded_state(state, is_loading=True)
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    for key, chunk in zip([k for k in sharded if k.startswith("model")], state.chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    config_groups = group_settings(state)  # the config's, before the checkpoint's replace them
    state.optimizer.load_state_dict(loaded["optimizer"])
    common = loaded["common"]
    common["schedule_changes"] = resume_schedule(state, common["scheduler"], config_groups)
    return common

