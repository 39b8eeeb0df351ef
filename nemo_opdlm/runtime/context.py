"""This rank's place in a model's parallel layout, handed to whatever needs a group or a rank.

One job: one immutable value with the process groups, ranks and sizes of one model's TP / PP / DP
layout, built once when the runtime starts (``distributed.init_runtime``) and then passed down
explicitly, as megatron-core's modules take ``pg_collection`` and torchtitan's take
``parallel_dims``. Models keep the context they were built with (``DiffusionGPTModel.parallel``),
so code that receives model chunks knows their layout; everything else (losses, vocab-parallel
ops, data sharding, metrics) receives the context or the one group it needs as an argument.
Nothing below ``runtime/`` reads megatron-core's global ``parallel_state``.

Non-goals: creating the groups (``distributed.py``), collectives over the world (``comm.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """Groups, ranks and sizes of one model's layout on this rank.

    Ranks within a group (``tp_rank``, ``pp_rank``, ``dp_rank``) count from 0 in that group; the
    ``*_global`` fields are ranks of the default (world) group, as ``send``/``broadcast`` take them.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    vpp_size: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved schedule), None without."""
    dp_rank: int = 0
    dp_size: int = 1
    pgs: Any = None
    """megatron-core ``ProcessGroupCollection`` of this layout (``tp``, ``pp``, ``dp``, ...), handed to
    its modules; None in a context built without ``torch.distributed`` (one rank, no groups)."""
    pp_prev_global: int = 0
    """World rank of the previous pipeline stage (the ring wraps)."""
    pp_next_global: int = 0
    """World rank of the next pipeline stage."""
    pp_last_global: int = 0
    """World rank of this pipeline's last stage (it decides and broadcasts decoding decisions)."""
    tp_src_global: int = 0
    """World rank of TP rank 0 of this rank's tensor-parallel group."""
    own_groups: bool = False
    """The groups were built apart from megatron-core's ``parallel_state`` (a teacher with its own
    layout, ``teacher_groups.py``): megatron-core's schedules must be handed them, since they fall
    back to ``parallel_state``'s, which are the student's."""

    @property
    def tp_group(self) -> Optional[dist.ProcessGroup]:
        """The tensor-parallel group, or None when TP is 1 (vocab-parallel ops are then local)."""
        return self.pgs.tp if self.pgs is not None and self.tp_size > 1 else None

    @property
    def pp_group(self) -> Optional[dist.ProcessGroup]:
        return self.pgs.pp if self.pgs is not None and self.pp_size > 1 else None

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return self.pgs.dp if self.pgs is not None else None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_ends(self, vp_stage: Optional[int]) -> tuple[bool, bool]:
        """``(pre_process, post_process)`` of the chunk ``vp_stage`` (None without VPP): whether it
        holds the embedding (first stage of the model) and the output layer (last stage)."""
        first = self.is_first_stage and (vp_stage is None or vp_stage == 0)
        last = self.is_last_stage and (vp_stage is None or vp_stage == (self.vpp_size or 1) - 1)
        return first, last

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that prints and writes metrics: DP rank 0, TP rank 0, last pipeline stage
        (where the losses are)."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.is_last_stage

