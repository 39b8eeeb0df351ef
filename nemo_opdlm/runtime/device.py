"""Device scopes the runtime offers to the code above it.

One job: the runtime's answers to "this block of code only decodes" and "wait for the device": on a CPU machine the
compatibility layer rewrites every ``device='cuda'`` of megatron-core to the CPU with a torch-function
mode that sees every torch call, and a decode (many short forwards, no backward, no optimizer)
never asks for CUDA, so the mode is lifted for it; on a GPU nothing changes. Callers (the rollout
sampler) use this scope instead of knowing about the compatibility layer. Non-goals: the patches
themselves (``cpu_compat.py``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from nemo_opdlm.runtime import cpu_compat


@contextlib.contextmanager
def decoding_scope() -> Iterator[None]:
    """Run a decode (forward-only model calls) with the least device machinery around it."""
    with cpu_compat.device_mode_suspended():
        yield


def synchronize() -> None:
    """Wait for the device's queued work (on a GPU), so that a wall-clock phase time is the device's;
    nothing on a CPU. One wait per phase of a step costs nothing next to the phase."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_gib_since_last_call() -> "float | None":
    """The device's peak allocated memory (GiB) since the previous call, then the peak is reset, so
    that consecutive calls give each phase of a step its own peak (megatron-core's
    ``mem-max-allocated-bytes``, per phase); None without a CUDA device. Allocated tensors only:
    the CUDA context, NCCL buffers and the allocator's cache are not in it (``opdlm plan`` counts
    them apart)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


class PhaseClock:
    """Seconds and peak device memory of consecutive phases of a step: ``mark(name)`` ends the
    phase ``name`` (the device synchronised first, so the time is the device's) and starts the
    next. ``seconds[f"{name}_s"]``; ``peak_gib[name]`` only with a CUDA device."""

    def __init__(self) -> None:
        peak_gib_since_last_call()
        self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    def mark(self, name: str) -> None:
        synchronize()
        now = time.perf_counter()
        self.seconds[f"{name}_s"] = now - self._start
        self._start = now
        peak = peak_gib_since_last_call()
        if peak is not None:
            self.peak_gib[name] = peak
