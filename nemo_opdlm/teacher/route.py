"""Where the teacher's targets are computed, and how many are alive: one table, one contract.

One job: :func:`choose_route` is the single table that config validation, the training step and
``opdlm plan`` ask which route a run's teacher targets take; :func:`make_route` builds the route
object the step runs (its shape follows megatron-core's ``get_forward_backward_func``: one selector,
one contract). Non-goals: the targets' arithmetic (``targets.py``), moving them between layouts
(``exchange.py``), the pipeline packing (``stream.py``), the loss (``distill/loss.py``).

The routes (``ROUTES``), by what the run has:

- ``none``: no teacher (``sft``, ``ar``).
- ``in_loss``: the teacher runs inside the student's loss function, one micro-batch at a time: its
  forward on the student's groups (shared layout, one pipeline stage), or an exchange with the
  teacher at its own layout (``parallel.teacher``; one student stage and padded rows, so that every
  rank reaches each exchange in the same order).
- ``stream``: a teacher sharing the student's pipelined layout rides the student's pass, its
  hidden states packed behind the student's (``stream.py``).
- ``before_pass``: every micro-batch's targets computed before the student's pass and held
  through it: a teacher at its own layout when the exchange cannot run per micro-batch (student
  PP > 1: a stage waiting for activations cannot also wait in an exchange; packed rows: every rank
  has its own micro-batch count). A measurement may ask for it on the shared layout too (the
  teacher's time then stands apart).

A shared-layout teacher at PP > 1 with packed rows has no route: it rides padded rows only.

The route contract (:class:`TargetRoute`): ``prepare`` gives each micro-batch its teacher inputs or
its targets; ``targets`` is how the loss function turns a micro-batch's inputs into targets (None:
they are already there, or arrive with the logits); ``schedule`` gives the chunks and arguments the
student's schedule runs with.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.teacher.exchange import Rows, exchange_targets
from nemo_opdlm.teacher.stream import TEACHER_KEYS, stream_chunks, streamed_seq_length
from nemo_opdlm.models.masks import logits_needed
from nemo_opdlm.teacher.targets import TeacherTargets, compute_targets, shifted_targets, teacher_batch

ROUTES = ("none", "in_loss", "stream", "before_pass")
"""Where a micro-batch's teacher targets are computed (see the module docstring)."""
HELD = {"none": None, "in_loss": "one micro-batch", "stream": "one micro-batch", "before_pass": "a whole step"}
"""How many micro-batches of targets a route holds on the student's last stage during its pass."""

TargetsFn = Callable[[dict], tuple[Tensor, Optional[Tensor]]]
"""A micro-batch's teacher inputs -> its targets ``(log-probs, top-k ids or None)``."""
EXCHANGE_ROWS = "teacher_rows"
"""Where a micro-batch carries its inputs for a teacher at its own layout (``exchange.Rows``)."""


def choose_route(*, teacher: bool, own_layout: bool, pipelined: bool, packed: bool) -> Optional[str]:
    """The route of a run's teacher targets (``ROUTES``), or None for the combination no route
    serves (a shared-layout teacher at PP > 1 with packed rows).

    Args:
        teacher: the method has a teacher.
        own_layout: the teacher has its own TP/PP (``parallel.teacher``).
        pipelined: the student has more than one pipeline stage (or virtual stages).
        packed: micro-batches of packed rows (``train.pack_tokens``).
    """
    if not teacher:
        return "none"
    if own_layout:
        return "before_pass" if pipelined or packed else "in_loss"
    if pipelined:
        return None if packed else "stream"
    return "in_loss"


class TargetRoute:
    """The contract the step runs (the ``none`` route: no teacher, nothing to do)."""

    name = "none"

    @property
    def held(self) -> Optional[str]:
        return HELD[self.name]

    def prepare(self, rows: Sequence[Rows], microbatches: list[dict]) -> None:
        """Give each micro-batch (``rows[i]``: its teacher inputs) what its loss will need."""

    def targets(self) -> Optional[TargetsFn]:
        """How the loss function computes a micro-batch's targets; None when it needs not."""
        return None

    def schedule(self, student: list, microbatches: list[dict], student_len: int) -> tuple[list, dict[str, Any]]:
        """The model chunks the student's schedule runs, and more arguments for it
        (``pipeline.run_schedule``); ``student_len``: the student's rows' length."""
        return student, {}


class LocalInLoss(TargetRoute):
    """The teacher on the student's groups, inside the loss: its inputs travel in the micro-batch."""

    name = "in_loss"

    def __init__(self, teacher: list, top_k: Optional[int]) -> None:
        self.teacher, self.top_k = teacher, top_k

    def prepare(self, rows: Sequence[Rows], microbatches: list[dict]) -> None:
        for mb, r in zip(microbatches, rows):
            mb.update({f"teacher_{k}": v for k, v in teacher_batch(r["prompt_ids"], r["prompt_lens"], r["x0"],
                                                                   r["valid"]).items()})

    def targets(self) -> TargetsFn:
        return lambda batch: _teacher_forward(self.teacher, batch, self.top_k)


