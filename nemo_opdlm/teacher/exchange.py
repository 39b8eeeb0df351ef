"""Teacher targets across two layouts: inputs to the teacher replica that serves them, targets back.

One job: when the teacher has its own TP/PP (``parallel.teacher``), move each student data-parallel
replica's teacher inputs (prompt and ``x0`` ids) to the teacher replica that serves it, run the
teacher there, and send the targets back to the student's last pipeline stage, cut as the
student's vocabulary split needs them. Top-k targets (values and global ids) are small and go whole
to every student TP rank; full-vocabulary log-probs are re-cut from the teacher's vocabulary
shards (``V_t / tp_t`` each) to the student's (``V_s / tp_s``), piece by overlapping piece, the
padding past either vocabulary ``-inf`` (probability 0), as the teacher's own padding already is.

Student replica ``d`` is served by teacher replica ``d mod DP_t``: with a bigger teacher DP_t <=
DP_s, and every teacher replica serves the same number of student replicas when DP_t divides DP_s.
Every rank holds both a student and a teacher shard, so every rank takes part: the same point-to-point
exchange runs over gloo on CPU and NCCL on GPU (``dist.batch_isend_irecv``). With one student
pipeline stage and padded micro-batches it runs once per micro-batch, inside the student's loss
function (``route.py``'s ``in_loss`` route), so one micro-batch of targets is alive at a
time; otherwise the targets of all of a rank's micro-batches are computed before the student's pass
(the teacher runs on other groups and cannot ride the student's pipeline,
``teacher/stream.py``). ``opdlm plan`` counts either.
Non-goals: the groups (``runtime/teacher_groups.py``), the targets' math (``targets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_opdlm.teacher.targets import TeacherTargets, compute_targets, teacher_batch
from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.runtime.comm import collective_device
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.runtime.teacher_groups import Grid

Rows = dict[str, Tensor]
"""One micro-batch's teacher inputs: ``prompt_ids [B, P]``, ``prompt_lens [B]``, ``x0 [B, L]``,
``valid [B, L]``."""


@dataclass(frozen=True)
class Routes:
    """Who sends what to whom, computed alike on every rank from the two layouts."""

    student: Grid
    teacher: Grid

    def server(self, student_dp: int) -> int:
        """The teacher replica that computes student replica ``student_dp``'s targets."""
        return student_dp % self.teacher.dp

    def served(self, teacher_dp: int) -> list[int]:
        """The student replicas teacher replica ``teacher_dp`` serves, in the order it serves them."""
        return [d for d in range(self.student.dp) if self.server(d) == teacher_dp]

    def round_of(self, student_dp: int) -> int:
        """The round in which ``student_dp`` is served: its place in ``served(server(student_dp))``."""
        return student_dp // self.teacher.dp

    @property
    def rounds(self) -> int:
        return -(-self.student.dp // self.teacher.dp)

    def replica(self, grid: Grid, dp: int) -> list[int]:
        """World ranks of data-parallel replica ``dp`` of ``grid``, in rank order."""
        return sorted(grid.rank(t, dp, p) for t in range(grid.tp) for p in range(grid.pp))

    def input_sources(self, student_dp: int) -> dict[int, int]:
        """For each rank of the serving teacher replica, the student rank it reads ``student_dp``'s
        inputs from: itself when it belongs to that student replica, else one of them in turn."""
        owners = self.replica(self.student, student_dp)
        readers = self.replica(self.teacher, self.server(student_dp))
        return {r: r if r in owners else owners[i % len(owners)] for i, r in enumerate(readers)}

    def target_pieces(self, student_dp: int, student_vocab: int, teacher_vocab: Optional[int]
                      ) -> list[tuple[int, int, slice, slice]]:
        """``(teacher rank, student rank, teacher columns, student columns)`` of every piece of
        ``student_dp``'s targets. ``*_vocab``: each side's vocabulary shard width; ``teacher_vocab``
        None: top-k targets, sent whole (all columns) from teacher TP rank ``t mod TP_t`` to student
        TP rank ``t``, the sends spread over the teacher's TP ranks."""
        e, last_t, last_s = self.server(student_dp), self.teacher.pp - 1, self.student.pp - 1
        pieces = []
        for ts in range(self.student.tp):
            dst = self.student.rank(ts, student_dp, last_s)
            if teacher_vocab is None:
                src = self.teacher.rank(ts % self.teacher.tp, e, last_t)
                pieces.append((src, dst, slice(None), slice(None)))
                continue
            lo, hi = ts * student_vocab, (ts + 1) * student_vocab  # global ids this student rank holds
            for tt in range(self.teacher.tp):
                a, b = max(lo, tt * teacher_vocab), min(hi, (tt + 1) * teacher_vocab)
                if a < b:
                    src = self.teacher.rank(tt, e, last_t)
                    pieces.append((src, dst, slice(a - tt * teacher_vocab, b - tt * teacher_vocab),
                                   slice(a - lo, b - lo)))
        return pieces


def routes(student: ParallelContext, teacher: ParallelContext) -> Routes:
    return Routes(Grid.of_context(student), Grid.of_context(teacher))


def _pack_inputs(rows: Sequence[Rows]) -> Tensor:
    """``[N, P + 2L + 1]`` int64: every micro-batch's rows, one after another, as
    ``prompt_ids | x0 | valid | prompt_len``."""
    return torch.cat([torch.cat([r["prompt_ids"], r["x0"], r["valid"].long(), r["prompt_lens"][:, None]], 1)
                      for r in rows]).long()


def _unpack_inputs(packed: Tensor, sizes: Sequence[int], prompt_width: int, length: int) -> list[Rows]:
    p, l_ = prompt_width, length
    return [dict(prompt_ids=part[:, :p], x0=part[:, p:p + l_], valid=part[:, p + l_:p + 2 * l_].bool(),
                 prompt_lens=part[:, -1]) for part in packed.split(list(sizes))]


def _exchange(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]]) -> None:
    """Post every send and receive of this rank at once, then wait for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends] + [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


@torch.no_grad()
def exchange_targets(teacher: list, student: ParallelContext, rows: Sequence[Rows], top_k: Optional[int], *,
                     student_vocab: int, teacher_vocab: int) -> list[TeacherTargets]:
    """This rank's micro-batches' teacher targets, computed by a teacher at another layout.

    Collective over the world: every rank calls it with its micro-batches' ``rows``, once per step or
    once per micro-batch (``route.py``: ``before_pass`` or ``in_loss``).
    ``student_vocab``/``teacher_vocab``: each model's padded vocabulary (both layouts' shards are
    cut from them). Returns one ``TeacherTargets`` per micro-batch on the student's last pipeline
    stage (its vocabulary shard for full-vocabulary targets), an empty list elsewhere.

    A teacher replica serving several student replicas computes and sends their targets one replica
    per round (replica d in round d // DP_t), so that it holds one replica's targets at a time."""
    t_ctx = parallel_of(teacher)
    plan = routes(student, t_ctx)
    me, device = dist.get_rank(), collective_device()
    if plan.student.rank(student.tp_rank, student.dp_rank, student.pp_rank) != me:
        raise RuntimeError(f"rank {me}: the student's groups are not in megatron-core's tp-dp-pp rank order")
    shapes = _replica_shapes(student.dp_rank, rows)
    inputs = _send_inputs(plan, me, _pack_inputs(rows).to(device), shapes, device)
    s_width = student_vocab // plan.student.tp
    t_width = None if top_k is not None else teacher_vocab // plan.teacher.tp
    sizes = [int(r["x0"].shape[0]) for r in rows]
    out = _target_buffers(sum(sizes), int(rows[0]["x0"].shape[1]), top_k or s_width, top_k is not None,
                          device) if student.is_last_stage else []
    for round_ in range(plan.rounds):
        replicas = [d for d in range(plan.student.dp) if plan.round_of(d) == round_]
        computed = {}
        for d in replicas:
            if d in inputs:  # this rank's teacher replica serves d
                sizes_d, p, l_ = shapes[d]
                parts = _unpack_inputs(inputs.pop(d), sizes_d, p, l_)
                if t_ctx.pp_size > 1:
                    parts = _equal_microbatches(parts)
                batches = [teacher_batch(r["prompt_ids"], r["prompt_lens"], r["x0"], r["valid"]) for r in parts]
                computed[d] = compute_targets(teacher, batches, p, l_, top_k)  # filled on its last stage only
        _send_targets(plan, me, replicas, computed, out, s_width, t_width)
    if not out:
        return []
    values = out[0].split(sizes)
    ids = out[1].split(sizes) if top_k is not None else [None] * len(sizes)
    return [TeacherTargets(v, i) for v, i in zip(values, ids)]


def _equal_microbatches(parts: list[Rows]) -> list[Rows]:
    """``parts`` as micro-batches of one size: a pipeline's stages send each other tensors of one
    shape for every micro-batch, and packed student rows come in groups of different sizes. Unequal
    groups are cut into one-row micro-batches (each row's targets depend on that row alone, and the
    rows keep their order: the targets are concatenated along the rows again)."""
    if len({int(r["x0"].shape[0]) for r in parts}) <= 1:
        return parts
    whole = {k: torch.cat([r[k] for r in parts]) for k in parts[0]}
    return [{k: v[i:i + 1] for k, v in whole.items()} for i in range(int(whole["x0"].shape[0]))]


def _replica_shapes(student_dp: int, rows: Sequence[Rows]) -> dict[int, tuple[list[int], int, int]]:
    """Every student replica's ``(micro-batch row counts, P, L)``: what its receivers allocate."""
    shapes: list = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, (student_dp, [int(r["x0"].shape[0]) for r in rows],
                                    int(rows[0]["prompt_ids"].shape[1]), int(rows[0]["x0"].shape[1])))
    return {s[0]: s[1:] for s in shapes}


