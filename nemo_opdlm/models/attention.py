"""Core attention for block masks: the ``core_attention`` slot of megatron-core's SelfAttention.

One job: given roped q/k/v of this forward and the token metadata of ``masks.py``, compute the
context, optionally against the keys/values of a KV cache. Non-goals: projections, RoPE and
norms (megatron-core's SelfAttention does those), cache policy (the rollout sampler owns it).

Back ends, chosen per model by config (``ModelConfig.attention_backend``):

- ``local``: megatron-core's own ``DotProductAttention`` with a dense boolean mask
  (``AttnMaskType.arbitrary``). It materialises the score matrix: the reference path.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the dense mask and native
  GQA. Fast on CPU, with backward: the CPU default. Long block-causal training rows run it per
  query tile over only the key tiles the tile may see (``plan_tiles``), which skips the masked-out
  two thirds of a ``[prompt | x0 | xt]`` score matrix as ``is_causal`` does for an AR model. While a KV cache is bound (rollout decoding:
  a block or two of queries against the whole cache) GQA is done by folding query heads instead
  (``grouped_query_sdpa``), so no key is ever repeated.
- ``flex``: FlexAttention with a ``BlockMask`` built from the same rule (GPU default, compiled;
  forward only on CPU). Transformer Engine's fused kernels do not take arbitrary block masks,
  so with TE present only the linear layers come from TE and attention stays here. Decoding
  forwards use SDPA instead: compiled flex kernels specialise on the key length, which grows every
  block, and tile queries by 128 where a round has a block or two.

What a forward needs beyond megatron-core's arguments reaches the layers through a
``ForwardContext`` that the model's own ``forward`` creates and hands to each of its attention
layers for the duration of the call (megatron-core's layers pass nothing through to core
attention): the mask built once per forward for all layers, and, when decoding, the KV cache the
caller passed to ``forward``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_opdlm.models import masks

BACKENDS = ("local", "sdpa", "flex")


class KVCache(Protocol):
    """What a KV cache offers the core attention (implemented in ``rollout/kv_cache.py``)."""

    def extend(
        self, layer_number: int, key: torch.Tensor, value: torch.Tensor, meta: torch.Tensor, contiguous: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store layer ``layer_number``'s current keys/values; return cached + current keys
        ``[Sk, B, G, D]``, values, and key metadata ``[B, 2, Sk]``."""
        ...


class ForwardContext:
    """One model forward's state shared by its attention layers: the masks, built once for all
    layers (and kept only for this forward), and the decode settings.

    Args:
        kv_cache: the cache of a cached decoding forward, else None.
        decoding: a decoding forward (no backward; Flex layers run SDPA).
    """

    def __init__(self, kv_cache: Optional[KVCache] = None, decoding: bool = False) -> None:
        self.kv_cache = kv_cache
        self.decoding = decoding or kv_cache is not None
        self._masks: dict[tuple, tuple] = {}

    def mask(self, kind: str, q_meta: torch.Tensor, k_meta: torch.Tensor, build) -> Any:
        """``build()``, once per (kind, query metadata, key metadata) in this forward."""
        key = (kind, id(q_meta), q_meta._version, id(k_meta), k_meta._version)
        if key not in self._masks:
            self._masks[key] = (build(), q_meta, k_meta)  # holding the tensors keeps their ids unique
        return self._masks[key][0]


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        return torch.compile(flex_attention)  # shapes change with the curriculum: let it go dynamic
    return flex_attention


def _memo(ctx: Optional[ForwardContext], kind: str, q_meta: torch.Tensor, k_meta: torch.Tensor, build) -> Any:
    """Through the forward's memo when there is one (activation recompute re-runs a layer outside
    its model's forward: the mask is then built again)."""
    return build() if ctx is None else ctx.mask(kind, q_meta, k_meta, build)


def _dense_allowed(ctx: Optional[ForwardContext], q_meta: torch.Tensor, k_meta: torch.Tensor) -> torch.Tensor:
    return _memo(ctx, "dense", q_meta, k_meta, lambda: masks.allowed(q_meta, k_meta))


