"""Forward-only passes of the decode through pipeline stages, and sharing each round's decisions.

One job: move one decode round's inputs through this rank's model chunks (explicit p2p of hidden
states between stages, micro-batch by micro-batch so that stages overlap), return the logits on
the last stage, and broadcast what the last stage decided to every rank of the model-parallel
group. Non-goals: what is decoded (``sampler.py``), caching (``kv_cache.py``).

Why not megatron-core's schedules here: decode rounds are short (a block of a few tokens), the
micro-batch row counts change as sequences finish, and each micro-batch must open its own
KV-cache scope; explicit ``isend``/``recv`` with shapes every rank can derive is simpler and keeps
the shapes free. Interleaved chunks (VPP) are walked in model order around the pipeline ring.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_opdlm.models.attention import BlockAttention
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.runtime.context import ParallelContext


@dataclass(frozen=True)
class MicroBatch:
    """Inputs of one micro-batch: rows ``rows`` of the active batch, ``S`` columns."""

    input_ids: Tensor  # [b, S]
    position_ids: Tensor  # [b, S]
    meta: Tensor  # [b, 2, S]
    rows: slice | Tensor  # which active rows (cache rows): a slice, or an ascending index tensor


def attention_layers(chunks: Sequence[DiffusionGPTModel]) -> list[BlockAttention]:
    """Every ``BlockAttention`` of this rank's chunks, in model order."""
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, BlockAttention)]


def split_rows(n: int, parts: int) -> list[slice]:
    """``n`` rows cut into ``min(parts, n)`` contiguous, near-equal slices."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


class StageRunner:
    """Runs this rank's chunks forward-only over micro-batches, passing hidden states along the ring."""

    def __init__(self, chunks: Sequence[DiffusionGPTModel]) -> None:
        self.chunks = list(chunks)
        parallel = self.chunks[0].parallel
        self.group, self.prev, self.next = parallel.pp_group, parallel.pp_prev_global, parallel.pp_next_global
        self.is_last_stage = any(c.post_process for c in self.chunks)
        config = self.chunks[0].config
        self.hidden = config.hidden_size
        self.dtype = config.pipeline_dtype or config.params_dtype
        self.device = next(self.chunks[0].parameters()).device

    def run(
        self, microbatches: Sequence[MicroBatch], cache: Optional[BlockKVCache], keep_last: int
    ) -> Optional[Tensor]:
        """Logits ``[n, keep_last, V/tp]`` of all micro-batches (rows concatenated) on the last stage.

        Only the last ``keep_last`` columns (the current block) reach the output layer: the prompt
        and committed columns would cost a ``[b, S, V/tp]`` projection for nothing. A micro-batch
        with fewer than ``keep_last`` columns projects all of them and its logits are left-padded
        with zeros (a shifted model's rows without a commit slot: their first column is unused).
        Other stages return None. Every rank of the pipeline must call this with the same shapes.
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        logits: list[Tensor] = []
        sends: list = []
        for chunk in self.chunks:
            for mb in microbatches:
                if not chunk.pre_process:
                    width, rows = mb.meta.shape[-1], mb.meta.shape[0]
                    hidden = torch.empty(width, rows, self.hidden, dtype=self.dtype, device=self.device)
                    dist.recv(hidden, src=self.prev, group=self.group)  # [S, b, H]
                    chunk.set_input_tensor(hidden)
                scope = cache.forward(mb.meta, mb.rows) if cache is not None else contextlib.nullcontext()
                with scope as view:
                    out = chunk(mb.input_ids if chunk.pre_process else None, mb.position_ids, mb.meta,
                                logits_last=min(keep_last, mb.meta.shape[-1]), kv_cache=view, decoding=True)
                if not chunk.pre_process:
                    chunk.set_input_tensor(None)
                if chunk.post_process:
                    short = keep_last - out.shape[1]
                    logits.append(torch.nn.functional.pad(out, (0, 0, short, 0)) if short else out)  # [b, keep_last, V/tp]
                else:
                    out = out.contiguous()  # [S, b, H]
                    sends.append((dist.isend(out, dst=self.next, group=self.group), out))
        for handle, _ in sends:
            handle.wait()
        if not logits:
            return None
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=0)


def share_decisions(t: Tensor, parallel: ParallelContext) -> Tensor:
    """Make ``t`` (decided on the last pipeline stage) identical on every rank of the model-parallel group.

    First TP rank 0 of the last stage overrides its TP peers (they computed the same values; this
    removes any doubt), then the last stage sends to the other stages of its pipeline. ``t`` must
    have the same shape and dtype on every rank (contents on non-last stages are ignored).
    """
    if parallel.tp_group is not None and parallel.is_last_stage:
        dist.broadcast(t, src=parallel.tp_src_global, group=parallel.tp_group)
    if parallel.pp_group is not None:
        dist.broadcast(t, src=parallel.pp_last_global, group=parallel.pp_group)
    return t
