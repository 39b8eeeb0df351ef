"""The teacher's own TP / PP / DP process groups, on the ranks the student already uses.

One job: split the world a second time, for ``parallel.teacher``, and describe this rank's place in
that split as a ``ParallelContext`` whose megatron-core ``ProcessGroupCollection`` the teacher's
modules, its pipeline schedule and its vocabulary-parallel targets take. megatron-core's global
``parallel_state`` keeps the student's groups; the teacher never reads them.

Ranks are ordered as megatron-core orders them by default ("tp-cp-ep-dp-pp" with cp = ep = 1):
world rank = tp + TP * (dp + DP * pp). :class:`Grid` is that formula, shared with the code that
routes teacher inputs and targets between the two layouts (``teacher/exchange.py``).
Non-goals: the student's groups (``distributed.py`` has megatron-core build them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch.distributed as dist

from nemo_opdlm.runtime.context import ParallelContext


@dataclass(frozen=True)
class Grid:
    """A TP x DP x PP split of ``tp * dp * pp`` world ranks, TP fastest, PP slowest."""

    tp: int
    dp: int
    pp: int

    @classmethod
    def of(cls, tp: int, pp: int, world_size: int) -> "Grid":
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        return cls(tp, world_size // (tp * pp), pp)

    @classmethod
    def of_context(cls, ctx: ParallelContext) -> "Grid":
        return cls(ctx.tp_size, ctx.dp_size, ctx.pp_size)

    def rank(self, tp: int, dp: int, pp: int) -> int:
        """The world rank at these coordinates."""
        return tp + self.tp * (dp + self.dp * pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp, dp, pp)`` of a world rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def groups(self, vary: str) -> Iterator[list[int]]:
        """Every group whose ranks differ only along the axes in ``vary`` (letters of "tdp"), in a
        fixed order: all ranks create all groups in the same order, as ``dist.new_group`` requires."""
        sizes = {"t": self.tp, "d": self.dp, "p": self.pp}
        fixed = [a for a in "tdp" if a not in vary]
        for outer in _product([sizes[a] for a in fixed]):
            pinned = dict(zip(fixed, outer))
            members = []
            for inner in _product([sizes[a] for a in vary]):
                at = dict(pinned, **dict(zip(vary, inner)))
                members.append(self.rank(at["t"], at["d"], at["p"]))
            yield sorted(members)


def _product(sizes: list[int]) -> Iterator[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for head in range(sizes[0]):
        for tail in _product(sizes[1:]):
            yield (head,) + tail


def _my_group(grid: Grid, vary: str, rank: int,
              timeout: Optional[timedelta] = None) -> tuple[dist.ProcessGroup, list[int]]:
    """Create every group of the family ``vary`` (each rank must create them all) and return this
    rank's, with its members. ``timeout``: the collective timeout (torch's default, 30 min, if None:
    ``new_group`` does not inherit the world group's)."""
    mine = None
    for members in grid.groups(vary):
        group = dist.new_group(members, timeout=timeout)
        if rank in members:
            mine = (group, members)
    assert mine is not None
    return mine


def teacher_context(tp: int, pp: int, world_size: int, rank: int,
                    timeout: Optional[timedelta] = None) -> ParallelContext:
    """This rank's place in the teacher's TP x DP x PP split, with its own process groups.

    Collective: every rank of the world calls it, with the same sizes."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    grid = Grid.of(tp, pp, world_size)
    t, d, p = grid.coords(rank)
    tp_group, _ = _my_group(grid, "t", rank, timeout)
    dp_group, _ = _my_group(grid, "d", rank, timeout)
    pp_group, pp_members = _my_group(grid, "p", rank, timeout)
    mp_group, _ = _my_group(grid, "tp", rank, timeout)
    tp_dp_group, _ = _my_group(grid, "td", rank, timeout)
    single, _ = _my_group(grid, "", rank, timeout)  # context parallelism is 1: a group of one
    embd = pos_embd = None
    for members in grid.groups("p"):  # tied embeddings: the first and last stage of each pipeline
        ends = sorted({members[0], members[-1]})
        group, first = dist.new_group(ends, timeout=timeout), dist.new_group([members[0]], timeout=timeout)
        if rank in ends:
            embd = group
        if rank == members[0]:
            pos_embd = first
    pgs = ProcessGroupCollection(
        tp=tp_group, pp=pp_group, dp=dp_group, mp=mp_group, cp=single, tp_cp=tp_group, dp_cp=dp_group,
        intra_dp_cp=dp_group, tp_dp_cp=tp_dp_group, embd=embd, pos_embd=pos_embd,
    )
    return ParallelContext(
        tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, vpp_size=None, dp_rank=d, dp_size=grid.dp, pgs=pgs,
        pp_prev_global=pp_members[(p - 1) % pp], pp_next_global=pp_members[(p + 1) % pp],
        pp_last_global=pp_members[-1], tp_src_global=grid.rank(0, d, p), own_groups=True,
    )
