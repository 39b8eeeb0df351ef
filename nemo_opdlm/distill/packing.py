"""Packed rows: micro-batches built by a token budget, several ``[prompt | x0 | xt]`` rows per sequence.

One job: turn the padded student rows of a step (``states.assemble``) into packed micro-batches of
one sequence each, exactly ``budget`` tokens long, whose loss and gradients equal the padded rows'.
Rollouts stop at EOS at very different lengths, so a padded micro-batch is mostly padding when one
row is long; a packed sequence holds each row's real tokens only. Non-goals: choosing states
(``states.py``), the loss (``loss.py``, which still sees row-shaped ``[R, L, ...]`` tensors).

Each row becomes one segment ``[real prompt | x0[:n] | xt[:n]]`` (``n`` its valid response
length) with its own doc id (``meta[:, 2]``, ``models/masks.py``), and keeps its position ids and
block ids: the segment's tokens see exactly the keys they saw in the padded row (padding was never
a key), at the same RoPE positions. The sequence is padded to ``budget`` with ``PAD`` tokens (fixed
shapes: pipeline point-to-point buffers and compiled kernels need them).

Every micro-batch stores ``logits_columns`` ``[R * W]``, W its rows' longest valid response (<=
L): for each of its R rows and each response position j < W the column predicting token j (the
row's xt column unshifted, the rule of ``masks.prediction_columns`` relative to the segment when
shifted; column 0 past the row's valid length, where the loss mask is 0). The model then projects
``[1, R * W]`` columns and the loss views them as ``[R, W, V]``, reading the row-shaped tensors'
first W positions (``training/step.py: make_loss_fn``): W, not L, because many short rows share a
sequence, and R x L logits at a 151k vocabulary would outgrow the sequence they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_opdlm.models import masks

ROW_KEYS: tuple[str, ...] = ("loss_mask", "x0", "xt_masked")
"""Row-shaped ``[B, L]`` keys copied per row into each packed micro-batch."""


@dataclass(frozen=True)
class Segment:
    """One row's real tokens: the columns of its padded row that a packed sequence keeps."""

    row: int
    prompt_len: int
    valid_len: int

    @property
    def length(self) -> int:
        return self.prompt_len + 2 * self.valid_len


def segments(meta: Tensor, response_len: int) -> list[Segment]:
    """Per padded row ``[B, 2, P + 2L]``: its real prompt length and valid response length.

    Both are read from the kinds (``PAD`` marks prompt padding and invalid response positions, as
    ``masks.build_layout`` writes them); the valid response positions must be a prefix, as
    rollouts and ``states.response_valid`` make them.
    """
    width = meta.shape[-1] - 2 * response_len
    kind = meta[:, 1]  # [B, S]
    prompt_real = kind[:, :width] != masks.PAD  # [B, P]
    valid = kind[:, width:width + response_len] != masks.PAD  # [B, L]
    out = []
    for b in range(meta.shape[0]):
        n = int(valid[b].sum())
        if not bool(valid[b, :n].all()):
            raise ValueError(f"row {b}: valid response positions are not a prefix; packing needs x0[:n]")
        out.append(Segment(b, int(prompt_real[b].sum()), n))
    return out


def plan_packing(segs: list[Segment], budget: int) -> list[list[Segment]]:
    """Greedy first-fit in row order: each segment goes into the first sequence with room.

    Raises when a segment alone exceeds ``budget`` (``train.pack_tokens`` must hold the longest row).
    """
    bins: list[list[Segment]] = []
    used: list[int] = []
    for seg in segs:
        if seg.length > budget:
            raise ValueError(f"train.pack_tokens={budget} is shorter than a row of {seg.length} tokens "
                             f"(prompt {seg.prompt_len} + 2 x response {seg.valid_len})")
        for i, total in enumerate(used):
            if total + seg.length <= budget:
                bins[i].append(seg)
                used[i] += seg.length
                break
        else:
            bins.append([seg])
            used.append(seg.length)
    return bins


def segment_columns(width: int, response_len: int, seg: Segment, start: int, block_size: int,
                    shift: bool) -> Tensor:
    """Packed columns ``[L]`` predicting response tokens 0..L-1 of ``seg`` placed at ``start``.

    The padded rule (``masks.prediction_columns``) maps a column of the padded row; the segment
    keeps the padded row's prompt tail, x0 head and xt head, so each such column moves by a
    per-part offset. Positions >= the valid length get column 0 (outside the loss mask).
    """
    cols = masks.prediction_columns(width, response_len, block_size, shift)  # [L] padded-row columns
    p, n = seg.prompt_len, seg.valid_len
    x0_at, xt_at = start + p, start + p + n  # where the segment's x0 and xt begin
    in_xt = cols >= width + response_len
    packed = torch.where(in_xt, cols - (width + response_len) + xt_at, cols - width + x0_at)  # x0 or prompt tail
    # A segment with an empty prompt (the absolute grid's frame when P < b: its first x0 token is a
    # given head, outside the loss) has no column before its x0: its own first column stands in.
    packed = packed.clamp(min=start)
    return torch.where(torch.arange(response_len) < n, packed, torch.zeros_like(packed))


