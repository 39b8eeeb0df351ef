"""Row bookkeeping of one decode call: limits, records, the unmasking schedule and the uniforms.

One job: the state a ``generate`` call keeps per row, shared by the cached and the lockstep
decoders: the layout of ``[prompt | response]`` (positions, metadata), the response records being
filled (``tokens``, ``step_map``), each row's length limit and unmasking rule, the per-block
uniforms, and, once decoded, what was valid. Non-goals: running the model (``cached.py``,
``lockstep.py``), choosing tokens (``sampling.py``).

Rows are in the frame of their block grid (``models/grid.py``): on the absolute grid the records'
first positions hold each row's head (the prompt's last ``P mod b`` tokens), given before round 0
(``GIVEN`` in ``step_map``), so that block ``b`` of every row starts at column ``b * block_size``.

Uniforms: block ``b``'s ``[B, steps, block_size]`` draw is the ``b``-th draw of the sampler's
stream (drawn lazily, in block order, when the first row reaches block ``b``), and row ``i`` in
round ``r`` of block ``b`` reads ``[i, r]`` of it, whichever rows are decoding and whenever it gets
there: a row's decisions are the ones it would make decoding alone.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from nemo_opdlm.models import grid, masks
from nemo_opdlm.rollout import schedules

MASKED = -1
"""``step_map`` of a position not decoded yet (or never: padding)."""
GIVEN = -2
"""``step_map`` of a head position (absolute grid): a prompt token decided before round 0."""

Draw = Callable[..., Optional[Tensor]]
"""``draw(*shape)``: uniforms of that shape from the sampler's stream, or None (greedy, or not on
the last pipeline stage)."""


def row_limits(max_new: int | Tensor, batch: int, device: torch.device) -> tuple[Tensor, int]:
    """``(limits [B], longest)``: every row's response-length limit (one for all, or one per row)."""
    if isinstance(max_new, Tensor):
        if max_new.shape != (batch,):
            raise ValueError(f"max_new_tokens must be an int or have shape [{batch}], got {tuple(max_new.shape)}")
        lo, longest = (int(v) for v in torch.stack([max_new.min(), max_new.max()]).tolist())  # one host read
        limits = max_new.to(device=device, dtype=torch.long)
    else:
        lo = longest = int(max_new)
        limits = torch.full((batch,), longest, dtype=torch.long, device=device)
    if lo < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    return limits, longest


def valid_mask(tokens: Tensor, step_map: Tensor, eos: Tensor, limits: Tensor) -> tuple[Tensor, Tensor]:
    """``(valid [B, L], finished_eos [B])`` from what was decoded within each row's ``limits [B]``."""
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    in_limit = (step_map >= 0) & (cols[None] < limits[:, None])  # [B, L]
    is_eos = torch.isin(tokens, eos) & in_limit  # [B, L]
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # [B, L]
    valid = in_limit & ~after_eos
    return valid, (is_eos & valid).any(-1)


