"""One training step's data and losses, for every method, in megatron-core's loss_func contract.

One job: prompts -> responses (own rollouts, teacher rollouts or dataset answers) -> training
micro-batches (states + teacher targets) -> the loss of one micro-batch, and their composition up
to the gradients (``forward_backward``). What each method does is data (``distill/methods.py``:
its responses, masking and loss); this module composes those choices. Non-goals: the optimizer
step, checkpoints, logging (``loop.py``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.config import RunConfig
from nemo_opdlm.data.sampler import PromptBatch
from nemo_opdlm.distill import loss as losses
from nemo_opdlm.distill.methods import Method, get_method
from nemo_opdlm.distill.packing import pack_rows, row_logits
from nemo_opdlm.distill.teacher_exchange import exchange_targets
from nemo_opdlm.distill.states import build_states, response_valid, split_microbatches
from nemo_opdlm.distill.teacher_targets import compute_targets, logits_needed, shifted_targets, teacher_batch
from nemo_opdlm.models import grid, masks
from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.rollout.sampler import BlockSampler, Rollout, SamplerConfig, with_mode
from nemo_opdlm.rollout.schedules import BlockSchedule
from nemo_opdlm.runtime.comm import collective_device
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.runtime.pipeline import run_schedule
from nemo_opdlm.runtime.seeding import noise_seed
from nemo_opdlm.runtime.vocab_parallel import Group
from nemo_opdlm.training.finite import TEACHER_NONFINITE, count_bad_targets
from nemo_opdlm.training.optim import TrainState, zero_grads
from nemo_opdlm.training.teacher_stream import TEACHER_KEYS, split_outputs, stream_chunks, streamed_seq_length


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


def own_layout(teacher: list) -> bool:
    """The teacher runs at a layout of its own (``parallel.teacher``), on groups of its own."""
    return parallel_of(teacher).own_groups


EXCHANGE_ROWS = "teacher_rows"
"""Where a micro-batch carries its inputs for a teacher at its own layout whose targets are
exchanged inside the loss function (``teacher_exchange.Rows``)."""


def targets_in_pass(cfg: RunConfig, teacher: list, *, upfront: bool, packed: bool) -> bool:
    """Whether each micro-batch's teacher targets are made during the student's pass (inside the
    loss function, or riding the pipeline: ``teacher_stream.py``) rather than all before it.

    During the pass at most the micro-batches in flight hold targets (full-vocabulary targets are
    ``L x V`` floats per row). ``upfront`` (a benchmark's choice: the teacher's time apart) asks for
    all before it; so does a teacher at its own layout whose exchange cannot run per micro-batch
    (``ParallelLayout.exchange_per_microbatch``: not with packed rows or student PP > 1)."""
    if upfront:
        return False
    return not own_layout(teacher) or cfg.parallel.exchange_per_microbatch(packed)


def attach_teacher_targets(cfg: RunConfig, teacher: list, resp: Responses, microbatches: list[dict], *,
                           student: ParallelContext, upfront: bool = False,
                           groups: Optional[list[Tensor]] = None) -> None:
    """Give each micro-batch its teacher's inputs, or (``targets_in_pass`` false) its targets, on
    ``student``'s last stage.

    ``groups``: each micro-batch's row indices (packed rows, ``packing.pack_rows``); None =
    consecutive equal splits. A teacher at its own layout (``own_layout``) runs on its own groups
    and sends the targets to ``student``'s last stage (``distill/teacher_exchange.py``).
    """
    n = len(microbatches)
    per_row = dict(prompt_ids=resp.prompt_ids, prompt_lens=resp.prompt_lens, x0=resp.tokens, valid=resp.valid)
    if groups is None:
        rows = split_microbatches(per_row, n)
    else:
        rows = [{k: v[index] for k, v in per_row.items()} for index in groups]
    in_pass = targets_in_pass(cfg, teacher, upfront=upfront, packed=groups is not None)
    if own_layout(teacher):
        if in_pass:
            for mb, r in zip(microbatches, rows):
                mb[EXCHANGE_ROWS] = r
        else:
            _store_targets(microbatches, _exchanged(cfg, teacher, student, rows))
        return
    batches = [teacher_batch(r["prompt_ids"], r["prompt_lens"], r["x0"], r["valid"]) for r in rows]
    if in_pass:
        for mb, tb in zip(microbatches, batches):
            mb.update({f"teacher_{k}": v for k, v in tb.items()})
        return
    _store_targets(microbatches, compute_targets(teacher, batches, resp.prompt_ids.shape[1], resp.tokens.shape[1],
                                                 cfg.distill.top_k))


def _exchanged(cfg: RunConfig, teacher: list, student: ParallelContext, rows: list[dict]) -> list:
    """``rows``' targets from a teacher at its own layout (``teacher_exchange.exchange_targets``)."""
    return exchange_targets(teacher, student, rows, cfg.distill.top_k,
                            student_vocab=cfg.model.padded_vocab_size(student.tp_size),
                            teacher_vocab=cfg.teacher.padded_vocab_size(parallel_of(teacher).tp_size))


def _store_targets(microbatches: list[dict], targets: list) -> None:
    """Each micro-batch's targets (present on the student's last stage only)."""
    for mb, target in zip(microbatches, targets):
        mb["t_logprobs"] = target.logprobs
        if target.ids is not None:
            mb["t_ids"] = target.ids


