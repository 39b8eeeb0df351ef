"""``opdlm plan --measure``: the step ``memory.py`` models, run for real under fake tensors.

One job: build the student and the teacher at the recipe's layout, wrap the student for training
(DDP, the distributed optimizer), and run one training micro-batch of the real step
(``training.step.learn_from``: teacher targets, the student's forward and backward) and the
optimizer step, at the recipe's real shape, on this CPU, holding no memory: every tensor of the
models is a ``FakeTensor`` (shapes and dtypes only), TP and DP ranks are simulated in one process
by a fake process group, and ``MemTracker`` counts what each phase holds. torchtitan's
``scripts/estimate/estimation.py`` is the anchor for the technique.

What it does not run, and why:
- the rollout: its block KV cache and decoding logits stay the plan's closed form;
- pipeline parallelism (PP > 1 is refused): a fake group does not carry the stages' activations;
- FP8 (Transformer Engine's kernels have no fake implementations on a CPU machine): the measured
  configuration has ``model.fp8`` off, and the plan beside it is computed for the same config;
- the CUDA context, NCCL buffers and workspaces (the plan's overhead), which are not tensors.

How the real code is made to run under fake tensors (each a scoped patch, undone on exit):
- host work (the rows' layouts, counts read with ``int()``) runs on real tensors: an op whose
  tensor inputs are all real runs for real, and a boolean mask indexing a fake tensor becomes
  the real mask's indices (``HostOpsReal``);
- megatron-core asks for gloo subgroups and exchanges Python objects across ranks: the subgroups
  use the fake backend, and an object gathered from every rank is this rank's (ranks are alike);
- ``Module.to``/``.bfloat16()`` cannot swap a fake parameter (torch refuses: a weak reference
  is held): parameters are converted in place (``param.data = ...``);
- FlexAttention runs its fake implementation (the compiled kernel's outputs and saved tensors),
  its block mask built on the real metadata and handed over as fake tensors;
- collectives of fake tensors move nothing and allocate nothing: the fake group is given empty
  stand-ins.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.plan.layout import GIB, Cluster, Shape, check_layout
from nemo_opdlm.plan.memory import MemoryEstimate, estimate_memory

PHASES = ("teacher", "student_fwd_bwd", "optimizer")
"""The measured phases: ``learn_from``'s two (``runtime.device.PhaseClock``) and the optimizer
step; the plan's ``teacher`` and ``train`` phases are the first two."""
PLAN_PHASE = {"teacher": "teacher", "student_fwd_bwd": "train", "optimizer": "optimizer"}


@dataclass
class Measured:
    """Bytes held at each point of a measured step (one rank)."""

    points: dict[str, float] = field(default_factory=dict)
    """Held after each build: ``student weights``, ``+ teacher weights``, ``+ grads and fp32
    master`` (DDP, distributed optimizer), ``+ Adam moments`` (after the first optimizer step)."""
    peaks: dict[str, float] = field(default_factory=dict)
    """Peak total of each phase of a steady-state step (the moments already allocated)."""
    row_tokens: int = 0
    """Tokens of the student's row that ran ``[prompt | x0 | xt]``."""

    @property
    def peak(self) -> float:
        return max(self.peaks.values())


# --- fake tensors that let the host run for real ---------------------------------------------------


def _is_real(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)


