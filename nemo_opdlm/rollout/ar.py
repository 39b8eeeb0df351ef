"""Causal next-token decoding of the same weights: the AR teacher's way, one token per forward.

One job: decode left-padded prompts token by token with a causal layout (block size 1), with or
without the KV cache, under the sampler's sampling settings and EOS rules. Used for off-policy
rollouts (the teacher's responses) and for evaluating the teacher. Non-goals: block diffusion
(``cached.py``, ``lockstep.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nemo_opdlm.models import masks
from nemo_opdlm.rollout.engine import DecodeEngine



def decode_ar(engine: DecodeEngine, prompt_ids: Tensor, prompt_lens: Tensor, limits: Tensor,
              max_new: int) -> tuple[Tensor, Tensor, int]:
    """``(tokens [B, max_new], step_map [B, max_new], rounds)``: each row decodes until an EOS or its
    limit (``limits [B]``, ``max_new`` their maximum); ``step_map`` is 0 for every decoded token."""
    cfg, dev = engine.config, engine.device
    if int(prompt_lens.min()) < 1:
        raise ValueError("autoregressive decoding needs a non-empty prompt in every row")
    batch, width = prompt_ids.shape
    all_valid = torch.ones(batch, max_new, dtype=torch.bool, device=dev)
    layout = masks.build_layout(prompt_lens, width, all_valid, 1, with_xt=False)
    pos_all, meta_all = layout.position_ids, layout.meta  # [B, P+L], [B, 2, P+L]
    tokens = torch.full((batch, max_new), cfg.pad_id, dtype=torch.long, device=dev)
    step_map = torch.full((batch, max_new), -1, dtype=torch.long, device=dev)
    rows = torch.arange(batch, device=dev)
    rounds = 0
    with engine.session(batch, width + max_new, cfg.decode.use_cache) as cache:
        for i in range(max_new):
            rounds += 1
            # Token i is predicted at column width + i - 1 (the last prompt token for i = 0).
            end = width + i
            lo = 0 if cache is None or i == 0 else end - 1
            ids = torch.cat([prompt_ids[rows, lo:width], tokens[rows, max(lo - width, 0): i]], dim=1)
            logits = engine.forward(ids, pos_all[rows, lo:end], meta_all[rows, :, lo:end], cache, commit=end - lo,
                                     keep_last=1)
            nxt = torch.zeros(rows.numel(), 1, dtype=torch.long, device=dev)  # [N, 1]
            if logits is not None:
                uniform = engine.draw(batch, 1)  # [B, 1] or None
                nxt = engine.choose(logits, None if uniform is None else uniform[rows])[0]
            nxt = engine.share(nxt)
            tokens[rows, i] = nxt[:, 0]
            step_map[rows, i] = 0
            done = torch.isin(nxt[:, 0], engine.eos) | (i == limits[rows] - 1)  # [N]
            if bool(done.any()):
                keep = (~done).nonzero()[:, 0]
                rows = rows[keep]
                if cache is not None:
                    cache.keep(keep)
                if rows.numel() == 0:
                    break
    return tokens, step_map, rounds
