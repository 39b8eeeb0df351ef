"""Wrap the student for training: bf16 module, megatron-core DDP, optimizer and LR schedule.

One job: turn the student's bare chunks into what ``get_forward_backward_func`` and the optimizer
step need, the way megatron-core's own training does (Float16Module -> DDP -> MegatronOptimizer
with fp32 master weights -> OptimizerParamScheduler), and wire the schedule's hooks
(``finalize_model_grads``, ``no_sync``, loss scaling). Non-goals: the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from nemo_opdlm.config import OptimConfig
from nemo_opdlm.models.config import ModelConfig
from nemo_opdlm.runtime.comm import agree


@dataclass
class TrainState:
    """The trainable model and its optimizer state."""

    chunks: list[torch.nn.Module]
    """DDP-wrapped chunks (what the schedule runs)."""
    optimizer: Any
    """megatron-core MegatronOptimizer."""
    scheduler: OptimizerParamScheduler
    """LR / weight-decay schedule, stepped once per optimizer step."""


def wrap_for_training(chunks: list[torch.nn.Module], model: ModelConfig, optim: OptimConfig,
                      total_steps: int) -> TrainState:
    """DDP + optimizer + cosine schedule for the student's chunks (weights already loaded)."""
    config = chunks[0].config
    if model.dtype != torch.float32:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=model.dtype == torch.bfloat16,
        fp16=model.dtype == torch.float16,
        params_dtype=model.dtype,
        use_distributed_optimizer=optim.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return TrainState(chunks=wrapped, optimizer=optimizer, scheduler=scheduler)


GROUP_SETTINGS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr", "betas": "optim.adam_beta1/adam_beta2",
                  "eps": "optim.adam_eps"}
"""Optimizer param-group entries that come from ``optim.*`` (``lr`` and ``weight_decay`` are set by
the scheduler at every step), with the config key a user changes."""

SCHEDULE_SETTINGS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.warmup_steps",
                     "lr_decay_steps": "train.steps (lr decay steps)", "lr_decay_style": "lr decay style",
                     "start_wd": "optim.weight_decay"}
"""The scheduler's fields that follow from the config (its ``state_dict`` keys), as above."""


def group_settings(state: TrainState) -> list[dict[str, Any]]:
    """The ``GROUP_SETTINGS`` entries of every param group, in order (a copy)."""
    return [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in state.optimizer.param_groups]


def resume_schedule(state: TrainState, saved: dict[str, Any], config_groups: list[dict[str, Any]]) -> list[str]:
    """Continue the config's learning-rate schedule at the saved number of updates; return what differs.

    The rule on resume: ``optim.*`` and ``train.steps`` win over the checkpoint's. ``state`` was built
    from the config and has just loaded the checkpoint's optimizer state, which brought back the saved
    param-group settings (``config_groups``: the config's, taken before that load); those are put back,
    and the scheduler (built from the config, not loaded) is moved to ``saved["num_steps"]`` updates.
    An unchanged config gives exactly the saved schedule. Returns ``"key: old -> new"`` per change.
    """
    changes: dict[str, str] = {}
    built = state.scheduler.state_dict()
    for key, label in SCHEDULE_SETTINGS.items():
        if key in saved and saved[key] != built[key]:
            changes.setdefault(label, f"{label}: {saved[key]} -> {built[key]}")
    for group, wanted in zip(state.optimizer.param_groups, config_groups):
        for key, value in wanted.items():
            if key in group and _same(group[key]) != _same(value):
                label = GROUP_SETTINGS[key]
                changes.setdefault(label, f"{label}: {_same(group[key])} -> {_same(value)}")
            group[key] = value
    state.scheduler.step(increment=int(saved["num_steps"]))  # a fresh scheduler is at 0 updates
    return list(changes.values())


def _same(value: Any) -> Any:
    """Param-group values comparable across a save (betas come back as a list)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def zero_grads(state: TrainState) -> None:
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()


class Update(NamedTuple):
    """What :func:`optimizer_step` did."""

    applied: bool
    grad_norm: float
    """NaN when not computed (an fp16 overflow)."""
    overflow: bool = False
    """fp16 dynamic loss scaling found inf/NaN and shrank the scale: routine, megatron-core's own skip."""


@torch.no_grad()
def optimizer_step(state: TrainState) -> Update:
    """One optimizer + scheduler step, unless the gradient norm is not finite.

    megatron-core's ``ChainedOptimizer.step`` (0.16) with one check added between the norm and the
    update: its clipping lets a NaN norm through (``clip_coeff < 1`` is False for NaN) and applies
    the NaN gradients, which turns every weight and Adam moment into NaN, even at lr 0. A skipped
    update leaves weights, moments and the schedule as they were (the next step zeroes the grads).
    """
    opt = state.optimizer
    if opt.prepare_grads():  # an fp16 loss-scale overflow: megatron-core's own skip
        return Update(False, float("nan"), overflow=True)
    grad_norm = float(opt.get_grad_norm())
    if agree(not math.isfinite(grad_norm)):  # every rank skips, or none (the update has collectives)
        return Update(False, grad_norm)
    for inner in getattr(opt, "chained_optimizers", [opt]):
        params = inner.get_parameters()
        if inner.config.clip_grad > 0.0 and params and not getattr(inner, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    applied = bool(opt.step_with_ready_grads())
    if applied:
        state.scheduler.step(increment=1)
    return Update(applied, grad_norm)
