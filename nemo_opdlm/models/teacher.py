"""The frozen AR teacher: the same decoder as the student, read with a causal mask.

One job: build the teacher's chunks frozen (eval mode, no gradients) and give its logits.
Targets (shift, log-probs, top-k) are computed in ``teacher/targets.py``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from nemo_opdlm.models.config import ModelConfig
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.models.student import build_chunks
from nemo_opdlm.runtime.context import ParallelContext


def freeze(chunks: list[DiffusionGPTModel]) -> list[DiffusionGPTModel]:
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks


def build_teacher(model: ModelConfig, parallel: ParallelContext) -> list[DiffusionGPTModel]:
    """Frozen teacher chunks for ``parallel``'s layout (weights are loaded by ``convert/``)."""
    return freeze(build_chunks(model, parallel))


def offload(chunks: list[DiffusionGPTModel], device: torch.device | str) -> None:
    """Move the teacher's weights to ``device`` (e.g. CPU between uses when GPU memory is tight)."""
    for chunk in chunks:
        chunk.to(device)


@contextlib.contextmanager
def resident(chunks: Optional[list[DiffusionGPTModel]], enabled: bool) -> Iterator[None]:
    """With ``enabled`` on a GPU: the teacher's weights live on the GPU only inside this block."""
    if chunks is None or not enabled or not torch.cuda.is_available():
        yield
        return
    offload(chunks, torch.device("cuda", torch.cuda.current_device()))
    try:
        yield
    finally:
        offload(chunks, "cpu")
        torch.cuda.empty_cache()