def pack_rows(rows: dict[str, Tensor], budget: int, *, block_size: int, shift: bool,
              pad_id: int) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    """Packed micro-batches of the padded student ``rows``, and each one's padded row indices.

    Args:
        rows: ``states.assemble``'s dict: ``input_ids``/``position_ids`` ``[B, P + 2L]``, ``meta``
            ``[B, 2, P + 2L]``, ``loss_mask``/``x0``/``xt_masked`` ``[B, L]``.
        budget: tokens per packed sequence (``train.pack_tokens``).
        block_size, shift: ``diffusion.block_size`` and ``diffusion.shift_logits`` (which columns
            predict each response token).
        pad_id: the token filling the sequence's tail (never attended to: its kind is ``PAD``).

    Returns ``(microbatches, groups)``: each micro-batch has ``input_ids``/``position_ids`` ``[1,
    budget]``, ``meta`` ``[1, 3, budget]`` (doc -1 on the tail), ``logits_columns`` ``[R * W]`` (W:
    its longest valid response) and the row keys ``[R, L]``; ``groups[i]`` ``[R]`` are its rows' indices in ``rows`` (teacher
    inputs and targets follow the rows).
    """
    length = rows["loss_mask"].shape[1]
    width = rows["input_ids"].shape[1] - 2 * length
    out, groups = [], []
    for bin_ in plan_packing(segments(rows["meta"], length), budget):
        ids = torch.full((budget,), pad_id, dtype=rows["input_ids"].dtype)  # [budget]
        pos = torch.zeros(budget, dtype=rows["position_ids"].dtype)  # [budget]
        meta = torch.tensor([0, masks.PAD, -1], dtype=rows["meta"].dtype)[:, None].repeat(1, budget)  # [3, budget]
        cols, start = [], 0
        width_mb = max(1, max(seg.valid_len for seg in bin_))  # W: columns per row that can hold a loss
        for doc, seg in enumerate(bin_):
            keep = torch.cat([torch.arange(width - seg.prompt_len, width + seg.valid_len),
                              torch.arange(width + length, width + length + seg.valid_len)])  # [seg.length]
            end = start + seg.length
            ids[start:end] = rows["input_ids"][seg.row, keep]
            pos[start:end] = rows["position_ids"][seg.row, keep]
            meta[:2, start:end] = rows["meta"][seg.row, :, keep]
            meta[2, start:end] = doc
            cols.append(segment_columns(width, length, seg, start, block_size, shift)[:width_mb])
            start = end
        index = torch.tensor([s.row for s in bin_])  # [R]
        mb = dict(input_ids=ids[None], position_ids=pos[None], meta=meta[None],  # [1, budget], [1, 3, budget]
                  logits_columns=torch.cat(cols))  # [R * W]
        mb.update({k: rows[k][index] for k in ROW_KEYS if k in rows})  # [R, L]
        out.append(mb)
        groups.append(index)
    return out, groups


def row_logits(logits: Tensor, rows: int) -> Tensor:
    """A packed micro-batch's logits ``[1, R * W, V/tp]`` (its ``logits_columns``) as ``[R, W, V/tp]``:
    row-shaped logits for the first W response positions, the only ones with a loss."""
    if logits.shape[0] != 1 or logits.shape[1] % rows:
        raise ValueError(f"packed logits {tuple(logits.shape)} do not hold {rows} rows of equal width")
    return logits.reshape(rows, logits.shape[1] // rows, logits.shape[-1])  # a view: the projection is contiguous


def real_tokens(meta: Tensor) -> int:
    """Tokens of rows ``[B, 2 or 3, S]`` whose kind is not ``PAD``: what a packed sequence keeps."""
    return int((meta[:, 1] != masks.PAD).sum())


def padding_fraction(microbatches: list[dict[str, Tensor]]) -> float:
    """Fraction of the micro-batches' token slots that are padding (kind ``PAD``)."""
    total = sum(mb["meta"][:, 1].numel() for mb in microbatches)
    return 1 - sum(real_tokens(mb["meta"]) for mb in microbatches) / max(total, 1)
