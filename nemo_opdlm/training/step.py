"""One training step's data and losses, for every method, in megatron-core's loss_func contract.

One job: prompts -> responses (own rollouts, teacher rollouts or dataset answers) -> training
micro-batches (states + teacher targets) -> the loss of one micro-batch, and their composition up
to the gradients (``forward_backward``). What each method does is data (``distill/methods.py``:
its responses, masking and loss); this module composes those choices. Non-goals: the optimizer
step, checkpoints, logging (``loop.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.config import RunConfig
from nemo_opdlm.data.sampler import PromptBatch
from nemo_opdlm.distill import loss as losses
from nemo_opdlm.distill.methods import Method, get_method
from nemo_opdlm.distill.packing import pack_rows, row_logits
from nemo_opdlm.distill.states import build_states, response_valid, split_microbatches
from nemo_opdlm.models import grid, masks
from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.rollout.sampler import BlockSampler, Rollout, SamplerConfig, with_mode
from nemo_opdlm.rollout.schedules import BlockSchedule
from nemo_opdlm.runtime.comm import collective_device
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.runtime.device import PhaseClock
from nemo_opdlm.runtime.pipeline import run_schedule
from nemo_opdlm.runtime.seeding import noise_seed
from nemo_opdlm.runtime.vocab_parallel import Group
from nemo_opdlm.teacher.route import TargetRoute, TargetsFn, make_route
from nemo_opdlm.teacher.stream import split_outputs
from nemo_opdlm.training.finite import TEACHER_NONFINITE, count_bad_targets
from nemo_opdlm.training.optim import TrainState, zero_grads

@dataclass
class Responses:
    """What the student learns on this step: prompts and responses, with decoding records."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_lens: Tensor  # [B]
    tokens: Tensor  # [B, L]
    valid: Tensor  # [B, L]
    step_map: Optional[Tensor]  # [B, L] or None for given responses
    rollout_metrics: dict[str, float]
    schedule: BlockSchedule
    """The blocks the states cut: the student's rollout's own schedule, or for given responses
    (dataset, teacher) the student's (``student_schedule``)."""
    given: Optional[Tensor] = None  # [B, L] framed heads (``on_grid``), never masked nor learned


def student_schedule(cfg: RunConfig) -> BlockSchedule:
    """The student's block schedule under the rollouts' decoding (``rollout.*`` on ``diffusion.*``)."""
    return BlockSchedule.of(cfg.diffusion, cfg.rollout)


def on_grid(cfg: RunConfig, resp: Responses, pad_id: int) -> Responses:
    """``resp`` in the frame of ``diffusion.block_grid`` (``models/grid.py``), what the states, the
    teacher and the layout read: on the absolute grid each response starts with its prompt's last
    ``P mod block_size`` tokens (``given``); the identity on the response grid and for causal rows.
    Every prompt must be non-empty: the teacher predicts the first response token from the last
    prompt token."""
    if int(resp.prompt_lens.min()) < 1:
        raise ValueError("every row needs a non-empty prompt: the first response token is predicted from the last "
                         "prompt token")
    if get_method(cfg.distill.method).causal or resp.schedule.block_grid == "response":
        return resp
    f = grid.frame_rows(resp.prompt_ids, resp.prompt_lens, resp.tokens, resp.valid, resp.step_map,
                        resp.schedule.block_size, resp.schedule.block_grid, pad_id)
    return Responses(f.prompt_ids, f.prompt_lens, f.tokens, f.valid, f.step_map, resp.rollout_metrics, resp.schedule,
                     f.given)


def sampler_config(cfg: RunConfig, eos_ids: Sequence[int], pad_id: int, seed: int, *,
                   max_new_tokens: int) -> SamplerConfig:
    """The rollouts' sampler: ``rollout.*`` decoding of the student described by ``diffusion.*``."""
    return SamplerConfig(decode=cfg.rollout, diffusion=cfg.diffusion, max_new_tokens=max_new_tokens,
                         eos_token_ids=tuple(eos_ids), pad_token_id=pad_id, seed=seed)


