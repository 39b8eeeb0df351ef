"""The teacher's pipeline pass riding the student's, one micro-batch at a time (PP > 1).

One job: with pipeline parallelism the colocated teacher's targets for a micro-batch exist only
after its own pass through every stage. Computing every micro-batch's targets before the student's
schedule holds all of them on the last stage for the whole step (full vocabulary: ``L x V`` fp32
per row, about 3 GB per 5,000-token row at Qwen3's 151,936 tokens). Instead, each stage runs its
teacher chunk on micro-batch ``i`` inside the student's forward of micro-batch ``i``, and the
teacher's hidden states travel to the next stage packed behind the student's in the same
point-to-point tensor (megatron-core's schedules send one tensor per micro-batch). The last stage
turns the teacher's logits into that micro-batch's targets just before its loss, so at most the
micro-batches in flight hold targets, whatever the micro-batch count, and the 1F1B schedule (and
its bubble) is unchanged. Non-goals: the targets' arithmetic (``teacher/targets.py``), a
teacher with its own parallel layout (it cannot ride the student's pipeline:
``teacher/exchange.py``).

The packing: the student's hidden states ``[S, B, H]`` and the teacher's ``[T, B, H_t]`` (its width
may differ) go out as ``[S + n, B, H]``, the teacher's flattened per row into ``n = ceil(T * H_t / H)``
columns of width ``H``. Gradients flow into the student part only: the teacher part is detached,
so its slice of the received gradient is zero.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.models.masks import logits_needed
from nemo_opdlm.teacher.targets import TeacherTargets, shifted_targets
from nemo_opdlm.models.student import parallel_of, unwrap

TEACHER_KEYS = ("teacher_input_ids", "teacher_position_ids", "teacher_meta")
"""Where a micro-batch carries the teacher's inputs (``route.LocalInLoss.prepare``)."""


def packed_columns(teacher_len: int, teacher_hidden: int, hidden: int) -> int:
    """Columns of width ``hidden`` that hold ``teacher_len`` teacher columns of ``teacher_hidden``."""
    return -(-teacher_len * teacher_hidden // hidden)


def pack(student: Tensor, teacher: Tensor) -> Tensor:
    """``[S, B, H]`` and ``[T, B, H_t]`` -> ``[S + n, B, H]`` (see the module docstring)."""
    seq, batch, hidden = student.shape
    flat = teacher.detach().to(student.dtype).transpose(0, 1).reshape(batch, -1)  # [B, T * H_t]
    n = packed_columns(teacher.shape[0], teacher.shape[2], hidden)
    flat = torch.nn.functional.pad(flat, (0, n * hidden - flat.shape[1]))
    return torch.cat([student, flat.view(batch, n, hidden).transpose(0, 1)], dim=0)


def unpack(packed: Tensor, student_len: int, teacher_len: int, teacher_hidden: int,
           teacher_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack`: the student's ``[S, B, H]`` (in the graph) and the teacher's
    ``[T, B, H_t]`` (detached, in ``teacher_dtype``)."""
    student = packed[:student_len]
    rest = packed[student_len:].detach().transpose(0, 1).reshape(packed.shape[1], -1)  # [B, n * H]
    teacher = rest[:, : teacher_len * teacher_hidden].reshape(packed.shape[1], teacher_len, teacher_hidden)
    return student, teacher.transpose(0, 1).to(teacher_dtype).contiguous()


class StreamedTeacherChunk(torch.nn.Module):
    """One pipeline chunk of the student (DDP-wrapped) with the teacher's chunk of the same stage.

    megatron-core's schedule and ``finalize_model_grads`` see the student: every attribute this
    class does not define is the student chunk's (its config, ``no_sync``, ``finish_grad_sync``,
    its parameters), and the teacher is held outside the module tree. The schedule calls
    :meth:`set_input_tensor` with the packed tensor from the previous stage; :meth:`forward` runs
    both chunks and returns the packed tensor, or on the last stage ``(student logits, targets)``.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, top_k: Optional[int]) -> None:
        super().__init__()
        self.module = student
        self._teacher = [teacher]  # a list: not a submodule (its frozen weights are no part of the student's)
        self.top_k = top_k
        self._received: Optional[Tensor] = None

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def set_input_tensor(self, input_tensor: Any) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        self._received = tensor

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, *,
                teacher_batch: dict[str, Tensor], logits_last: Optional[int] = None,
                logits_columns: Optional[Tensor] = None) -> Any:
        student_net, teacher_net = unwrap(self.module), self.teacher
        t_ids = teacher_batch["teacher_input_ids"]
        t_len, t_hidden = t_ids.shape[1], teacher_net.config.hidden_size
        if self._received is not None:  # not the first stage: split what the previous stage sent
            s_in, t_in = unpack(self._received, input_ids.shape[1], t_len, t_hidden, teacher_net.config.params_dtype)
            student_net.set_input_tensor(s_in)
            teacher_net.set_input_tensor(t_in)
        response_len = teacher_batch["response_len"]
        with torch.no_grad():
            t_out = teacher_net(t_ids, teacher_batch["teacher_position_ids"], teacher_batch["teacher_meta"],
                                logits_last=logits_needed(response_len))
        s_out = self.module(input_ids, position_ids, attention_mask, logits_last=logits_last,
                            logits_columns=logits_columns)
        if not student_net.post_process:
            return pack(s_out, t_out)
        with torch.no_grad():
            targets = shifted_targets(t_out, t_len - response_len, response_len, self.top_k,
                                      parallel_of([teacher_net]).tp_group)
        return s_out, targets


def stream_chunks(student: Sequence[torch.nn.Module], teacher: Sequence[torch.nn.Module],
                  top_k: Optional[int]) -> list[StreamedTeacherChunk]:
    """Pair each student chunk with the teacher chunk of the same stage (and virtual stage)."""
    if len(student) != len(teacher):
        raise ValueError(f"the student has {len(student)} pipeline chunks per rank and the teacher {len(teacher)}: "
                         "a streamed teacher needs the same (virtual) pipeline layout")
    return [StreamedTeacherChunk(s, t, top_k) for s, t in zip(student, teacher)]


def streamed_seq_length(chunks: Sequence[StreamedTeacherChunk], student_len: int, teacher_len: int) -> int:
    """The point-to-point sequence length megatron-core must allocate for packed tensors."""
    student_hidden = unwrap(chunks[0].module).config.hidden_size
    return student_len + packed_columns(teacher_len, chunks[0].teacher.config.hidden_size, student_hidden)


def split_outputs(output: Any) -> tuple[Tensor, Optional[TeacherTargets]]:
    """A last-stage output: ``(logits, targets)`` from a streamed chunk, else plain logits."""
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None
