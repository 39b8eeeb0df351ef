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
and ``save_dir/latest`` naming the newest complete one (``checkpoint/run_dir.py`` decides which one a starting
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

from nemo_opdlm.checkpoint.format import check_readable, sharded_model_state, write_metadata
from nemo_opdlm.checkpoint.manifest import damage
from nemo_opdlm.checkpoint.staging import staged_dir
from nemo_opdlm.errors import CheckpointError  # noqa: F401  (re-exported)
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.student import parallel_of, unwrap
from nemo_opdlm.runtime.comm import barrier, broadcast_object, is_rank0
from nemo_opdlm.runtime.preemption import held_from_children
from nemo_opdlm.training import run_config as run_config_file
from nemo_opdlm.training.finite import check_saveable
from nemo_opdlm.training.optim import TrainState, group_settings, resume_schedule

LATEST = "latest"
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""How the distributed optimizer's state is sharded on disk. megatron-core 0.16's default
(``fully_sharded_model_space``) cannot be saved on torch's Adam (no TE/apex: "flattened_range is not
supported"), and ``fully_reshardable`` cannot be loaded there (its loader copies a ``step`` it never
saved). ``dp_reshardable`` round-trips exactly and reshards over data-parallel ranks (DP=2 -> 1
measured exact), not over TP/PP (``_check_optimizer_layout``). The plain optimizer ignores this."""


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
    sharded["optimizer"] = state.optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=OPTIMIZER_FORMAT)
    return sharded


def optimizer_layout(state: TrainState) -> dict[str, Any]:
    """What the optimizer state on disk depends on: distributed or not, and the model-parallel layout."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    parallel = parallel_of(state.chunks)
    return {"distributed": any(isinstance(o, DistributedOptimizer) for o in inners),
            "tp": parallel.tp_size, "pp": parallel.pp_size}


def _check_optimizer_layout(ckpt_dir: str, saved: Optional[dict[str, Any]], now: dict[str, Any]) -> None:
    """Refuse, before reading any shard, a resume the optimizer state cannot follow: a switch between
    the plain and the distributed optimizer, or distributed-optimizer state at another TP/PP layout
    (``OPTIMIZER_FORMAT`` reshards over DP only; a DP change resumes exactly). Checkpoints older than
    this record are let through."""
    if saved is None:
        return
    if saved["distributed"] != now["distributed"]:
        raise CheckpointError(
            f"{ckpt_dir} holds {'distributed' if saved['distributed'] else 'plain'} optimizer state, and this run "
            f"uses the {'distributed' if now['distributed'] else 'plain'} optimizer: set "
            f"optim.distributed_optimizer={str(saved['distributed']).lower()} to resume it")
    if now["distributed"] and (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
        raise CheckpointError(
            f"{ckpt_dir} holds distributed-optimizer state for TP={saved['tp']} x PP={saved['pp']}, and this run is "
            f"TP={now['tp']} x PP={now['pp']}: the state reshards over data-parallel ranks only. Resume at "
            f"parallel.tp={saved['tp']} parallel.pp={saved['pp']}, or export the weights (tools/export_hf.py "
            f"{ckpt_dir} OUT) and start a new run from them with init.student_hf=OUT")


def _materialize_adam_state(state: TrainState) -> None:
    """Give a fresh optimizer's Adam state (step, moments) before loading into it.

    megatron-core's distributed optimizer on torch's Adam (no TE/apex) reads the per-parameter
    ``step`` while building the state dict to load into, and a never-stepped optimizer has none.
    The values are placeholders: the load overwrites every one of them.
    """
    for adam in _adams(state):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(step=torch.zeros(()), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))


def _adams(state: TrainState) -> list[torch.optim.Optimizer]:
    """The torch Adam(W) instances under megatron-core's (chained, distributed) optimizer."""
    inners = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    return [inner.optimizer for inner in inners
            if getattr(inner, "optimizer", None) is not None and not getattr(inner, "is_stub_optimizer", False)]


def _restore_adam_steps(state: TrainState, updates: int) -> None:
    """Set every parameter's Adam ``step`` to the saved number of applied updates, each its own tensor.

    Adam's step and the LR scheduler both count applied updates (a skipped one moves neither), so
    the scheduler's saved count is the step. megatron-core 0.16's distributed optimizer on torch's
    Adam (no TE/apex) does not bring it back: it returns the placeholder of
    ``_materialize_adam_state``, and where it does restore one it is a single tensor shared by every
    parameter, which torch's Adam increments in place once per parameter. Either way a resumed run
    would leave the uninterrupted one from its second step on.
    """
    for adam in _adams(state):
        for param_state in adam.state.values():
            if "step" in param_state:
                old = param_state["step"]
                param_state["step"] = torch.tensor(float(updates), dtype=old.dtype, device=old.device)


def save(save_dir: str, step: int, state: TrainState, *, extra: dict[str, Any], model: ModelConfig,
         diffusion: Optional[DiffusionConfig] = None, hf_config: Optional[dict[str, Any]] = None,
         assets_dir: Optional[str] = None, run_config: Any = None) -> str:
    """Save a complete checkpoint for ``step`` (collective) and point ``latest`` at it.

    Beside the state it carries what evaluation and export need without being told: the model and
    diffusion settings, the teacher's HF config (``hf_config``) and the tokenizer files of
    ``assets_dir`` (``checkpoint.format.write_metadata``), and the whole ``run_config`` (a
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
    sharded["common"] = dict(extra, step=step, scheduler=state.scheduler.state_dict(),
                             optimizer_layout=optimizer_layout(state))
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


def saved_data_cursor(ckpt_dir: str) -> Optional[dict[str, Any]]:
    """The data cursor ``ckpt_dir`` saved (``PromptLoader.state_dict``), read from its small common
    state alone: a resume that cannot continue it is refused before any model is built."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    except Exception:  # noqa: BLE001  (a damaged checkpoint is named by load(), which reads it next)
        return None
    data = (common.get("common") or {}).get("data") if isinstance(common, dict) else None
    return data if isinstance(data, dict) else None


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
    saved_layout = dist_checkpointing.load_common_state_dict(ckpt_dir).get("common", {}).get("optimizer_layout")
    _check_optimizer_layout(ckpt_dir, saved_layout, optimizer_layout(state))
    _materialize_adam_state(state)
    sharded = _sharded_state(state, is_loading=True)
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    for key, chunk in zip([k for k in sharded if k.startswith("model")], state.chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    config_groups = group_settings(state)  # the config's, before the checkpoint's replace them
    state.optimizer.load_state_dict(loaded["optimizer"])
    common = loaded["common"]
    _restore_adam_steps(state, int(common["scheduler"]["num_steps"]))
    common["schedule_changes"] = resume_schedule(state, common["scheduler"], config_groups)
    return common