def _from_rollout(rollout: Rollout, schedule: Optional[BlockSchedule] = None) -> Responses:
    """The rollout's responses under its own schedule, or (the teacher's causal rollouts, given
    responses to the student) under ``schedule``."""
    return Responses(rollout.prompt_ids, rollout.prompt_lens, rollout.tokens, rollout.valid,
                     rollout.step_map, rollout.metrics.as_dict(), schedule or rollout.schedule)


def _from_dataset(batch: PromptBatch, eos_ids: Sequence[int], schedule: BlockSchedule) -> Responses:
    if batch.response_ids is None:
        raise ValueError("this method trains on dataset responses: set data.response_field")
    valid = response_valid(batch.response_ids, batch.response_lens, eos_ids)
    return Responses(batch.prompt_ids, batch.prompt_lens, batch.response_ids, valid, None, {}, schedule)


def rollout_lengths(cfg: RunConfig, batch: PromptBatch, length: int) -> int | Tensor:
    """This step's rollout length: the curriculum's ``length``, or per row ``[B]`` capped by
    ``rollout.max_length_by_domain`` for the rows whose domain it lists."""
    caps = cfg.rollout.max_length_by_domain
    if not caps or batch.domains is None:
        return length
    return torch.tensor([min(length, caps.get(d, length)) for d in batch.domains], dtype=torch.long)


def get_responses(cfg: RunConfig, batch: PromptBatch, student: list, teacher: Optional[list],
                  sampler_cfg: SamplerConfig, length: int) -> Responses:
    """Responses for this step's prompts, from the source the method prescribes."""
    method = get_method(cfg.distill.method)
    limits = rollout_lengths(cfg, batch, length)
    if method.responses == "own_rollouts":
        sampler = BlockSampler(student, sampler_cfg)
        return _from_rollout(sampler.generate(batch.prompt_ids, batch.prompt_lens, limits,
                                              static_rows=static_rows(cfg, batch.prompt_ids.shape[0])))
    if method.responses == "teacher" and batch.response_ids is None:
        assert teacher is not None  # the teacher decodes causally, with the rollouts' sampling settings
        teacher_cfg = dataclasses.replace(sampler_cfg, decode=with_mode(sampler_cfg.decode, "ar"))
        rollout = BlockSampler(teacher, teacher_cfg).generate(batch.prompt_ids, batch.prompt_lens, limits)
        return _from_rollout(rollout, sampler_cfg.schedule)
    return _from_dataset(batch, sampler_cfg.eos_token_ids, sampler_cfg.schedule)


def static_rows(cfg: RunConfig, batch: int) -> Optional[Tensor]:
    """``[batch]`` bool: the rows this rank decodes statically (``rollout.static_fraction``), or None."""
    if cfg.rollout.mode != "dynamic" or cfg.rollout.static_fraction == 0:
        return None
    return torch.arange(batch) < round(cfg.rollout.static_fraction * batch)


def ar_rows(resp: Responses) -> dict[str, Tensor]:
    """Causal rows ``[prompt | response]`` with a loss on every valid response token."""
    layout = masks.build_layout(resp.prompt_lens, resp.prompt_ids.shape[1], resp.valid, 1, with_xt=False)
    return dict(
        input_ids=torch.cat([resp.prompt_ids, resp.tokens], 1),  # [B, P + L]
        position_ids=layout.position_ids,
        meta=layout.meta,
        loss_mask=resp.valid.clone(),  # [B, L]
        x0=resp.tokens,
    )


