"""The fast block decoder: a block KV cache, and every row on its own block.

One job: decode ``RowRecords`` with the cache (``kv_cache.py``), rows asynchronous. The first round
forwards ``[prompt | block 0]`` for every row and commits the prompt. Then a row whose block
completed in the previous round forwards ``[final tokens of that block | masks of its next
block]`` and commits the first part after the forward; a row still inside its block forwards the
block. Rows of both kinds go in separate forwards, or in one with the others' commit slots PAD
(``DecodeConfig.pad_commit_slots``). Each row's decisions depend on its own context, its own round
within the block and its own per-block uniforms only: the same as decoding it alone (and the
same as ``lockstep.py``). Non-goals: the per-row records and rules (``rows.py``).

A round reads the device once (``RoundSummary``): on a GPU every read of a device value on the
host waits for the queued kernels, so the Python and launch work of the next forward could not
overlap this one. What the host needs for the next round (rows complete or finished, rows
committing, the lowest and highest block, the cache's frontier) is reduced on the device and read
as one small tensor; everything else (which rows commit, finish or move in the cache) stays on the
device as masks, and index tensors come from sorts whose sizes the host knows (never ``nonzero``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nemo_opdlm.models import masks
from nemo_opdlm.rollout.engine import DecodeEngine
from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.rollout.rows import MASKED, RowRecords, first_true
from nemo_opdlm.rollout.stages import MicroBatch



@dataclass(frozen=True)
class RoundSummary:
    """What the host knows after a cached round: the round's only read of device values."""

    complete: int
    """Rows whose block is complete (they record it and move to their next block)."""
    finished: int
    """Rows among those that are done (dropped from the batch, and the cache)."""
    lo: int
    """Lowest block of the rows still decoding (their block next round)."""
    hi: int
    """Highest block of the rows still decoding: the cache frontier after next round's commit is
    ``P + hi * bs`` (a row in block ``b`` has committed its prompt and blocks ``0..b-1``)."""
    kept_hi: int
    """Highest block this round among the rows that stay: the frontier after the compaction."""

    @classmethod
    def read(cls, block: Tensor, complete: Tensor, finished: Tensor) -> "RoundSummary":
        """From this round's blocks, complete and finished rows (all ``[N]``, N >= 1): one host sync."""
        nxt = block + complete.long()  # [N] each row's block next round
        counts = torch.stack([complete, finished]).sum(-1)  # [2]
        # Over the rows that stay: max of -nxt (= -lo), of nxt (hi) and of block (kept_hi).
        blocks = torch.where(~finished, torch.stack([-nxt, nxt, block]), torch.iinfo(torch.long).min).amax(-1)  # [3]
        n_complete, n_finished, neg_lo, hi, kept_hi = torch.cat([counts, blocks]).tolist()
        return cls(n_complete, n_finished, -neg_lo, hi, kept_hi)


@dataclass
class ActiveRows:
    """The rows still decoding (device tensors, ``N`` rows) and what the host knows of them."""

    rows: Tensor
    """``[N]`` original row ids."""
    block: Tensor
    """``[N]`` current block per row."""
    step: Tensor
    """``[N]`` round within the block."""
    x: Tensor
    """``[N, bs]`` the block's tokens ([MASK] where undecided)."""
    st: Tensor
    """``[N, bs]`` round at which each position was unmasked, ``MASKED`` while masked (``GIVEN``: a head token)."""
    first: Optional[Tensor] = None
    """Shifted models: ``[N, V/tp]`` each row's prediction of its block's first token."""
    n: int = 0
    """Host: active rows."""
    n_commit: int = 0
    """Host: rows committing their previous block this round."""
    lo: int = 0
    """Host: lowest block among the active rows."""
    hi: int = 0
    """Host: highest block among the active rows."""

    @classmethod
    def start(cls, d: RowRecords, mask_id: int) -> "ActiveRows":
        x, st = d.first_block(mask_id)  # [B, bs] each
        zeros = torch.zeros(d.batch, dtype=torch.long, device=x.device)
        return cls(rows=torch.arange(d.batch, device=x.device), block=zeros, step=zeros.clone(), x=x, st=st, n=d.batch)


