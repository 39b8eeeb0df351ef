"""Core attention for block masks: the ``core_attention`` slot of megatron-core's SelfAttention.

One job: given roped q/k/v of this forward and the token metadata of ``masks.py``, compute the
context, optionally against the keys/values of a KV cache. Non-goals: projections, RoPE and
norms (megatron-core's SelfAttention does those), cache policy (the rollout sampler owns it).

Back ends, chosen per model by config (``ModelConfig.attention_backend``):

- ``local``: megatron-core's own ``DotProductAttention`` with a dense boolean mask
  (``AttnMaskType.arbitrary``). It materialises the score matrix: the reference path.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the dense mask and native
  GQA. Fast on CPU, with backward: the CPU default. While a KV cache is bound (rollout decoding:
  a block or two of queries against the whole cache) GQA is done by folding query heads instead
  (``grouped_query_sdpa``), so no key is ever repeated.
- ``flex``: FlexAttention with a ``BlockMask`` built from the same rule (GPU default, compiled;
  forward only on CPU). Transformer Engine's fused kernels do not take arbitrary block masks,
  so with TE present only the linear layers come from TE and attention stays here.
"""

from __future__ import annotations

import functools
import math
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


class LayerKVCache(Protocol):
    """What a layer's KV cache offers the core attention (implemented in ``rollout/kv_cache.py``)."""

    def extend(
        self, key: torch.Tensor, value: torch.Tensor, meta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return cached + current keys ``[Sk, B, G, D]``, values, and key metadata ``[B, 2, Sk]``."""
        ...


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


class _MaskMemo:
    """Builds each mask once per forward: all layers of a model see the same metadata tensors.

    It holds the metadata tensors it keyed on, so their ids cannot be reused by new tensors.
    """

    def __init__(self) -> None:
        self._held: tuple = ()
        self._key: Optional[tuple] = None
        self._value: Any = None

    def get(self, kind: str, q_meta: torch.Tensor, k_meta: torch.Tensor, build) -> Any:
        key = (kind, id(q_meta), q_meta._version, id(k_meta), k_meta._version)
        if key != self._key:
            self._value, self._key, self._held = build(), key, (q_meta, k_meta)
        return self._value


_MEMO = _MaskMemo()


def _dense_allowed(q_meta: torch.Tensor, k_meta: torch.Tensor) -> torch.Tensor:
    return _MEMO.get("dense", q_meta, k_meta, lambda: masks.allowed(q_meta, k_meta))


def _flex_block_mask(q_meta: torch.Tensor, k_meta: torch.Tensor):
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

    return _MEMO.get("flex", q_meta, k_meta, build)


class BlockAttention(MegatronModule):
    """Core attention that reads ``attention_mask`` as token metadata ``[B, 2, S]`` (masks.py).

    Inputs follow megatron-core: query ``[Sq, B, H/tp, D]``, key/value ``[Sq, B, G/tp, D]``;
    output ``[Sq, B, H/tp * D]``. ``kv_cache`` is set by the rollout sampler for the duration of
    a cached decode and is None otherwise.
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
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kv_cache: Optional[LayerKVCache] = None
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
        q_meta = attention_mask
        k_meta = q_meta
        if self.kv_cache is not None:
            key, value, k_meta = self.kv_cache.extend(key, value, q_meta)
        sq, batch, heads, dim = query.shape
        if self.backend == "local":
            assert self.local is not None
            return self.local(query, key, value, ~_dense_allowed(q_meta, k_meta)[:, None], None)
        q = query.permute(1, 2, 0, 3)  # [B, H, Sq, D]
        k = key.permute(1, 2, 0, 3)  # [B, G, Sk, D]
        v = value.permute(1, 2, 0, 3)  # [B, G, Sk, D]
        gqa = heads != k.shape[1]
        if self.backend == "flex":
            out = _compiled_flex()(
                q, k, v, block_mask=_flex_block_mask(q_meta, k_meta), scale=self.softmax_scale,
                enable_gqa=gqa,
            )
        elif self.kv_cache is not None and gqa:
            out = grouped_query_sdpa(q, k, v, _dense_allowed(q_meta, k_meta), self.softmax_scale)
        else:
            dropout = self.dropout_p if self.training else 0.0
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=_dense_allowed(q_meta, k_meta)[:, None],
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
