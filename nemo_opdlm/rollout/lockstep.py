"""The reference block decoder: no cache, every row on the same block, everything recomputed.

One job: decode ``RowRecords`` block by block in lockstep: each round forwards ``[prompt | blocks
0..b]`` for the rows still decoding and unmasks positions of block ``b``; a row whose block is
complete sits the remaining rounds of that block out. It decodes exactly the tokens and rounds per
row that the cached decoder (``cached.py``) does, which is what the tests compare. Non-goals:
speed (every round costs a full forward of the prefix).
"""

from __future__ import annotations

import torch

from nemo_opdlm.rollout.engine import DecodeEngine
from nemo_opdlm.rollout.rows import MASKED, RowRecords



def decode_lockstep(engine: DecodeEngine, d: RowRecords) -> int:
    """Fill ``d``'s records; returns the batch-level rounds."""
    cfg, dev = engine.config, engine.device
    bs, width = d.block_size, d.width
    rows = torch.arange(d.batch, device=dev)
    rounds = 0
    with engine.session(d.batch, 0, use_cache=False):
        for b in range(d.n_blocks):
            blk = width + b * bs  # first column of block b
            if b == 0:  # every row: [head | masks] (the head only on the absolute grid)
                x, st = d.first_block(cfg.mask_id)  # [N, bs] each
            else:
                x = torch.full((rows.numel(), bs), cfg.mask_id, dtype=torch.long, device=dev)  # [N, bs]
                st = torch.full_like(x, MASKED)  # [N, bs]
            block = torch.full((rows.numel(),), b, dtype=torch.long, device=dev)  # [N]
            for r in range(len(d.counts)):
                ids = torch.cat([d.prompt_ids[rows], d.tokens[rows, : b * bs], x], dim=1)  # [N, blk + bs]
                # Shifted: the column before the block (its clean context's last token) predicts
                # the block's first token, and each block column predicts the next one.
                logits = engine.forward(ids, d.pos_all[rows, : blk + bs], d.meta_all[rows, :, : blk + bs], None, 0,
                                         keep_last=bs + int(cfg.shift_logits))
                rounds += 1
                if logits is not None:
                    logits = logits[:, :bs]  # [N, bs, V/tp] the predictions of the block's positions
                    step = torch.full_like(block, r)  # [N]
                    cand, conf = engine.choose(logits, d.uniforms(rows, block, step, b, b))  # [N, bs], [N, bs]
                    chosen = d.unmask(conf, st, r, rows)  # [N, bs]
                    x = torch.where(chosen, cand, x)
                    st = torch.where(chosen, r, st)
                x, st = engine.share(torch.stack([x, st])).unbind(0)
                if not bool((st == MASKED).any()):
                    break
            d.tokens[rows, b * bs: (b + 1) * bs] = x
            d.step_map[rows, b * bs: (b + 1) * bs] = st
            finished = d.finishes(x, rows, block)  # [N]
            rows = rows[~finished]
            if rows.numel() == 0:
                break
    return rounds