def training_rows(cfg: RunConfig, resp: Responses, eos_ids: Sequence[int], generator: torch.Generator) -> dict:
    """The student's rows for this step (all of this rank's sequences, before micro-batching)."""
    method = get_method(cfg.distill.method)
    if method.causal:
        return ar_rows(resp)
    return build_states(
        resp.prompt_ids, resp.prompt_lens, resp.tokens, resp.step_map, resp.valid,
        block_size=resp.schedule.block_size, steps_per_block=resp.schedule.rounds_per_block,
        mask_token_id=cfg.diffusion.mask_token_id, eos_ids=eos_ids, generator=generator,
        masking=method.masking, exclude_eos=cfg.distill.exclude_eos, given=resp.given,
    )


def teacher_rows(resp: Responses, microbatches: list[dict], groups: Optional[list[Tensor]]) -> list[dict]:
    """Each micro-batch's teacher inputs (``teacher.exchange.Rows``: the responses' prompt and x0):
    consecutive equal splits of the rows, or with packed rows (``groups``, ``packing.pack_rows``)
    each micro-batch's own rows."""
    per_row = dict(prompt_ids=resp.prompt_ids, prompt_lens=resp.prompt_lens, x0=resp.tokens, valid=resp.valid)
    if groups is None:
        return split_microbatches(per_row, len(microbatches))
    return [{k: v[index] for k, v in per_row.items()} for index in groups]


def teacher_route(cfg: RunConfig, teacher: Optional[list], student: ParallelContext,
                  name: Optional[str] = None) -> TargetRoute:
    """This step's route for the teacher's targets (``teacher/route.py``): ``RunConfig.teacher_route``'s
    choice, or ``name`` (a measurement's: e.g. ``before_pass`` to time the teacher apart)."""
    name = name or cfg.teacher_route()
    if teacher is None:
        name = "none"
    t_tp = parallel_of(teacher).tp_size if teacher is not None else student.tp_size
    return make_route(name, teacher=teacher, student=student, own_layout=cfg.parallel.teacher is not None,
                      top_k=cfg.distill.top_k, student_vocab=cfg.model.padded_vocab_size(student.tp_size),
                      teacher_vocab=cfg.teacher_built.padded_vocab_size(t_tp))