def rows_rounds(step_map: Tensor, valid: Tensor, block_index: Tensor, block_size: int) -> int:
    """Rounds that committed at least one response token, summed over rows and blocks: the
    denominator of tokens per round (``block_index [B, L]``: each position's block, on the row's
    grid). A round that only filled positions after a row's EOS (or past its length limit)
    produced nothing the reader sees and is not counted, so static decoding reads exactly 1 token
    per round and AR decoding 1 (counting those rounds showed static decoding at 0.80-0.93 whenever
    an EOS ended a block early)."""
    keep = valid & (step_map >= 0)  # [B, L]
    # one slot per (block, round) of each row: a block takes at most block_size rounds
    slot = torch.where(keep, block_index * block_size + step_map, 0)  # [B, L]
    width = (step_map.shape[1] // block_size + 2) * block_size  # block_index <= L / b + 1: no device read
    hits = torch.zeros(step_map.shape[0], width, dtype=torch.long, device=step_map.device)
    hits.scatter_add_(1, slot, keep.long())  # [B, slots] tokens committed in each (block, round)
    return int((hits > 0).sum())


def first_true(mask: Tensor, count: int) -> Tensor:
    """Ascending indices ``[count]`` of the True entries of ``mask [N]``, ``count`` of them (known on
    the host): a stable sort puts them first. ``mask.nonzero()`` would read the device to size its
    output, a host sync."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


class RowRecords:
    """One call's rows: layout, records, schedule, limits and uniforms (see the module docstring).

    Args:
        prompt_ids: ``[B, P]`` left-padded prompts; ``prompt_lens`` ``[B]``.
        limits: ``[B]`` each row's response-length limit; ``longest`` its maximum (a host int).
        schedule: the block size, the grid (the records are kept in its frame, ``models/grid.py``),
            the static schedule's rounds per block and the dynamic rule's threshold (None: static).
        static_rows: ``[B]`` bool, rows decoded with the static rule although the schedule has a threshold.
        mask_id, pad_id: fill of undecoded block positions / of response positions never decoded.
        eos: ``[E]`` EOS ids; ``draw``: the sampler's uniforms.
    """

    def __init__(self, prompt_ids: Tensor, prompt_lens: Tensor, limits: Tensor, longest: int, *,
                 schedule: schedules.BlockSchedule, static_rows: Optional[Tensor], pad_id: int, eos: Tensor,
                 draw: Draw) -> None:
        dev = prompt_ids.device
        block_size, threshold = schedule.block_size, schedule.threshold
        frame = grid.frame_prompts(prompt_ids, prompt_lens, block_size, schedule.block_grid, pad_id)
        self.frame = frame
        self.head, self.head_ids = frame.head, frame.head_ids  # [B], [B, H]
        self.prompt_ids = frame.prefix_ids  # [B, P] the prompts' aligned prefixes (the prompts on the response grid)
        self.batch, self.width = self.prompt_ids.shape
        self.block_size = block_size
        self.response_width = -(-longest // block_size) * block_size  # what responses() returns, on either grid
        self.n_blocks = self.response_width // block_size + frame.extra // block_size
        self.length = self.n_blocks * block_size
        self.limits = limits + frame.head  # [B] each row's length limit, in framed columns
        self.last_block = (self.limits + block_size - 1) // block_size - 1  # [B] each row's last block
        all_valid = torch.ones(self.batch, self.length, dtype=torch.bool, device=dev)
        layout = masks.build_layout(frame.prefix_lens, self.width, all_valid, block_size, with_xt=False)
        self.pos_all, self.meta_all = layout.position_ids, layout.meta  # [B, P+L], [B, 2, P+L]
        self.tokens = torch.full((self.batch, self.length), pad_id, dtype=torch.long, device=dev)  # [B, L]
        self.step_map = torch.full((self.batch, self.length), MASKED, dtype=torch.long, device=dev)  # [B, L]
        self.pad_id = pad_id
        self.counts = torch.tensor(schedule.counts, device=dev)
        self.threshold: Optional[float | Tensor] = threshold
        if static_rows is not None and threshold is not None:
            # [B, 1]: rows decoded with the static rule get a threshold no confidence exceeds
            self.threshold = torch.where(static_rows.to(dev), float("inf"), threshold)[:, None].float()
        self.eos = eos
        self._draw = draw
        self._drawn: list[Optional[Tensor]] = []  # per block: [B, steps, bs] (None once no row needs it)
        self._window: tuple[int, int, Optional[Tensor]] = (0, -1, None)

    def first_block(self, mask_id: int) -> tuple[Tensor, Tensor]:
        """Every row's first block before round 0: ``(x, st)``, both ``[B, bs]``: [MASK] and
        ``MASKED``, except the head (absolute grid), which holds its prompt tokens, ``GIVEN``."""
        x = torch.full((self.batch, self.block_size), mask_id, dtype=torch.long, device=self.tokens.device)
        st = torch.full_like(x, MASKED)
        if self.head_ids.shape[1]:
            in_head = grid.given_mask(self.head, self.head_ids.shape[1])  # [B, H]
            width = self.head_ids.shape[1]
            x[:, :width] = torch.where(in_head, self.head_ids, mask_id)
            st[:, :width] = torch.where(in_head, GIVEN, MASKED)
        return x, st

    def responses(self) -> tuple[Tensor, Tensor]:
        """``(tokens, step_map)`` ``[B, L]`` per response token: the records without the heads (``L``
        the longest limit in whole blocks, on either grid)."""
        tokens = grid.unframe(self.tokens, self.frame, self.pad_id)[:, :self.response_width]
        return tokens, grid.unframe(self.step_map, self.frame, MASKED)[:, :self.response_width]

    def uniforms(self, rows: Tensor, block: Tensor, step: Tensor, lo: int, hi: int) -> Optional[Tensor]:
        """Uniforms ``[N, bs]`` of rows ``rows`` (original ids) in round ``step`` of block ``block``
        (all ``[N]``); None when greedy or not on the last pipeline stage. ``lo``/``hi``: the lowest
        and highest of ``block``, known on the host (reading them here would be a host sync)."""
        while len(self._drawn) <= hi:
            draw = self._draw(self.batch, len(self.counts), self.block_size)  # [B, steps, bs]
            if draw is None:
                return None
            self._drawn.append(draw)
        if self._window[:2] != (lo, hi):
            for b in range(lo):  # no row will read blocks below the slowest row's again
                self._drawn[b] = None
            self._window = (lo, hi, torch.stack(self._drawn[lo: hi + 1]))  # [hi-lo+1, B, steps, bs]
        window = self._window[2]
        assert window is not None
        return window[block - lo, rows, step]  # [N, bs]

    def threshold_of(self, rows: Tensor) -> Optional[float | Tensor]:
        """The dynamic rule's threshold for rows ``rows`` (original ids): None (static), a float, or
        ``[N, 1]`` when some rows decode statically."""
        return self.threshold[rows] if isinstance(self.threshold, Tensor) else self.threshold

    def unmask(self, conf: Tensor, st: Tensor, step: Tensor | int, rows: Tensor) -> Tensor:
        """``[N, bs]``: the positions the unmasking rule picks this round for rows ``rows`` whose
        confidences are ``conf [N, bs]``, rounds-so-far ``st`` and round within the block ``step``."""
        return schedules.select_unmask(conf, st == MASKED, self.counts[step], self.threshold_of(rows))

    def finishes(self, x: Tensor, rows: Tensor, block: Tensor) -> Tensor:
        """``[N]``: rows ``rows`` (original ids) whose block ``block`` now holds ``x [N, bs]`` are done
        (an EOS within the row's length limit, or its last block)."""
        last = block == self.last_block[rows]  # [N]
        if not self.eos.numel():
            return last
        cols = block[:, None] * self.block_size + torch.arange(self.block_size, device=x.device)  # [N, bs]
        response = (cols < self.limits[rows, None]) & (cols >= self.head[rows, None])  # [N, bs] not the head
        eos = (x[..., None] == self.eos).any(-1) & response  # [N, bs] (isin can sync)
        return eos.any(-1) | last