def _send_inputs(plan: Routes, me: int, mine: Tensor, shapes: dict, device: torch.device) -> dict[int, Tensor]:
    """Student replica d's packed inputs -> every rank of teacher replica ``server(d)``; returns the
    inputs this rank's teacher replica serves, by student replica."""
    inputs: dict[int, Tensor] = {}
    sends, recvs = [], []
    for d in range(plan.student.dp):
        sizes, p, l_ = shapes[d]
        for reader, src in plan.input_sources(d).items():
            if reader == me == src:
                inputs[d] = mine
            elif reader == me:
                inputs[d] = torch.empty(sum(sizes), p + 2 * l_ + 1, dtype=torch.long, device=device)
                recvs.append((inputs[d], src))
            elif src == me:
                sends.append((mine, reader))
    _exchange(sends, recvs)
    return inputs


def _send_targets(plan: Routes, me: int, replicas: list[int], computed: dict[int, list[TeacherTargets]],
                  out: list[Tensor], s_width: int, t_width: Optional[int]) -> None:
    """``replicas``' targets: teacher replica's last stage -> student replica's last stage, piece by
    piece (``Routes.target_pieces``), written into this rank's ``out`` where it is a receiver."""
    pending: list[tuple[slice, list[Tensor]]] = []
    sends, recvs = [], []
    for d in replicas:
        for src, dst, t_cols, s_cols in plan.target_pieces(d, s_width, t_width):
            if src == me:
                parts = _target_parts(computed[d], t_cols)
                if dst == me:
                    for buffer, part in zip(out, parts):
                        buffer[..., s_cols] = part
                else:
                    sends += [(part, dst) for part in parts]
            elif dst == me:
                buffers = [torch.empty(b[..., s_cols].shape, dtype=b.dtype, device=b.device) for b in out]  # dense
                recvs += [(b, src) for b in buffers]
                pending.append((s_cols, buffers))
    _exchange(sends, recvs)
    for s_cols, buffers in pending:
        for buffer, part in zip(out, buffers):
            buffer[..., s_cols] = part


def _target_buffers(rows: int, length: int, width: int, with_ids: bool, device: torch.device) -> list[Tensor]:
    """Where a student rank assembles its targets: log-probs ``[N, L, width]`` starting at ``-inf``
    (the vocabulary padding no piece covers), and for top-k the ids ``[N, L, k]``."""
    out = [torch.full((rows, length, width), float("-inf"), device=device)]
    if with_ids:
        out.append(torch.empty(rows, length, width, dtype=torch.long, device=device))
    return out


def _target_parts(targets: list[TeacherTargets], columns: slice) -> list[Tensor]:
    """A replica's targets, all micro-batches along the rows: the log-probs' ``columns`` (a
    vocabulary piece), and top-k's ids."""
    parts = [torch.cat([t.logprobs for t in targets])[..., columns].contiguous()]
    if targets[0].ids is not None:
        parts.append(torch.cat([t.ids for t in targets]))
    return parts