class ExchangeInLoss(TargetRoute):
    """A teacher at its own layout, exchanged with inside the loss, one micro-batch per call on every
    rank (collective over the world)."""

    name = "in_loss"

    def __init__(self, exchange: Callable[[Sequence[Rows]], list[TeacherTargets]]) -> None:
        self.exchange = exchange

    def prepare(self, rows: Sequence[Rows], microbatches: list[dict]) -> None:
        for mb, r in zip(microbatches, rows):
            mb[EXCHANGE_ROWS] = r

    def targets(self) -> TargetsFn:
        def exchanged(batch: dict) -> tuple[Tensor, Optional[Tensor]]:
            (target,) = self.exchange([batch[EXCHANGE_ROWS]])
            return target.logprobs, target.ids

        return exchanged


class Streamed(LocalInLoss):
    """A shared-layout teacher riding the student's pipeline pass: its chunks beside the student's,
    the targets arriving on the last stage with the logits."""

    name = "stream"

    def targets(self) -> None:
        return None

    def schedule(self, student: list, microbatches: list[dict], student_len: int) -> tuple[list, dict[str, Any]]:
        chunks = stream_chunks(student, self.teacher, self.top_k)
        length = streamed_seq_length(chunks, student_len, microbatches[0]["teacher_input_ids"].shape[1])
        return chunks, {"model_kwargs": teacher_inputs, "seq_length": length}


class BeforePass(TargetRoute):
    """Every micro-batch's targets computed before the student's pass, held through it."""

    name = "before_pass"

    def __init__(self, compute_all: Callable[[Sequence[Rows]], list[TeacherTargets]]) -> None:
        self.compute_all = compute_all

    def prepare(self, rows: Sequence[Rows], microbatches: list[dict]) -> None:
        for mb, target in zip(microbatches, self.compute_all(rows)):  # on the student's last stage only
            mb["t_logprobs"] = target.logprobs
            if target.ids is not None:
                mb["t_ids"] = target.ids


def make_route(name: str, *, teacher: Optional[list], student: ParallelContext, own_layout: bool,
               top_k: Optional[int], student_vocab: Optional[int] = None,
               teacher_vocab: Optional[int] = None) -> TargetRoute:
    """The route object of ``name`` (``choose_route``'s answer, or a measurement's choice) for this
    rank: ``teacher`` its teacher chunks, ``student`` the student's parallel context,
    ``*_vocab`` each model's padded vocabulary (needed by an own layout's exchange, which re-cuts
    full-vocabulary targets)."""
    if name not in ROUTES:
        raise ValueError(f"teacher route must be one of {ROUTES}, got {name!r}")
    if name == "none":
        return TargetRoute()
    assert teacher is not None, f"route {name!r} needs a teacher"
    assert not own_layout or (student_vocab and teacher_vocab), "an exchange needs both vocabularies"

    def exchanged(rows: Sequence[Rows]) -> list[TeacherTargets]:
        return exchange_targets(teacher, student, rows, top_k, student_vocab=student_vocab,
                                teacher_vocab=teacher_vocab)

    if name == "in_loss":
        return ExchangeInLoss(exchanged) if own_layout else LocalInLoss(teacher, top_k)
    if name == "stream":
        if own_layout:
            raise ValueError("a teacher at its own layout cannot ride the student's pipeline pass")
        return Streamed(teacher, top_k)

    def computed(rows: Sequence[Rows]) -> list[TeacherTargets]:
        batches = [teacher_batch(r["prompt_ids"], r["prompt_lens"], r["x0"], r["valid"]) for r in rows]
        return compute_targets(teacher, batches, rows[0]["prompt_ids"].shape[1], rows[0]["x0"].shape[1], top_k)

    return BeforePass(exchanged if own_layout else computed)


def teacher_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    """A micro-batch's teacher inputs for a streamed teacher chunk (``stream.py``)."""
    return {"teacher_batch": dict({k: batch[k] for k in TEACHER_KEYS}, response_len=batch["loss_mask"].shape[1])}


@torch.no_grad()
def _teacher_forward(teacher: list, batch: dict[str, Tensor], top_k: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """A micro-batch's targets from the teacher's forward on the student's groups."""
    ids = batch["teacher_input_ids"]
    length = batch["loss_mask"].shape[1]
    logits = teacher[0](ids, batch["teacher_position_ids"], batch["teacher_meta"],
                        logits_last=logits_needed(length))  # [B, L + 1, V/tp]
    target = shifted_targets(logits, ids.shape[1] - length, length, top_k, parallel_of(teacher).tp_group)
    return target.logprobs, target.ids
