"""One entry to start and stop the distributed runtime: torch.distributed + megatron-core groups.

One job: read the launcher's environment (torchrun or Slurm ``srun``), initialise
``torch.distributed`` (nccl on GPU, gloo on CPU) and megatron-core ``parallel_state`` for a
validated TP/PP/CP/DP layout, seed every RNG, and tear all of it down. Non-goals: building models.

Layouts are validated against the model *before* anything is built, so a bad layout fails in
seconds with the numbers named, not after an hour in a queue.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.distributed as dist

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.runtime.cpu_compat import enable_cpu_compat
from nemo_opdlm.runtime.seeding import seed_everything

if TYPE_CHECKING:
    from nemo_opdlm.models.config import ModelConfig


class LayoutError(ConfigError):
    """The parallel layout does not fit the model or the world size."""


@dataclass(kw_only=True)
class TeacherLayout:
    """The teacher's own TP/PP split of the same ranks (``parallel.teacher``); its DP is the rest.

    A 70B teacher needs TP=8 to fit where an 8B student trains faster at TP=2 x DP=4: each model
    gets its own groups (``runtime/teacher_groups.py``), and the teacher's inputs and targets move
    between the two layouts (``teacher/exchange.py``)."""

    tp: int = 1
    """The teacher's tensor-parallel size."""
    pp: int = 1
    """The teacher's pipeline-parallel size."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.teacher.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class ParallelLayout:
    """How the world is split. DP is whatever is left: world / (TP * PP * CP)."""

    tp: int = 1
    """Tensor-parallel size: splits heads, query groups, FFN and vocabulary."""
    pp: int = 1
    """Pipeline-parallel size: splits layers into stages."""
    cp: int = 1
    """Context-parallel size (needs TE attention; block masks do not support it yet)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved schedule), or None."""
    teacher: Optional[TeacherLayout] = None
    """The teacher's own TP/PP on the same ranks; None: the teacher shares the student's layout."""
    timeout_minutes: float = 30.0
    """How long a collective waits for the other ranks before it fails (Megatron-LM's
    ``--distributed-timeout-minutes``): a stopped or hung rank ends the job after this long, naming
    the rank. Raise it if a step or a checkpoint save legitimately keeps ranks apart longer."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout_minutes > 0:  # also refuses NaN
            raise LayoutError(f"parallel.timeout_minutes must be > 0 (minutes, may be fractional), got "
                              f"{self.timeout_minutes}")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise LayoutError(f"parallel.vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp})")
        if self.cp > 1:
            raise LayoutError(
                f"parallel.cp={self.cp}: context parallelism needs Transformer Engine's attention, "
                "which does not take block-diffusion masks; use cp=1"
            )

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        """Data-parallel size for a world, after checking that the layout (and the teacher's) divides it."""
        if world_size % self.model_parallel:
            raise LayoutError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {self.model_parallel}"
            )
        if self.teacher is not None and world_size % (self.teacher.tp * self.teacher.pp):
            raise LayoutError(
                f"world size {world_size} is not divisible by the teacher's tp*pp = "
                f"{self.teacher.tp}*{self.teacher.pp} (parallel.teacher)"
            )
        return world_size // self.model_parallel

    def teacher_layout(self) -> "ParallelLayout":
        """The layout the teacher runs at: ``parallel.teacher``'s TP/PP, else this one."""
        if self.teacher is None:
            return self
        return ParallelLayout(tp=self.teacher.tp, pp=self.teacher.pp)

    def teacher_dp(self, world_size: int) -> int:
        """The teacher's data-parallel size: its replicas, each serving some student replicas."""
        return self.teacher_layout().dp(world_size)

    def check_teacher(self, model: "ModelConfig") -> None:
        """``check_model`` for the teacher, at the layout it runs at (named in the error)."""
        self.teacher_layout().check_model(model, "teacher_model", "parallel" if self.teacher is None else "parallel.teacher")

    def check_model(self, model: "ModelConfig", what: str = "model", where: str = "parallel") -> None:
        """Raise LayoutError if TP does not divide heads/groups/FFN or PP does not divide layers;
        ``what`` names the model's section, ``where`` the layout's ("": the sizes' bare names, as a
        tool's ``--tp``/``--pp`` flags give them)."""
        checks = [
            ("num_attention_heads", model.num_attention_heads, "tp", self.tp),
            ("num_query_groups", model.num_query_groups, "tp", self.tp),
            ("ffn_hidden_size", model.ffn_hidden_size, "tp", self.tp),
            ("num_layers", model.num_layers, "pp", self.pp * (self.vpp or 1)),
        ]
        for field_name, value, axis, size in checks:
            axis = f"{where}.{axis}" if where else axis
            if value % size:
                stage = " * vpp" if axis.endswith("pp") and self.vpp else ""
                raise LayoutError(
                    f"{what}.{field_name}={value} is not divisible by {axis}{stage}={size}; "
                    f"choose {axis} among the divisors of {value}"
                )