class HostOpsReal(torch.utils._python_dispatch.TorchDispatchMode):
    """Above a ``FakeTensorMode``: ops on real tensors only run for real (host work: layouts,
    counts), boolean-mask indexing of a fake tensor by a real mask uses the mask's real indices,
    higher-order ops (FlexAttention) get their real tensor arguments as fakes, and collectives of
    fake tensors see empty real stand-ins."""

    supports_higher_order_operators = True
    _BOOL_INDEXING = ("aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")

    def __init__(self, fake_mode) -> None:
        super().__init__()
        self.fake_mode = fake_mode

    def _fake(self, t: Any) -> Any:
        return self.fake_mode.from_tensor(t) if _is_real(t) else t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._ops import HigherOrderOperator
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.utils._pytree import tree_flatten, tree_map

        kwargs = kwargs or {}
        if isinstance(func, HigherOrderOperator):
            return func(*tree_map(self._fake, args), **tree_map(self._fake, kwargs))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and all(_is_real(t) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if getattr(func, "namespace", None) == "c10d":
            with unset_fake_temporarily():
                def stand_in(t: Any) -> Any:
                    return t if not isinstance(t, torch.Tensor) or _is_real(t) else torch.empty(0, dtype=t.dtype)

                return func(*tree_map(stand_in, args), **tree_map(stand_in, kwargs))
        if func.name() in self._BOOL_INDEXING and any(_is_real(i) and i.dtype == torch.bool for i in args[1]
                                                      if i is not None):
            with unset_fake_temporarily():
                indices = [part for i in args[1] for part in
                           (i.nonzero(as_tuple=True) if _is_real(i) and i.dtype == torch.bool else (i,))]
            args = (args[0], indices, *args[2:])
        return func(*args, **kwargs)


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """``MemTracker`` for megatron-core modules and a step of several micro-batches: a module's
        ``buffers`` may be an attribute (DDP's grad buffers) rather than the method, frozen
        parameters take no gradient hooks, each micro-batch is a new iteration, and the peak can
        be restarted per phase."""

        supports_higher_order_operators = True

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(_ModuleView(module), install_grad_hooks)

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    self.reset_mod_stats()
            return super()._pre_fw_hook(module, inputs)

        def held(self) -> float:
            return float(sum(snap["Total"] for snap in self.get_tracker_snapshot("current").values()))

        def take_peak(self) -> float:
            """The peak total since the last call; the peak then restarts from what is held."""
            peak = float(sum(snap["Total"] for snap in self.get_tracker_snapshot("peak").values()))
            self._peak_mem_snap = self.get_tracker_snapshot("current")
            self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}
            return peak

    return Tracker


class _ModuleView:
    """A module's parameters that take gradients and its registered buffers, by ``nn.Module``'s own
    methods (megatron-core's DDP shadows ``buffers`` with a list)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def parameters(self, recurse: bool = True):
        return [p for p in torch.nn.Module.parameters(self.module, recurse) if p.requires_grad]

    def named_parameters(self, *args, **kwargs):
        return [(n, p) for n, p in torch.nn.Module.named_parameters(self.module, *args, **kwargs) if p.requires_grad]

    def buffers(self, recurse: bool = True):
        return torch.nn.Module.buffers(self.module, recurse)


class _PeakClock:
    """``PhaseClock``'s interface for ``learn_from``: each mark records the tracker's phase peak."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.peaks: dict[str, float] = {}
        tracker.take_peak()

    def mark(self, name: str) -> None:
        self.peaks[name] = self.tracker.take_peak()


def _convert_in_place(module: torch.nn.Module, fn: Callable, recurse: bool = True) -> torch.nn.Module:
    """``Module._apply`` without swapping parameters (a fake parameter cannot be swapped)."""
    if recurse:
        for child in module.children():
            _convert_in_place(child, fn)
    for p in module._parameters.values():
        if p is not None:
            with torch.no_grad():
                new = fn(p)
            if new is not p:
                p.data = new
    for key, b in module._buffers.items():
        if b is not None:
            module._buffers[key] = fn(b)
    return module


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


