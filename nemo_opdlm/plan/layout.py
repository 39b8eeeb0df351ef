"""The cluster a plan is checked for and the numbers of a run on it that memory depends on.

One job: GPU kinds (memory, overhead, FP8), the cluster, and ``check_layout``: the divisibility of
the world, the prompts of a step and the micro-batches, with the run's ``Shape``.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
OVERHEAD_GIB = 3.0
"""CUDA context, NCCL buffers, cuBLAS/TE workspaces: resident on every GPU besides tensors."""
RESERVE = 0.05
"""Share of the GPU's memory kept free for allocator fragmentation; a plan must fit in the rest."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator kind."""

    name: str
    memory_gib: float
    """Memory as nvidia-smi reports it."""
    overhead_gib: float = OVERHEAD_GIB
    fp8: bool = False
    """FP8 GEMMs (compute capability >= 8.9): where ``model.fp8='auto'`` turns FP8 on."""


GPUS: dict[str, GpuSpec] = {
    "h100-80g": GpuSpec("NVIDIA H100 80GB HBM3", 79.6, fp8=True),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", 140.4, fp8=True),
    "a100-80g": GpuSpec("NVIDIA A100 80GB", 80.0),
    "a100-40g": GpuSpec("NVIDIA A100 40GB", 40.0),
    "cpu": GpuSpec("CPU process (tiny test recipes)", 64.0, overhead_gib=0.0),
}


@dataclass(frozen=True)
class Cluster:
    """Where a plan is checked."""

    nodes: int
    gpus_per_node: int
    gpu: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def spec(self) -> GpuSpec:
        return GPUS[self.gpu]


@dataclass(frozen=True)
class Finding:
    """One result of a check: 'ok', 'note' (skipped or worth knowing) or 'error' (refuses the plan)."""

    level: str
    text: str


# ----------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Shape:
    """The numbers of one run on one cluster that memory depends on."""

    tp: int
    pp: int
    dp: int
    rows_per_rank: int
    """Rollouts (= training rows) per data-parallel rank per step."""
    micro_batch: int
    num_microbatches: int
    prompt: int
    """Prompt width P (the longest prompt kept)."""
    response: int
    """Response length L at the end of the curriculum (whole blocks)."""
    teacher_tp: int
    """The teacher's TP: ``parallel.teacher.tp``, else the student's; its PP likewise."""
    teacher_pp: int
    teacher_dp: int
    """The teacher's replicas: world / (teacher TP x PP)."""
    own_teacher: bool
    """The teacher has its own layout (``parallel.teacher``), even one equal to the student's: its
    targets are exchanged (``teacher/exchange.py``), one micro-batch at a time or a whole
    step's before the student's pass (``RunConfig.teacher_route``)."""

    @property
    def served(self) -> int:
        """The most student replicas one teacher replica serves (replica ``d`` by ``d mod DP_t``)."""
        return -(-self.dp // self.teacher_dp)

    @property
    def student_row(self) -> int:
        return self.prompt + 2 * self.response  # [prompt | x0 | xt]

    @property
    def teacher_row(self) -> int:
        return self.prompt + self.response  # [prompt | x0]


def check_layout(cfg, cluster: Cluster) -> tuple[Shape, list[Finding]]:
    """Divisibility of the world, the prompts of a step and the micro-batches; raise ConfigError if broken.

    ``RunConfig`` already checked that TP divides heads, KV groups and FFN, and PP the layers, for
    both models (the teacher at ``parallel.teacher`` when it has its own layout); ``ParallelLayout.dp``
    checks that the teacher's TP x PP divides the world too.
    """
    from nemo_opdlm.runtime.distributed import LayoutError

    par, train = cfg.parallel, cfg.train
    dp = par.dp(cluster.world_size)
    if train.prompts_per_step % dp:
        raise LayoutError(
            f"train.prompts_per_step={train.prompts_per_step} is not divisible by DP={dp} "
            f"(world {cluster.world_size} / tp*pp*cp {par.model_parallel}): every data-parallel rank needs "
            f"the same number of prompts; use a multiple of {dp}"
        )
    rows = train.prompts_per_step // dp
    if rows % train.micro_batch_size:
        raise LayoutError(
            f"train.micro_batch_size={train.micro_batch_size} does not divide the {rows} rows per data-parallel "
            f"rank (train.prompts_per_step={train.prompts_per_step} / DP={dp})"
        )
    t_par = par.teacher_layout()
    block = cfg.diffusion.block_size
    shape = Shape(tp=par.tp, pp=par.pp, dp=dp, rows_per_rank=rows, micro_batch=train.micro_batch_size,
                  num_microbatches=rows // train.micro_batch_size,
                  prompt=cfg.data.max_prompt_tokens if cfg.data is not None else 64,
                  # the absolute grid's frame adds a block: each prompt's last P mod b tokens (models/grid.py)
                  response=-(-cfg.rollout.max_length // block) * block + (block if cfg.diffusion.block_grid == "absolute"
                                                                           else 0),
                  teacher_tp=t_par.tp, teacher_pp=t_par.pp, teacher_dp=par.teacher_dp(cluster.world_size),
                  own_teacher=par.teacher is not None)
    findings = [Finding("ok", f"layout {_layout(shape)} on {cluster.world_size} GPUs divides both models and "
                              f"{train.prompts_per_step} prompts ({rows} per DP rank)")]
    findings += _layout_notes(cfg, shape, cluster)
    return shape, findings


def _layout(shape: Shape) -> str:
    """``tp=2 pp=1 dp=8``, and the teacher's own layout after it."""
    out = f"tp={shape.tp} pp={shape.pp} dp={shape.dp}"
    if shape.own_teacher:
        out += f" (teacher: tp={shape.teacher_tp} pp={shape.teacher_pp} dp={shape.teacher_dp}, parallel.teacher)"
    return out


def _layout_notes(cfg, shape: Shape, cluster: Cluster) -> list[Finding]:
    """What a valid layout makes slow or leaves unplanned."""
    notes = []
    tps = [("parallel.tp", shape.tp)] + ([("parallel.teacher.tp", shape.teacher_tp)] if shape.own_teacher else [])
    for key, tp in tps:
        if tp > cluster.gpus_per_node:
            notes.append(f"{key}={tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor parallelism "
                         "across nodes is slow; prefer pp for the rest")
    if shape.own_teacher and shape.dp % shape.teacher_dp:
        fewest = shape.dp // shape.teacher_dp
        notes.append(f"teacher DP={shape.teacher_dp} does not divide student DP={shape.dp}: teacher replicas serve "
                     f"{fewest} or {shape.served} student replicas each, and the step waits for the busiest; "
                     "choose parallel.teacher so that world / (teacher tp*pp) divides the student's DP")
    if cfg.train.pack_tokens is not None:
        notes.append(f"train.pack_tokens={cfg.train.pack_tokens}: the memory below is for padded micro-batches of "
                     f"train.micro_batch_size={shape.micro_batch} rows; a packed one holds pack_tokens tokens and "
                     "its rows' teacher targets, which depend on the rollout lengths (not planned yet)")
    if shape.pp > 1 and shape.num_microbatches < shape.pp:
        notes.append(f"{shape.num_microbatches} micro-batches per step for pp={shape.pp}: the pipeline is mostly idle")
    return [Finding("note", text) for text in notes]

def usable_bytes(cluster: Cluster) -> float:
    return cluster.spec.memory_gib * GIB * (1 - RESERVE)