@dataclass(frozen=True)
class LaunchEnv:
    """Rank information from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun', 'slurm' or 'single'


def _split_top_level(text: str) -> list[str]:
    """Split at the commas that are not inside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced or nested brackets in Slurm hostlist {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed bracket in Slurm hostlist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """``01-03`` -> ``['01', '02', '03']`` (width of the lower bound kept), ``7`` -> ``['7']``."""
    lo, sep, hi = spec.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise ValueError(f"bad range {spec!r} in Slurm hostlist {nodelist!r}")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise ValueError(f"descending range {spec!r} in Slurm hostlist {nodelist!r}")
    return [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a Slurm hostlist, in ``scontrol show hostnames`` order.

    The grammar Slurm writes: hosts separated by commas; each host a name with any number of
    bracket groups, each group a comma list of numbers and ranges whose lower bound sets the zero
    padding; several groups form their product, the last varying fastest
    (``rack[1-2]-node[01-02]`` -> rack1-node01, rack1-node02, rack2-node01, rack2-node02)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if not item:
            raise ValueError(f"empty host name in Slurm hostlist {nodelist!r}")
        names = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [v for spec in group.split(",") for v in _expand_range(spec, nodelist)] if group else [""]
            names = [n + literal + c for n in names for c in choices]
        hosts += names
    return hosts


def first_slurm_host(nodelist: str, scontrol: Optional[str] = "auto") -> str:
    """The first host of a Slurm nodelist such as ``gpu[003-005,009],cpu01``: the rendezvous host.

    Asks ``scontrol show hostnames`` when it is on PATH (``scontrol``: its path, "auto" to look it
    up, None not to), as Slurm's own scripts do; else expands the list with :func:`expand_hostlist`."""
    exe = shutil.which("scontrol") if scontrol == "auto" else scontrol
    if exe:
        try:
            out = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            return out[0]
    return expand_hostlist(nodelist)[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_launch_env(environ: Optional[dict[str, str]] = None) -> LaunchEnv:
    """Rank, world size and rendezvous from torchrun (RANK...) or Slurm (SLURM_PROCID...) variables."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        master = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        )
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master,
            master_port=int(env.get("MASTER_PORT", 10000 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


@dataclass(frozen=True)
class Runtime:
    """What a started runtime knows about this process."""

    env: LaunchEnv
    layout: ParallelLayout
    device: torch.device
    backend: str
    seed: int
    ctx: ParallelContext
    """This rank's groups, ranks and sizes: what models, the sampler and the step are given."""
    teacher_ctx: ParallelContext
    """The teacher's: ``ctx`` itself when it shares the student's layout, else its own groups
    (``parallel.teacher``, ``teacher_groups.py``)."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def dp_size(self) -> int:
        return self.layout.dp(self.env.world_size)

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def parallel_context() -> ParallelContext:
    """The context of megatron-core's initialised groups on this rank: the one place that reads
    ``parallel_state`` (everything else is handed the result)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    pp_group = ps.get_pipeline_model_parallel_group()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    return ParallelContext(
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp_size,
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        pgs=ProcessGroupCollection.use_mpu_process_groups(),
        pp_prev_global=ps.get_pipeline_model_parallel_prev_rank(),
        pp_next_global=ps.get_pipeline_model_parallel_next_rank(),
        pp_last_global=dist.get_global_rank(pp_group, pp_size - 1),
        tp_src_global=ps.get_tensor_model_parallel_src_rank(),
    )


def init_runtime(
    layout: ParallelLayout,
    *,
    seed: int = 1234,
    models: tuple[tuple[str, "ModelConfig"], ...] = (),
    backend: Optional[str] = None,
    timeout_minutes: Optional[float] = None,
    environ: Optional[dict[str, str]] = None,
) -> Runtime:
    """Initialise torch.distributed and megatron-core groups for ``layout``; validate first.

    Args:
        layout: TP/PP/CP sizes; DP is derived from the world size.
        seed: base seed (see :func:`seeding.seed_everything`).
        models: (name, config) pairs to validate the layout against before anything is built.
        backend: 'nccl' or 'gloo'; default nccl when CUDA is available, else gloo.
        timeout_minutes: collective timeout; default ``layout.timeout_minutes``.
        environ: launcher variables (default ``os.environ``).
    """
    from megatron.core import parallel_state

    env = read_launch_env(environ)
    layout.dp(env.world_size)
    if timeout_minutes is None:
        timeout_minutes = layout.timeout_minutes
    for name, model in models:
        if name == "teacher_model":
            layout.check_teacher(model)
        else:
            layout.check_model(model, name)
    enable_cpu_compat()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    ctx = parallel_context()
    teacher_ctx = ctx
    if layout.teacher is not None:
        from nemo_opdlm.runtime.teacher_groups import teacher_context

        teacher_ctx = teacher_context(layout.teacher.tp, layout.teacher.pp, env.world_size, env.rank,
                                      timeout=timedelta(minutes=timeout_minutes))
    seed_everything(seed, ctx)
    global _CURRENT
    _CURRENT = Runtime(env=env, layout=layout, device=device, backend=backend, seed=seed, ctx=ctx,
                       teacher_ctx=teacher_ctx)
    return _CURRENT


_CURRENT: Optional[Runtime] = None


def current_runtime() -> Optional[Runtime]:
    """The runtime this process started and has not shut down, or None. For entry points that may
    run inside a host that already started one (lm-eval's process); library code is handed a context."""
    return _CURRENT


def shutdown_runtime() -> None:
    """Destroy megatron-core groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    global _CURRENT
    _CURRENT = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def runtime(layout: ParallelLayout, **kwargs) -> Iterator[Runtime]:
    """``with runtime(layout) as rt: ...``: init, yield, and always tear down."""
    rt = init_runtime(layout, **kwargs)
    try:
        yield rt
    finally:
        shutdown_runtime()
