"""What to change when a plan does not fit: single changes with their peaks, and a greedy
combination that fits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from nemo_opdlm.errors import OPDLMError
from nemo_opdlm.plan.layout import Cluster, check_layout, usable_bytes
from nemo_opdlm.plan.memory import estimate_memory, teacher_weight_bytes


@dataclass(frozen=True)
class Remedy:
    """One change to try: config overrides and/or a different cluster."""

    label: str
    overrides: tuple[str, ...] = ()
    nodes: Optional[int] = None


def _apply(cfg, remedy: Remedy, cluster: Cluster):
    from nemo_opdlm.config import RunConfig, apply_overrides, from_dict, to_dict

    new_cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), list(remedy.overrides))) if remedy.overrides else cfg
    new_cluster = dataclasses.replace(cluster, nodes=remedy.nodes) if remedy.nodes else cluster
    return new_cfg, new_cluster


TP_SIZES = (2, 4, 8, 16)
PP_SIZES = (2, 4, 8)
TEACHER_SHARE = 0.2
"""Share of a rank's peak the teacher's weights reach before the plan suggests splitting the teacher
alone further (``parallel.teacher.tp``)."""


def _next_size(current: int, sizes: Sequence[int]) -> Optional[int]:
    return next((n for n in sizes if n > current), None)


def candidate_remedies(cfg, cluster: Cluster) -> list[Remedy]:
    """Single changes that lower memory, in the order a user would reach for them."""
    out: list[Remedy] = []
    if cfg.model.recompute != "full":
        out.append(Remedy("activation recompute", ("model.recompute=full",)))
    if cfg.train.micro_batch_size > 1:
        out.append(Remedy("smaller micro-batch", ("train.micro_batch_size=1",)))
    if cfg.distill.top_k is None:
        out.append(Remedy("top-k KL (the paper's choice from 4B up)", ("distill.top_k=16",)))
    if not cfg.distill.teacher_offload:
        out.append(Remedy("teacher offload", ("distill.teacher_offload=true",)))
    if not cfg.optim.distributed_optimizer:
        out.append(Remedy("distributed optimizer", ("optim.distributed_optimizer=true",)))
    if (tp := _next_size(cfg.parallel.tp, TP_SIZES)) is not None:
        out.append(Remedy(f"more TP ({tp})", (f"parallel.tp={tp}",)))
    if (pp := _next_size(cfg.parallel.pp, PP_SIZES)) is not None:
        out.append(Remedy(f"more PP ({pp})", (f"parallel.pp={pp}",)))
    out += teacher_tp_remedy(cfg, cluster)
    out.append(Remedy(f"more nodes ({2 * cluster.nodes}: more DP, fewer rollouts per GPU)", (), 2 * cluster.nodes))
    return out


def teacher_tp_remedy(cfg, cluster: Cluster) -> list[Remedy]:
    """The teacher alone at a larger TP inside a node (``parallel.teacher``), when its weights are a
    large share of the peak: a big teacher then stops forcing the student's TP up, which would slow
    the student with TP communication it does not need. The smallest such TP that fits, else the
    largest; none when the teacher's weights are a small share or no larger TP is valid."""
    shape, _ = check_layout(cfg, cluster)
    est = estimate_memory(cfg, shape, cluster)
    if teacher_weight_bytes(cfg.teacher_built, shape, est.stage) < TEACHER_SHARE * est.peak:
        return []
    options = [Remedy(f"teacher at its own TP ({tp})",
                      (f"parallel.teacher.tp={tp}", f"parallel.teacher.pp={shape.teacher_pp}"))
               for tp in TP_SIZES if shape.teacher_tp < tp <= cluster.gpus_per_node]
    peaks = [(r, res[0]) for r in options if (res := try_remedy(cfg, cluster, r)) is not None]
    fitting = [r for r, peak in peaks if peak <= usable_bytes(cluster)]
    return fitting[:1] or [r for r, _ in peaks[-1:]]


def try_remedy(cfg, cluster: Cluster, remedy: Remedy) -> Optional[tuple[float, Any, Cluster]]:
    """(peak bytes, config, cluster) after the change, or None if the change itself is invalid."""
    try:
        new_cfg, new_cluster = _apply(cfg, remedy, cluster)
        shape, _ = check_layout(new_cfg, new_cluster)
    except OPDLMError:
        return None
    return estimate_memory(new_cfg, shape, new_cluster).peak, new_cfg, new_cluster


def suggest(cfg, cluster: Cluster, max_steps: int = 3) -> tuple[list[tuple[Remedy, float]], list[Remedy]]:
    """Each valid single change with its peak, and a greedy combination that fits (empty if none does)."""
    limit = usable_bytes(cluster)
    singles = []
    for remedy in candidate_remedies(cfg, cluster):
        result = try_remedy(cfg, cluster, remedy)
        if result is not None:
            singles.append((remedy, result[0]))
    combo: list[Remedy] = []
    cur_cfg, cur_cluster = cfg, cluster
    for _ in range(max_steps):
        options = [(r, res) for r in candidate_remedies(cur_cfg, cur_cluster)
                   if (res := try_remedy(cur_cfg, cur_cluster, r)) is not None]
        if not options:
            break
        remedy, (peak, cur_cfg, cur_cluster) = min(options, key=lambda o: o[1][0])
        combo.append(remedy)
        if peak <= limit:
            return singles, combo
    return singles, []
