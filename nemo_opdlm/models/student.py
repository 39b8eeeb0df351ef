"""The block-diffusion student: the teacher's architecture, read with block-diffusion metadata.

One job: build the student's model chunks (one per pipeline stage owned by this rank) and
initialise them from the teacher. The student is the same ``DiffusionGPTModel`` as the teacher;
only its inputs differ: block-causal metadata, ``[MASK]`` tokens, no logit shift.
"""

from __future__ import annotations

from typing import Optional

from typing import Sequence

import torch

from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.gpt import DiffusionGPTModel, build_gpt
from nemo_opdlm.runtime.context import ParallelContext


def build_chunks(model: ModelConfig, parallel: ParallelContext) -> list[DiffusionGPTModel]:
    """This rank's model chunks for ``parallel``'s layout (one per virtual pipeline stage)."""
    stages = [None] if parallel.vpp_size is None else list(range(parallel.vpp_size))
    return [build_gpt(model, parallel, vp_stage) for vp_stage in stages]


def parallel_of(chunks: Sequence[torch.nn.Module]) -> ParallelContext:
    """The layout model chunks were built for (through DDP / Float16Module wrappers)."""
    return unwrap(chunks[0]).parallel


def build_student(model: ModelConfig, diffusion: DiffusionConfig, parallel: ParallelContext) -> list[DiffusionGPTModel]:
    """The trainable student chunks (random init; load or ``from_teacher`` next)."""
    diffusion.check_vocab(model.vocab_size)
    return build_chunks(model, parallel)


@torch.no_grad()
def from_teacher(student: list[DiffusionGPTModel], teacher: list[DiffusionGPTModel]) -> None:
    """Copy the teacher's weights into the student exactly (same architecture and layout)."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} chunks, teacher {len(teacher)}: layouts differ")
    for s_chunk, t_chunk in zip(student, teacher):
        t_state = t_chunk.state_dict()
        s_state = s_chunk.state_dict()
        missing = sorted(set(s_state) ^ set(t_state))
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise ValueError(f"student and teacher parameters differ: {missing[:5]}")
        for name, tensor in s_state.items():
            if name.endswith("_extra_state"):
                continue
            source = t_state[name]
            if source.shape != tensor.shape:
                raise ValueError(f"{name}: student {tuple(tensor.shape)} vs teacher {tuple(source.shape)}")
            tensor.copy_(source)


def unwrap(model: torch.nn.Module) -> DiffusionGPTModel:
    """The DiffusionGPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(model, DiffusionGPTModel):
        inner: Optional[torch.nn.Module] = getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"no DiffusionGPTModel inside {type(model).__name__}")
        model = inner
    return model