def teacher_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    """A micro-batch's teacher inputs for a streamed teacher chunk (``teacher_stream.py``)."""
    return {"teacher_batch": dict({k: batch[k] for k in TEACHER_KEYS}, response_len=batch["loss_mask"].shape[1])}


TargetsFn = Callable[[dict], tuple[Tensor, Optional[Tensor]]]
"""A micro-batch's teacher inputs -> its targets ``(log-probs, top-k ids or None)``."""


def in_loss_targets(cfg: RunConfig, teacher: list, student: ParallelContext) -> TargetsFn:
    """How the loss function turns the inputs ``attach_teacher_targets`` left in a micro-batch into
    its targets: the teacher's forward on the student's groups, or for a teacher at its own layout
    the exchange with it, one micro-batch per call on every rank
    (``ParallelLayout.exchange_per_microbatch``)."""
    if not own_layout(teacher):
        return lambda batch: _lazy_targets(teacher, batch, cfg.distill.top_k)

    def exchanged(batch: dict) -> tuple[Tensor, Optional[Tensor]]:
        (target,) = _exchanged(cfg, teacher, student, [batch[EXCHANGE_ROWS]])
        return target.logprobs, target.ids

    return exchanged


@torch.no_grad()
def _lazy_targets(teacher: list, batch: dict[str, Tensor], top_k: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    ids = batch["teacher_input_ids"]
    length = batch["loss_mask"].shape[1]
    logits = teacher[0](ids, batch["teacher_position_ids"], batch["teacher_meta"],
                        logits_last=logits_needed(length))  # [B, L + 1, V/tp]
    target = shifted_targets(logits, ids.shape[1] - length, length, top_k, parallel_of(teacher).tp_group)
    return target.logprobs, target.ids


def make_loss_fn(method: str | Method, num_sequences: int, scale: float, tp_group: Group,
                 targets: Optional[TargetsFn] = None):
    """megatron-core ``loss_func`` for one micro-batch: ``(loss * scale, reported metrics)``.

    ``method``'s loss (a ``distill.method`` name or its ``Method``). ``scale`` = micro-batches x DP
    size: the schedule divides by the former and DDP averages over the latter, while
    ``distill/loss.py`` already divides by the global sequence count. ``tp_group``: the group the
    student's vocabulary is split over. ``targets``: on a single pipeline stage, how the inputs
    ``attach_teacher_targets`` stored become targets here (``in_loss_targets``); with a teacher
    riding the pipeline the targets arrive with the logits (``teacher_stream.split_outputs``).
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


def forward_backward(cfg: RunConfig, batch: PromptBatch, state: TrainState, teacher: Optional[list],
                     eos_ids: Sequence[int], pad_id: int, *, seed: int, length: int, upfront_teacher: bool = False,
                     sync: Callable[[], None] = lambda: None) -> StepOutcome:
    """Responses -> states -> teacher targets -> forward/backward of the student, gradients left in
    the DDP buffers for the optimizer (the trainer's step and the GPU benchmark's, one code path).

    ``seed`` seeds the rollout and the states (offset by the data-parallel rank); ``upfront_teacher``:
    see ``targets_in_pass``; ``sync`` is called before each phase ends (a benchmark passes
    ``torch.cuda.synchronize`` so that the seconds are the device's).
    """
    parallel = parallel_of(state.chunks)
    t0 = time.perf_counter()
    scfg = sampler_config(cfg, eos_ids, pad_id, seed, max_new_tokens=length)
    resp = get_responses(cfg, batch, state.chunks, teacher, scfg, length)
    sync()
    t1 = time.perf_counter()
    generator = torch.Generator().manual_seed(noise_seed(seed, parallel.dp_rank))
    framed = on_grid(cfg, resp, pad_id)
    rows = training_rows(cfg, framed, eos_ids, generator)
    microbatches, groups = make_microbatches(cfg, rows, pad_id)
    n_mb = len(microbatches)
    if teacher is not None:
        attach_teacher_targets(cfg, teacher, framed, microbatches, student=parallel, upfront=upfront_teacher,
                               groups=groups)
    num_seq = losses.count_sequences([mb["loss_mask"] for mb in microbatches], parallel.dp_group)
    lazy = teacher is not None and targets_in_pass(cfg, teacher, upfront=upfront_teacher,
                                                   packed=groups is not None)
    sync()
    t2 = time.perf_counter()
    zero_grads(state)
    chunks, in_loss = state.chunks, in_loss_targets(cfg, teacher, parallel) if lazy else None
    schedule_args = student_outputs(cfg, rows) if groups is None else {}  # packed: per micro-batch columns
    if lazy and parallel.pp_size > 1:  # a teacher sharing the student's layout (an own one streams at PP=1 only)
        chunks, in_loss = stream_chunks(state.chunks, teacher, cfg.distill.top_k), None
        schedule_args.update(model_kwargs=teacher_inputs, seq_length=streamed_seq_length(
            chunks, rows["input_ids"].shape[1], microbatches[0]["teacher_input_ids"].shape[1]))
    loss_fn = make_loss_fn(cfg.distill.method, num_seq, n_mb * parallel.dp_size, parallel.tp_group, in_loss)
    reported = run_schedule(chunks, microbatches, loss_fn, forward_only=False, **schedule_args)
    sync()
    seconds = {"rollout_s": t1 - t0, "teacher_s": t2 - t1, "student_fwd_bwd_s": time.perf_counter() - t2}
    return StepOutcome(resp, rows, reported, seconds)


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
        return {"logits_last": logits_needed(length)}
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