def shifted_predictions(logits: Tensor, first: Optional[Tensor], starting: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions ``[N, bs, V/tp]`` of a shifted model's block positions, and the updated ``first``.

    ``logits [N, bs + 1, V/tp]``: column 0 is the last clean token before the block for the rows
    ``starting [N]`` their block this round (the prompt's last token, or the previous block's last
    token in its commit slot), and unspecified for the others; columns 1.. are the block. A row's
    first-token prediction comes from its clean context only, so it is computed once, when the
    block starts, and kept in ``first [N, V/tp]`` for the block's later rounds.
    """
    fresh = logits[:, 0]  # [N, V/tp]
    first = fresh if first is None else torch.where(starting[:, None], fresh, first)
    return torch.cat([first[:, None], logits[:, 1:-1]], dim=1), first


def decode_cached(engine: DecodeEngine, d: RowRecords) -> int:
    """Fill ``d``'s records; returns the batch-level rounds."""
    cfg = engine.config
    bs = d.block_size
    a = ActiveRows.start(d, cfg.mask_id)
    n_out = bs + int(cfg.shift_logits)  # logit columns per row; shifted: also the one before the block
    rounds = 0
    with engine.session(d.batch, d.width + d.length + bs, use_cache=True) as cache:
        assert cache is not None
        while a.n:
            if rounds == 0:
                logits = _first_round(engine, d, a, cache, n_out)
            else:
                logits = _next_round(engine, d, a, cache, n_out)
            rounds += 1
            if logits is not None:
                _decide(engine, d, a, logits)
            a.x, a.st = engine.share(torch.stack([a.x, a.st])).unbind(0)
            _advance(d, a, cache, cfg.mask_id)
    return rounds


def _first_round(engine: DecodeEngine, d: RowRecords, a: ActiveRows, cache: BlockKVCache,
                 n_out: int) -> Optional[Tensor]:
    """``[prompt | block 0]`` for every row; the prompt is committed."""
    width = d.width + d.block_size
    ids = torch.cat([d.prompt_ids, a.x], dim=1)  # [B, P + bs]
    mbs = engine.microbatches(ids, d.pos_all[:, :width], d.meta_all[:, :, :width], slice(0, d.batch))
    logits = engine.stages.run(mbs, cache, n_out)
    cache.commit(d.width)
    return logits


def _next_round(engine: DecodeEngine, d: RowRecords, a: ActiveRows, cache: BlockKVCache,
                n_out: int) -> Optional[Tensor]:
    """Every active row's current block, after its commit slot for the rows starting a new block."""
    bs = d.block_size
    committing = (a.step == 0) & (a.block > 0)  # [N] (n_commit of them)
    order: Optional[Tensor] = None
    if a.n_commit in (0, a.n) or engine.pad_commit_slots:
        groups: list[tuple[slice | Tensor, bool]] = [(slice(0, a.n), a.n_commit > 0)]
    else:
        order = first_true(committing, a.n)  # [N] committing rows first, then the others
        groups = [(order[:a.n_commit], True), (order[a.n_commit:], False)]
    mbs: list[MicroBatch] = []
    for index, with_slot in groups:
        mbs += engine.microbatches(*_round_inputs(d, a, committing, index, with_slot, engine.config.pad_id), index)
    logits = engine.stages.run(mbs, cache, n_out)
    if logits is not None and order is not None:
        logits = torch.empty_like(logits).index_copy_(0, order, logits)
    # A row in block b has committed its prompt and blocks 0..b-1 after this commit.
    cache.commit(committing.long() * bs, largest=bs if a.n_commit else 0, frontier=d.width + a.hi * bs)
    return logits


def _round_inputs(d: RowRecords, a: ActiveRows, committing: Tensor, index: slice | Tensor, with_slot: bool,
                  pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, positions, meta)`` of active rows ``index`` for a cached round: their current block,
    after a commit slot when ``with_slot`` (final tokens of the previous block for the rows
    committing, PAD for the others)."""
    bs = d.block_size
    rows, block, x, committing = a.rows[index], a.block[index], a.x[index], committing[index]
    cur = d.width + block[:, None] * bs + torch.arange(bs, device=rows.device)  # [n, bs] columns
    ids = x  # [n, bs]
    cols = cur
    if with_slot:
        prev = d.tokens[rows].gather(1, (cur - d.width - bs).clamp(min=0))  # [n, bs]
        ids = torch.cat([torch.where(committing[:, None], prev, pad_id), x], dim=1)  # [n, 2bs]
        cols = torch.cat([(cur - bs).clamp(min=0), cur], dim=1)  # [n, 2bs]
    pos = d.pos_all[rows].gather(1, cols)  # [n, S]
    meta = d.meta_all[rows].gather(2, cols[:, None].expand(-1, 2, -1))  # [n, 2, S]
    if with_slot:
        meta[:, 1, :bs] = torch.where(committing[:, None], meta[:, 1, :bs], masks.PAD)
    return ids, pos, meta


def _decide(engine: DecodeEngine, d: RowRecords, a: ActiveRows, logits: Tensor) -> None:
    """Unmask this round's positions of every active row (last pipeline stage)."""
    if engine.config.shift_logits:
        logits, a.first = shifted_predictions(logits, a.first, a.step == 0)
    uniform = d.uniforms(a.rows, a.block, a.step, a.lo, a.hi)  # [N, bs] or None
    cand, conf = engine.choose(logits, uniform)  # [N, bs], [N, bs]
    chosen = d.unmask(conf, a.st, a.step, a.rows)  # [N, bs]
    a.x = torch.where(chosen, cand, a.x)
    a.st = torch.where(chosen, a.step[:, None], a.st)


def _advance(d: RowRecords, a: ActiveRows, cache: BlockKVCache, mask_id: int) -> None:
    """After a round: record the complete blocks, move their rows on, drop the finished rows."""
    bs = d.block_size
    complete = ~(a.st == MASKED).any(-1)  # [N]
    finished = complete & d.finishes(a.x, a.rows, a.block)  # [N]
    a.step = a.step + 1
    summary = RoundSummary.read(a.block, complete, finished)  # the round's host sync
    a.lo, a.hi, a.n_commit = summary.lo, summary.hi, summary.complete - summary.finished
    if not summary.complete:
        return
    done_rows = first_true(complete, summary.complete)  # [c]
    cols = a.block[done_rows, None] * bs + torch.arange(bs, device=a.x.device)  # [c, bs]
    d.tokens[a.rows[done_rows, None], cols] = a.x[done_rows]
    d.step_map[a.rows[done_rows, None], cols] = a.st[done_rows]
    a.block = torch.where(complete, a.block + 1, a.block)
    a.step = torch.where(complete, 0, a.step)
    a.x = torch.where(complete[:, None], mask_id, a.x)
    a.st = torch.where(complete[:, None], MASKED, a.st)
    if summary.finished:
        a.n -= summary.finished
        kept = first_true(~finished, a.n)  # [n]
        a.rows, a.block, a.step, a.x, a.st = a.rows[kept], a.block[kept], a.step[kept], a.x[kept], a.st[kept]
        a.first = None if a.first is None else a.first[kept]
        cache.keep(kept, frontier=d.width + summary.kept_hi * bs if a.n else 0)
