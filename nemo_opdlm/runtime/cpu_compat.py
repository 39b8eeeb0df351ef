"""Run the real megatron-core code paths on a machine without CUDA.

This is the only module in the project that patches megatron-core or torch. It does nothing when
CUDA is available: on a GPU cluster megatron-core runs unchanged.

megatron-core (0.16 - 0.19) assumes CUDA in a handful of places; each patch below names the place
it serves. With this layer on, TP=2 equals TP=1 (logits, gradients), PP=2 equals PP=1 and
dist_checkpointing round trips are exact: ``tests/test_parallel.py`` and ``tests/test_convert_dist.py``
check it on every run.

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

Every replaced symbol is listed once (``_patches``) and checked before anything is replaced
(``check_footing``): a torch or megatron-core release that renames one, or changes the parameters
a stand-in mirrors, stops the run with the symbol and the versions named instead of leaving a
silent no-op. ``cpu_compat()`` scopes the layer to a block (tests); the runtime turns it on for
the life of the process.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

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


@dataclass(frozen=True)
class _Patch:
    """One attribute replaced while the layer is on, and what it must look like before."""

    owner: Any
    """The module or class holding the attribute."""
    name: str
    replacement: Any
    params: Optional[tuple[str, ...]] = None
    """The parameter names the original must have (megatron-core internals the replacement stands
    in for: a renamed or re-ordered parameter would make the replacement silently wrong)."""

    def where(self) -> str:
        return f"{getattr(self.owner, '__module__', '')}.{getattr(self.owner, '__qualname__', self.owner.__name__)}.{self.name}"


def _set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _nothing() -> Any:
    """A fresh no-op function: one object per replaced name (torch.compile keeps a rule per torch
    function and refuses one object registered under two names with different rules)."""
    return lambda *a, **k: None


def _patches(mode: TorchFunctionMode) -> list[_Patch]:
    """Every replacement the layer makes (see the module docstring for why each is needed)."""
    from megatron.core.tensor_parallel import random as mcore_random
    from torch.autograd.function import BackwardCFunction

    cuda = torch.cuda
    original_apply = BackwardCFunction.apply

    def apply_with_mode(self: Any, *args: Any) -> Any:  # re-enter the device mode in backward (recompute)
        with mode:
            return original_apply(self, *args)

    return [
        _Patch(cuda, "current_device", lambda: _CPU),
        _Patch(cuda, "set_device", _nothing()),
        _Patch(cuda, "synchronize", _nothing()),
        _Patch(cuda, "empty_cache", _nothing()),
        _Patch(cuda, "Stream", _NullStream),
        _Patch(cuda, "Event", _NullStream),
        _Patch(cuda, "current_stream", lambda *a, **k: _NullStream()),
        _Patch(cuda, "default_stream", lambda *a, **k: _NullStream()),
        _Patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        _Patch(cuda, "device", lambda *a, **k: contextlib.nullcontext()),
        _Patch(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        _Patch(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        _Patch(cuda.random, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        _Patch(cuda.random, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        # Seed the CPU generator itself: torch.manual_seed would call back into torch.cuda.
        _Patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed))),
        _Patch(cuda, "max_memory_allocated", lambda *a, **k: 0),
        _Patch(cuda, "memory_allocated", lambda *a, **k: 0),
        _Patch(cuda, "reset_peak_memory_stats", _nothing()),
        _Patch(torch.Tensor, "cuda", lambda self, *a, **k: self),
        _Patch(torch.Tensor, "type", _cuda_type_name),
        _Patch(BackwardCFunction, "apply", apply_with_mode),
        _Patch(mcore_random, "_set_cuda_rng_state", _set_rng_state, ("new_state", "device", "graph_safe")),
        _Patch(mcore_random, "_get_cuda_rng_state", _get_rng_state, ("device", "clone", "graph_safe")),
    ]


def check_footing(patches: list[_Patch]) -> None:
    """Every symbol the layer replaces must exist, and megatron-core's with the parameters the
    replacement mirrors: otherwise a new torch or megatron-core would leave a patch a silent no-op
    (or a wrong stand-in). Raises RuntimeError naming the symbol and the installed versions."""
    import megatron.core

    versions = f"torch {torch.__version__}, megatron-core {getattr(megatron.core, '__version__', '?')}"
    for patch in patches:
        if not hasattr(patch.owner, patch.name):
            raise RuntimeError(f"CPU compatibility layer: {patch.where()} does not exist in this installation "
                               f"({versions}); the layer needs updating for it (runtime/cpu_compat.py)")
        if patch.params is not None:
            found = tuple(inspect.signature(getattr(patch.owner, patch.name)).parameters)
            if found != patch.params:
                raise RuntimeError(f"CPU compatibility layer: {patch.where()} takes {found}, the layer mirrors "
                                   f"{patch.params} ({versions}); update runtime/cpu_compat.py")


_SAVED: list[tuple[_Patch, Any]] = []


def _apply(patches: list[_Patch]) -> None:
    for patch in patches:
        _SAVED.append((patch, getattr(patch.owner, patch.name)))
        setattr(patch.owner, patch.name, patch.replacement)


def _restore() -> None:
    while _SAVED:
        patch, original = _SAVED.pop()
        setattr(patch.owner, patch.name, original)


def _filter_rng_messages() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    logging.getLogger(mcore_random.__name__).addFilter(_SpuriousRngMessageFilter())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_SpuriousRngMessageFilter())


def enable_cpu_compat() -> bool:
    """Apply the CPU patches once, before megatron-core builds anything. Returns whether they apply.

    Idempotent. A no-op (returns False) when CUDA is available. Checks its footing first
    (``check_footing``): a missing or changed symbol is an error, not a silent no-op.
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    mode = _CudaToCpuMode()
    patches = _patches(mode)
    check_footing(patches)
    _MODE = mode
    _MODE.__enter__()  # process-wide: stays active until disable_cpu_compat
    _apply(patches)
    _filter_rng_messages()
    _ENABLED = True
    return True


def disable_cpu_compat() -> None:
    """Undo ``enable_cpu_compat``: every original restored and the device mode left."""
    global _ENABLED, _MODE
    if not _ENABLED:
        return
    _restore()
    assert _MODE is not None
    _MODE.__exit__(None, None, None)
    _MODE, _ENABLED = None, False


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """The layer on for a block (tests): enabled on entry if it was not, and undone on exit if it
    was enabled here. Yields whether it is on (False with CUDA)."""
    owned = not _ENABLED
    on = enable_cpu_compat()
    try:
        yield on
    finally:
        if owned and on:
            disable_cpu_compat()


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