@contextlib.contextmanager
def fake_world(cfg, cluster: Cluster) -> Iterator[Any]:
    """A runtime of ``cfg``'s layout on ``cluster`` in this process (rank 0 of a fake process group of
    the cluster's world size), every scoped patch the module docstring lists, and the fake-tensor
    modes; yields ``(runtime, fake_mode, host_mode)``. Refuses a process that already runs a group."""
    import torch.distributed as dist
    import torch.nn.attention.flex_attention as flex
    from torch._subclasses import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401  (registers "fake")

    from nemo_opdlm.models import attention, masks
    from nemo_opdlm.runtime.distributed import init_runtime, shutdown_runtime

    if dist.is_initialized():
        raise ConfigError("opdlm plan --measure runs in a process of its own (a process group is already running)")
    world = cluster.world_size
    real_new_group = dist.new_group
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def new_group(*args, **kwargs):
        kwargs.pop("backend", None)  # megatron-core's gloo subgroups: the fake backend too
        return real_new_group(*args, **kwargs)

    def all_gather_object(out: list, obj: Any, group=None) -> None:
        out[:] = [copy.deepcopy(obj) for _ in out]  # every simulated rank is alike

    def block_mask(ctx, q_meta, k_meta):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            real = real_block_mask(ctx, q_meta, k_meta)
        fake = copy.copy(real)
        for name, value in list(vars(fake).items()):
            if _is_real(value):
                setattr(fake, name, fake_mode.from_tensor(value))
        fake.mask_mod = masks.flex_mask_mod(fake_mode.from_tensor(q_meta) if _is_real(q_meta) else q_meta,
                                            fake_mode.from_tensor(k_meta) if _is_real(k_meta) else k_meta)
        return fake

    real_block_mask = attention._flex_block_mask
    environ = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "fake", "MASTER_PORT": "0"}
    with contextlib.ExitStack() as stack:
        for target, name, value in (
            (dist, "new_group", new_group), (dist, "all_gather_object", all_gather_object),
            (dist, "broadcast_object_list", lambda *a, **k: None),
            (torch.nn.Module, "_apply", _convert_in_place),
            (flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True), (flex, "_validate_device", lambda *a: None),
            (attention, "_flex_block_mask", block_mask),
        ):
            stack.enter_context(_patched(target, name, value))
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            rt = init_runtime(cfg.parallel, environ=environ)
            yield rt, fake_mode, HostOpsReal(fake_mode)
        finally:
            shutdown_runtime()
            if dist.is_initialized():
                dist.destroy_process_group()


# --- the measured step ------------------------------------------------------------------------


def measured_config(cfg):
    """``cfg`` as it runs on a GPU without Transformer Engine: FlexAttention, local linear layers,
    FP8 off (see the module docstring); the plan beside the measurement uses this config too."""
    def on_gpu(m):
        return m.replace(attention_backend=m.resolved_attention_backend(on_gpu=True), linear_impl="local", fp8=None)

    return dataclasses.replace(cfg, model=on_gpu(cfg.model),
                               teacher_model=None if cfg.teacher_model is None else on_gpu(cfg.teacher_model))


def synthetic_responses(cfg, shape: Shape):
    """One micro-batch of full-length responses: prompts of ``P - 1`` tokens (the absolute grid then
    frames one head token, as the plan's extra block assumes), responses of the curriculum's end
    length, every round recorded; token values do not change what memory a step holds."""
    from nemo_opdlm.training.step import Responses, student_schedule

    g = torch.Generator().manual_seed(0)
    b, p = shape.micro_batch, shape.prompt
    length = cfg.rollout.max_length
    prompt_ids = torch.randint(10, 1000, (b, p), generator=g)
    prompt_ids[:, 0] = 0  # left padding: P - 1 real tokens
    return Responses(prompt_ids, torch.full((b,), p - 1), torch.randint(10, 1000, (b, length), generator=g),
                     torch.ones(b, length, dtype=torch.bool),
                     torch.randint(0, cfg.rollout.steps_per_block, (b, length), generator=g), {},
                     student_schedule(cfg))


def measure_step(cfg, cluster: Cluster) -> Measured:
    """Build, wrap, and run one steady-state step (one micro-batch) of ``cfg`` on rank 0 of
    ``cluster`` under fake tensors (see the module docstring)."""
    from nemo_opdlm.models.student import build_student
    from nemo_opdlm.models.teacher import build_teacher
    from nemo_opdlm.training.optim import wrap_for_training
    from nemo_opdlm.training.step import learn_from, step_batch

    if cfg.parallel.pp > 1 or (cfg.parallel.teacher is not None and cfg.parallel.teacher.pp > 1):
        raise ConfigError("opdlm plan --measure simulates PP=1 layouts only (pipeline stages are not faked): "
                          "measure the recipe at parallel.pp=1, or read the plan's estimate")
    shape, _ = check_layout(cfg, cluster)
    step = step_batch(cfg, synthetic_responses(cfg, shape), (), 0, torch.Generator().manual_seed(0))
    step = dataclasses.replace(step, microbatches=step.microbatches[:1], teacher_rows=step.teacher_rows[:1])
    out = Measured(row_tokens=int(step.microbatches[0]["input_ids"].shape[1]))
    with fake_world(cfg, cluster) as (rt, fake_mode, host_mode):
        tracker = _tracker_class()()
        with fake_mode, host_mode, tracker:
            student = build_student(cfg.model, cfg.diffusion, rt.ctx)
            out.points["student weights"] = tracker.held()
            teacher = build_teacher(cfg.teacher_built, rt.teacher_ctx)
            out.points["+ teacher weights"] = tracker.held()
            state = wrap_for_training(student, cfg.model, cfg.optim, total_steps=10)
            _as_on_a_gpu(state)
            out.points["+ grads and fp32 master"] = tracker.held()
            _optimizer_update(state)  # megatron allocates Adam's moments at the first step
            out.points["+ Adam moments"] = tracker.held()
            clock = _PeakClock(tracker)
            learn_from(cfg, step, state, teacher, clock=clock)
            _optimizer_update(state)
            clock.mark("optimizer")
            out.peaks = clock.peaks
    return out