def make_loss_fn(method: str | Method, num_sequences: int, scale: float, tp_group: Group,
                 targets: Optional[TargetsFn] = None):
    """megatron-core ``loss_func`` for one micro-batch: ``(loss * scale, reported metrics)``.

    ``method``'s loss (a ``distill.method`` name or its ``Method``). ``scale`` = micro-batches x DP
    size: the schedule divides by the former and DDP averages over the latter, while
    ``distill/loss.py`` already divides by the global sequence count. ``tp_group``: the group the
    student's vocabulary is split over. ``targets``: how the inputs the teacher's route stored in
    a micro-batch become targets here (``TargetRoute.targets``); a route that computed them before
    the pass left them in the micro-batch, and a teacher riding the pipeline sends them with the
    logits (``stream.split_outputs``).
    """
    kind = (get_method(method) if isinstance(method, str) else method).loss

    def loss_fn(output: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        logits, streamed = split_outputs(output)
        loss_mask, x0 = batch["loss_mask"], batch["x0"]  # [B, L]
        if "logits_columns" in batch:  # packed rows: [1, R * W, V/tp] -> [R, W, V/tp], no loss past W
            logits = row_logits(logits, loss_mask.shape[0])
            loss_mask, x0 = loss_mask[:, :logits.shape[1]], x0[:, :logits.shape[1]]  # [R, W]
        if kind == "causal_ce":
            loss, metrics = losses.causal_cross_entropy_loss(logits, loss_mask, x0, num_sequences=num_sequences)
        elif kind == "ce":
            loss, metrics = losses.cross_entropy_loss(logits, loss_mask, x0, num_sequences=num_sequences)
        else:
            if streamed is not None:
                t_logprobs, t_ids = streamed.logprobs, streamed.ids
            elif "t_logprobs" in batch:
                t_logprobs, t_ids = batch["t_logprobs"], batch.get("t_ids")
            else:
                assert targets is not None, "micro-batch without teacher targets and no teacher to compute them"
                t_logprobs, t_ids = targets(batch)
            width = loss_mask.shape[1]  # L, or a packed micro-batch's W
            t_logprobs, t_ids = t_logprobs[:, :width], None if t_ids is None else t_ids[:, :width]
            loss, metrics = losses.kl_loss(logits, loss_mask, t_logprobs, t_ids,
                                           num_sequences=num_sequences, tp_group=tp_group)
            metrics[TEACHER_NONFINITE] = count_bad_targets(t_logprobs[loss_mask.bool()])
        metrics = dict(metrics, loss=loss.detach())
        return loss * scale, metrics

    return loss_fn


@dataclass
class StepOutcome:
    """A step up to the optimizer: what was learned from, the schedule's reports, phase seconds."""

    responses: Responses
    rows: dict[str, Tensor]
    """The student's rows (all of this rank's sequences, before micro-batching)."""
    reported: list[dict[str, Tensor]]
    """Per micro-batch metrics of the loss function (last pipeline stage; empty elsewhere)."""
    seconds: dict[str, float]
    """``rollout_s``; ``teacher_s``: states, micro-batches and teacher targets (the targets ~0 when
    lazy: the teacher then runs inside the schedule); ``student_fwd_bwd_s``."""
    peak_gib: dict[str, float]
    """Peak allocated device memory of each phase (``rollout``, ``teacher``, ``student_fwd_bwd``;
    ``opdlm plan``'s rollout, teacher and train phases); empty without a CUDA device."""


@dataclass
class StepBatch:
    """A step's rows, built on the host from its responses: what the teacher and the student read."""

    rows: dict[str, Tensor]
    """The student's rows (all of this rank's sequences)."""
    microbatches: list[dict[str, Tensor]]
    groups: Optional[list[Tensor]]
    """Packed micro-batches' row indices (``train.pack_tokens``), else None."""
    teacher_rows: list[dict]
    """The teacher's ``[prompt | x0]`` rows per micro-batch (``teacher_rows``)."""


def forward_backward(cfg: RunConfig, batch: PromptBatch, state: TrainState, teacher: Optional[list],
                     eos_ids: Sequence[int], pad_id: int, *, seed: int, length: int,
                     route: Optional[str] = None) -> StepOutcome:
    """Responses -> rows -> micro-batches -> the teacher's route -> the student's schedule, gradients
    left in the DDP buffers for the optimizer (the trainer's step and the GPU benchmark's, one code
    path).

    ``seed`` seeds the rollout and the states (offset by the data-parallel rank); ``route``: the
    teacher targets' route (``teacher/route.py``), default the config's. Each phase's seconds are
    the device's, and with CUDA its peak memory is recorded (``runtime.device.PhaseClock``).
    """
    clock = PhaseClock()
    resp = get_responses(cfg, batch, state.chunks, teacher, sampler_config(cfg, eos_ids, pad_id, seed,
                                                                           max_new_tokens=length), length)
    clock.mark("rollout")
    generator = torch.Generator().manual_seed(noise_seed(seed, parallel_of(state.chunks).dp_rank))
    step = step_batch(cfg, resp, eos_ids, pad_id, generator)
    reported = learn_from(cfg, step, state, teacher, route=route, clock=clock)
    return StepOutcome(resp, step.rows, reported, clock.seconds, clock.peak_gib)


def step_batch(cfg: RunConfig, resp: Responses, eos_ids: Sequence[int], pad_id: int,
               generator: torch.Generator) -> StepBatch:
    """Responses -> the frame of the grid -> training rows (the states) -> micro-batches, and the
    teacher's rows; host work, no model."""
    framed = on_grid(cfg, resp, pad_id)
    rows = training_rows(cfg, framed, eos_ids, generator)
    microbatches, groups = make_microbatches(cfg, rows, pad_id)
    return StepBatch(rows, microbatches, groups, teacher_rows(framed, microbatches, groups))


def learn_from(cfg: RunConfig, step: StepBatch, state: TrainState, teacher: Optional[list], *,
               route: Optional[str] = None, clock: Optional[PhaseClock] = None) -> list[dict[str, Tensor]]:
    """The teacher's targets on their route, then the student's forward and backward over the
    step's micro-batches (the model work of ``forward_backward``: ``opdlm plan --measure`` runs
    it under fake tensors). The loss function's reports; ``clock`` marks the ``teacher`` and
    ``student_fwd_bwd`` phases."""
    clock = clock or PhaseClock()
    parallel = parallel_of(state.chunks)
    targets = teacher_route(cfg, teacher, parallel, route)
    targets.prepare(step.teacher_rows, step.microbatches)
    num_seq = losses.count_sequences([mb["loss_mask"] for mb in step.microbatches], parallel.dp_group)
    clock.mark("teacher")
    zero_grads(state)
    chunks, schedule_args = targets.schedule(state.chunks, step.microbatches, step.rows["input_ids"].shape[1])
    if step.groups is None:  # packed micro-batches carry their own columns
        schedule_args.update(student_outputs(cfg, step.rows))
    loss_fn = make_loss_fn(cfg.distill.method, num_seq, len(step.microbatches) * parallel.dp_size, parallel.tp_group,
                           targets.targets())
    reported = run_schedule(chunks, step.microbatches, loss_fn, forward_only=False, **schedule_args)
    clock.mark("student_fwd_bwd")
    return reported


def make_microbatches(cfg: RunConfig, rows: dict[str, Tensor], pad_id: int
                      ) -> tuple[list[dict[str, Tensor]], Optional[list[Tensor]]]:
    """This rank's micro-batches, and with ``train.pack_tokens`` each one's row indices.

    Padded: ``train.micro_batch_size`` consecutive rows each. Packed: one sequence of
    ``train.pack_tokens`` tokens each, as many rows as fit (``distill/packing.py``); the count then
    varies from step to step and rank to rank (the loss scale follows it; every sequence is exactly
    ``pack_tokens`` long, so the pipeline's point-to-point shapes stay fixed at PP > 1).
    """
    if cfg.train.pack_tokens is None:
        return split_microbatches(rows, rows["input_ids"].shape[0] // cfg.train.micro_batch_size), None
    return pack_rows(rows, cfg.train.pack_tokens, block_size=cfg.diffusion.block_size,
                     shift=cfg.diffusion.shift_logits, pad_id=pad_id)


def student_outputs(cfg: RunConfig, rows: dict[str, Tensor]) -> dict[str, Any]:
    """Which of the student's columns reach the output layer (``run_schedule``'s logits arguments).

    Unshifted: the last ``L + 1`` columns (xt, and for ``ar`` the column predicting the first
    response token; the losses read the last ``L``). Shifted (``diffusion.shift_logits``): exactly
    the ``L`` prediction columns of ``masks.prediction_columns``, in response order, so that the
    losses' "last ``L`` columns" are the aligned predictions.
    """
    length = rows["loss_mask"].shape[1]
    if not cfg.diffusion.shift_logits or get_method(cfg.distill.method).causal:
        return {"logits_last": masks.logits_needed(length)}
    prompt_width = rows["input_ids"].shape[1] - 2 * length
    return {"logits_columns": masks.prediction_columns(prompt_width, length, cfg.diffusion.block_size, True)}


def reduce_reported(reported: list[dict[str, Tensor]], dp_group: Group) -> dict[str, float]:
    """Sum the micro-batch metrics, then over the data-parallel ranks of ``dp_group`` (last pipeline
    stage only)."""
    if not reported:
        return {}
    keys = sorted(reported[0])
    total = torch.stack([sum(r[k].float() for r in reported) for k in keys])  # [K]
    if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
        group = dp_group
        total = total.to(collective_device(group))  # NCCL needs CUDA, gloo CPU, whatever made the metrics
        torch.distributed.all_reduce(total, group=group)
    return {k: float(v) for k, v in zip(keys, total)}
