"""Run the real megatron-core code paths on a machine without CUDA.

This is the only module in the project that patches megatron-core or torch. It does nothing when
CUDA is available: on a GPU cluster megatron-core runs unchanged.

megatron-core (0.16 - 0.19) assumes CUDA in a handful of places; each patch below names the place
it serves. What was measured with this layer on (TP=2 == TP=1 logits and grads, PP=2 == PP=1 grads,
exact dist_checkpointing round trips) is recorded in the project notes; the tests re-check it.

- Literal ``device="cuda"`` arguments and ``.to("cuda")`` in tensor factories (default masks,
  schedule token counters, optimizer/clip-grad scratch tensors): a ``TorchFunctionMode`` rewrites a
  CUDA device to the CPU. Torch-function modes are not active inside autograd's backward, and
  activation recompute runs forward code there, so the mode is re-entered around backward nodes.
- ``torch.cuda.current_device()`` used as a device (RoPE, DDP buffers, TP layers, p2p): the CPU.
- ``Tensor.cuda()``: the identity.
- CUDA RNG: mapped onto the CPU default generator, and megatron's ``_set_cuda_rng_state`` sets it
  directly (on a CPU build ``torch.cuda._lazy_call`` never runs its callback, which would make the
  RNG tracker's streams silently identical and dropout silently differ across TP ranks).
- ``Tensor.type()`` reports CUDA type names, because the optimizers and grad clipping compare type
  strings such as ``'torch.cuda.FloatTensor'``. Process-wide, which is why this only runs on CPU.
- Streams, events, ``synchronize`` and ``empty_cache``: no-ops.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "TorchFunctionMode | None" = None
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device='cuda'`` keyword arguments and ``.to('cuda')`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _SpuriousRngMessageFilter(logging.Filter):
    """megatron warns on every RNG fork that the CPU state changed: expected on CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cuda_type_name(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    name = _ORIGINAL_TENSOR_TYPE(tensor, *args, **kwargs)
    if args or kwargs:
        return name
    return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and ".cuda." not in name else name


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    cuda.Event = _NullStream  # type: ignore[assignment,misc]
    cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    cuda.default_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.device = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # type: ignore[assignment]
    cuda.random.get_rng_state = cuda.get_rng_state  # type: ignore[assignment]
    cuda.random.set_rng_state = cuda.set_rng_state  # type: ignore[assignment]
    # Seed the CPU generator itself: torch.manual_seed would call back into torch.cuda.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    cuda.reset_peak_memory_stats = lambda *a, **k: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    torch.Tensor.type = _cuda_type_name  # type: ignore[assignment]


def _patch_backward_mode(mode: TorchFunctionMode) -> None:
    """Re-enter the device mode inside autograd backward (activation recompute runs forward code)."""
    from torch.autograd.function import BackwardCFunction

    original_apply = BackwardCFunction.apply

    def apply_with_mode(self: Any, *args: Any) -> Any:
        with mode:
            return original_apply(self, *args)

    BackwardCFunction.apply = apply_with_mode  # type: ignore[assignment]


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    def _set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    mcore_random._set_cuda_rng_state = _set_rng_state
    mcore_random._get_cuda_rng_state = _get_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_SpuriousRngMessageFilter())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_SpuriousRngMessageFilter())


def enable_cpu_compat() -> bool:
    """Apply the CPU patches once, before megatron-core builds anything. Returns whether they apply.

    Idempotent. A no-op (returns False) when CUDA is available.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # process-wide: stays active for the life of the process
    _patch_torch_cuda()
    _patch_backward_mode(_MODE)
    _patch_megatron_rng()
    _ENABLED = True
    return True


@contextlib.contextmanager
def device_mode_suspended():
    """Lift the ``device='cuda'`` rewriting mode for a block of code that never asks for CUDA.

    The mode sees every torch call: in a rollout of a small model (many short forwards, no
    backward, no optimizer) its dispatch costs about a quarter of the time. The decode forward
    uses no CUDA literals (megatron-core's ``torch.cuda.current_device()`` is patched apart), so
    the sampler runs without it. A no-op when the mode is not on top of the mode stack (CUDA
    present, patches not applied, or another mode entered above it).
    """
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield


def cpu_compat_enabled() -> bool:
    """Whether the CPU patches are active in this process."""
    return _ENABLED