def _flex_block_mask(ctx: Optional[ForwardContext], q_meta: torch.Tensor, k_meta: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        return create_block_mask(
            masks.flex_mask_mod(q_meta, k_meta),
            B=q_meta.shape[0],
            H=None,
            Q_LEN=q_meta.shape[-1],
            KV_LEN=k_meta.shape[-1],
            device=q_meta.device,
        )

    return _memo(ctx, "flex", q_meta, k_meta, build)


QUERY_TILE = 128
"""Query rows per tile of :func:`tiled_sdpa` (measured on CPU at 1,024 tokens: 64 and 256 are slower)."""
TILED_MAX_FRACTION = 0.75
"""Tile only when the tiles cover at most this fraction of the dense score matrix."""


@dataclass(frozen=True)
class Tile:
    """Queries ``rows`` attend to the keys in ``spans`` (column ranges, in order) under ``mask``
    ``[B, 1, len(rows), sum of span lengths]``."""

    rows: slice
    spans: tuple[tuple[int, int], ...]
    mask: torch.Tensor


def plan_tiles(allowed: torch.Tensor, tile: int = QUERY_TILE,
               max_fraction: float = TILED_MAX_FRACTION) -> Optional[list[Tile]]:
    """Split a dense permission ``[B, S, S]`` into query tiles that skip the key tiles no query of
    the tile may see; None when that saves too little to pay for the extra kernel calls.

    Why: SDPA's CPU kernel only skips work for ``is_causal``; with an explicit mask it scores every
    (query, key) pair. The student's ``[prompt | x0 | xt]`` rows are block-causal, so about two
    thirds of the dense matrix is masked out: tiling computes roughly what a causal model of the
    same length does. Fully masked tiles are skipped, so the result equals the dense call (each
    query's softmax runs over the same allowed keys; only the summation order differs).
    """
    seq = allowed.shape[-1]
    if allowed.shape[-2] != seq or seq < 2 * tile:
        return None
    n = -(-seq // tile)
    anywhere = F.pad(allowed.any(dim=0), (0, n * tile - seq, 0, n * tile - seq))  # [n * tile, n * tile]
    live = anywhere.view(n, tile, n, tile).any(dim=(1, 3)).tolist()  # [query tile][key tile]
    if sum(map(sum, live)) > max_fraction * n * n:
        return None
    tiles = []
    for i, row in enumerate(live):
        spans: list[list[int]] = []
        for j, used in enumerate(row):
            if used and spans and spans[-1][1] == j * tile:
                spans[-1][1] = min(seq, (j + 1) * tile)
            elif used:
                spans.append([j * tile, min(seq, (j + 1) * tile)])
        rows = slice(i * tile, min(seq, (i + 1) * tile))
        mask = torch.cat([allowed[:, rows, a:b] for a, b in spans], dim=-1)[:, None]
        tiles.append(Tile(rows, tuple((a, b) for a, b in spans), mask))
    return tiles


def _gather_keys(x: torch.Tensor, spans: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Columns ``spans`` of ``x [B, G, S, D]`` (a view when there is one span)."""
    parts = [x[:, :, a:b] for a, b in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def tiled_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: list[Tile], dropout_p: float,
               scale: float, gqa: bool) -> torch.Tensor:
    """SDPA over the tiles of :func:`plan_tiles`: ``q [B, H, S, D]``, ``k``/``v [B, G, S, D]``."""
    outs = [
        F.scaled_dot_product_attention(q[:, :, t.rows], _gather_keys(k, t.spans), _gather_keys(v, t.spans),
                                       attn_mask=t.mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
        for t in tiles
    ]
    return torch.cat(outs, dim=2)


def _tile_plan(ctx: Optional[ForwardContext], q_meta: torch.Tensor, k_meta: torch.Tensor) -> Optional[list[Tile]]:
    return _memo(ctx, "tiles", q_meta, k_meta, lambda: plan_tiles(_dense_allowed(ctx, q_meta, k_meta), QUERY_TILE))


class BlockAttention(MegatronModule):
    """Core attention that reads ``attention_mask`` as token metadata ``[B, 2, S]`` (masks.py).

    Inputs follow megatron-core: query ``[Sq, B, H/tp, D]``, key/value ``[Sq, B, G/tp, D]``;
    output ``[Sq, B, H/tp * D]``. ``context`` is the running forward's ``ForwardContext``, set by
    the owning ``DiffusionGPTModel.forward`` for the duration of the call (None outside it).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
        backend: str = "sdpa",
        **unused: Any,
    ) -> None:
        super().__init__(config=config)
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "flex" and not flex_available():
            raise ValueError("attention backend 'flex' needs torch.nn.attention.flex_attention")
        self.backend = backend
        self.layer_number = layer_number
        """Global (1-based) layer number: the layer's key in a KV cache."""
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.context: Optional[ForwardContext] = None
        self.local: Optional[DotProductAttention] = None
        if backend == "local":
            self.local = DotProductAttention(
                config=config,
                layer_number=layer_number,
                attn_mask_type=AttnMaskType.arbitrary,
                attention_type=attention_type,
                attention_dropout=attention_dropout,
                softmax_scale=softmax_scale,
                pg_collection=pg_collection,
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
        **unused: Any,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("BlockAttention takes neither attention_bias nor packed sequences")
        ctx = self.context
        cache = ctx.kv_cache if ctx is not None else None
        q_meta = attention_mask
        k_meta = q_meta
        if cache is not None:
            key, value, k_meta = cache.extend(self.layer_number, key, value, q_meta,
                                              contiguous=self.backend == "local")
        sq, batch, heads, dim = query.shape
        if self.backend == "local":
            assert self.local is not None
            return self.local(query, key, value, ~_dense_allowed(ctx, q_meta, k_meta)[:, None], None)
        q = query.permute(1, 2, 0, 3)  # [B, H, Sq, D]
        k = key.permute(1, 2, 0, 3)  # [B, G, Sk, D]
        v = value.permute(1, 2, 0, 3)  # [B, G, Sk, D]
        gqa = heads != k.shape[1]
        if self.backend == "flex" and not (ctx is not None and ctx.decoding):
            out = _compiled_flex()(
                q, k, v, block_mask=_flex_block_mask(ctx, q_meta, k_meta), scale=self.softmax_scale,
                enable_gqa=gqa,
            )
        elif cache is not None and gqa:
            out = grouped_query_sdpa(q, k, v, _dense_allowed(ctx, q_meta, k_meta), self.softmax_scale)
        else:
            dropout = self.dropout_p if self.training else 0.0
            tiles = _tile_plan(ctx, q_meta, k_meta) if cache is None else None
            with tensor_parallel.get_cuda_rng_tracker().fork():
                if tiles is not None:
                    out = tiled_sdpa(q, k, v, tiles, dropout, self.softmax_scale, gqa)
                else:
                    out = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=_dense_allowed(ctx, q_meta, k_meta)[:, None],
                        dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa,
                    )
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * dim)  # [Sq, B, H*D]


def grouped_query_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """GQA attention of a few queries against a long KV cache, without repeating the keys.

    ``q [B, H, Sq, D]``, ``k``/``v [B, G, Sk, D]``, ``allowed [B, Sq, Sk]``; returns ``[B, H, Sq, D]``.
    The ``H / G`` query heads of a group read the same keys, so they are folded into the query
    length (``[B, G, H/G * Sq, D]``) and attention runs as plain multi-head attention over G heads.
    SDPA's own GQA (``enable_gqa``) may fall back to a path that repeats every cached key and value
    H/G times: per decoding round that is a copy of the whole cache, for a few query tokens.
    """
    batch, heads, sq, dim = q.shape
    groups = k.shape[1]
    rep = heads // groups
    folded = q.reshape(batch, groups, rep * sq, dim)  # heads h = g * rep + i: consecutive heads share a group
    mask = allowed[:, None, None].expand(batch, 1, rep, sq, allowed.shape[-1]).reshape(batch, 1, rep * sq, -1)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)  # [B, G, rep * Sq, D]
    return out.reshape(batch, heads, sq, dim)