def _as_on_a_gpu(state) -> None:
    """torch's AdamW picks its foreach kernels for CUDA tensors only (these fakes are CPU tensors):
    ask for them, as a GPU run gets them."""
    for inner in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        for group in inner.optimizer.param_groups:
            group["foreach"] = True


def _optimizer_update(state) -> None:
    """The optimizer's update without the gradient norm (``training.optim.optimizer_step`` reads it
    as a number, which a fake tensor has not; the norm allocates nothing that outlives it)."""
    state.optimizer.prepare_grads()
    state.optimizer.step_with_ready_grads()


# --- plan beside measurement ---------------------------------------------------------------------


def compare(cfg, cluster: Cluster) -> dict[str, Any]:
    """The plan's estimate and the measurement of ``cfg`` (as ``measured_config`` runs it) on
    ``cluster``, in GiB: per component where both split it, per phase, and the peak."""
    cfg = measured_config(cfg)
    shape, _ = check_layout(cfg, cluster)
    est = estimate_memory(cfg, shape, cluster)
    got = measure_step(cfg, cluster)
    return comparison(est, got, cluster.spec.overhead_gib * GIB)


def comparison(est: MemoryEstimate, got: Measured, overhead: float) -> dict[str, Any]:
    """Rows (plan GiB, measured GiB) per component and phase; the plan without its overhead (CUDA
    context, NCCL, workspaces: no tensor holds it)."""
    static = {k: v for k, v in est.static.items() if not k.startswith("CUDA context")}
    student_weights = static.get("student weights", 0.0)
    teacher_weights = static.get("teacher weights", 0.0)
    optimizer = sum(v for k, v in static.items() if k.startswith("optimizer"))
    grads = sum(v for k, v in static.items() if k.startswith("student grads"))
    points = got.points
    rows = {
        "student weights": (student_weights, points["student weights"]),
        "teacher weights": (teacher_weights, points["+ teacher weights"] - points["student weights"]),
        "student grads + fp32 master + Adam moments": (
            grads + optimizer, points["+ Adam moments"] - points["+ teacher weights"]),
        "held between steps": (sum(static.values()), points["+ Adam moments"]),
    }
    for phase, plan_phase in PLAN_PHASE.items():
        rows[f"{plan_phase} phase peak"] = (est.phase_total(plan_phase) - overhead, got.peaks[phase])
    plan_peak = max(est.phase_total(p) for p in PLAN_PHASE.values()) - overhead
    rows["peak"] = (plan_peak, got.peak)
    return {"row_tokens": got.row_tokens,
            "rows": {k: {"plan_gib": None if p is None else round(p / GIB, 3), "measured_gib": round(m / GIB, 3),
                         "measured_over_plan": None if not p else round(m / p, 3)} for k, (p, m) in rows.items()}}


def format_comparison(result: dict[str, Any]) -> str:
    lines = [f"measured (fake tensors, one micro-batch of {result['row_tokens']} tokens, rank 0; "
             "the plan without its CUDA-context overhead), GiB:",
             f"  {'component':<46}{'plan':>9}{'measured':>10}{'ratio':>8}"]
    for name, row in result["rows"].items():
        plan = "-" if row["plan_gib"] is None else f"{row['plan_gib']:.2f}"
        ratio = "-" if row["measured_over_plan"] is None else f"{row['measured_over_plan']:.2f}"
        lines.append(f"  {name:<46}{plan:>9}{row['measured_gib']:>10.2f}{ratio:>8}")
    return "\n".join(lines)
