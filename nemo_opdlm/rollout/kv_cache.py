"""A preallocated block KV cache for the rollout sampler.

One job: keep the roped keys/values (and the token metadata) of the tokens a decode has
*committed* (the prompt and finished blocks), for every ``BlockAttention`` layer of this rank, and
hand each layer "committed + current" keys on every forward. Non-goals: deciding what to commit
or when (the sampler owns the cache and drives it), attention itself (``models/attention.py``).

Life cycle, driven by the sampler:

1. ``with cache.bind(layers):`` attaches one slot per layer (``layer.kv_cache``); detached on exit.
2. Per forward (one per micro-batch): ``with cache.forward(meta, rows):`` the current ``Sq`` tokens
   of rows ``rows`` are written at columns ``[length, length + Sq)``, and each layer's
   ``extend(key, value, meta)`` returns the views ``[:length + Sq]``. Nothing is copied for the
   committed part.
3. After every round: ``cache.commit(n)`` makes the first ``n`` current columns permanent
   (``length += n``); the other columns are overwritten by the next round (0 for a plain round).
4. ``cache.keep(index)`` drops finished rows (compaction), so they cost nothing afterwards.

All rows share one ``length``: the sampler decodes every row's block ``b`` at the same columns.
Buffers are ``[B, G/tp, capacity, D]`` per layer so that the views handed out are, per head, one
contiguous ``[Sk, D]`` run (what SDPA reads best); extend returns them as ``[Sk, B, G/tp, D]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class _Pending:
    """The forward in flight: its query metadata, its rows, and the key metadata all layers share."""

    q_meta: Tensor
    rows: slice | Tensor
    k_meta: Tensor
    width: int


class _LayerSlot:
    """What one ``BlockAttention`` sees as its ``kv_cache``: the cache, at layer ``index``."""

    def __init__(self, cache: "BlockKVCache", index: int, contiguous: bool) -> None:
        self.cache = cache
        self.index = index
        self.contiguous = contiguous

    def extend(self, key: Tensor, value: Tensor, meta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.cache.extend(self.index, key, value, meta, contiguous=self.contiguous)


class BlockKVCache:
    """Keys/values of committed tokens for ``num_layers`` layers, preallocated for ``capacity`` columns.

    Args:
        num_layers: ``BlockAttention`` layers on this rank (all model chunks together).
        batch: rows at the start (compaction only shrinks it).
        capacity: columns (prompt width + response length).
        groups: key/value heads on this rank (``num_query_groups / tp``).
        head_dim: per-head width.
        dtype, device: of the keys and values (the model's activations).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        capacity: int,
        groups: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if min(num_layers, batch, capacity, groups, head_dim) < 1:
            raise ValueError(
                f"cache dimensions must be >= 1: layers={num_layers} batch={batch} "
                f"capacity={capacity} groups={groups} head_dim={head_dim}"
            )
        shape = (batch, groups, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.meta = torch.zeros(batch, 2, capacity, dtype=torch.long, device=device)  # [B, 2, C]
        self.capacity = capacity
        self.rows = batch
        """Rows still decoding (the first ``rows`` of every buffer)."""
        self.length = 0
        """Committed columns (the same for every row)."""
        self._pending: Optional[_Pending] = None
        # Per layer, rows written at the current round's columns (checked by commit).
        self._rows_written = [0] * num_layers
        self._round_width: Optional[int] = None
        self._bound: list = []

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    # --- binding -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def bind(self, layers: Sequence[torch.nn.Module]) -> Iterator["BlockKVCache"]:
        """Attach a slot to each layer's ``kv_cache`` (layers in model order); detach on exit."""
        if len(layers) != self.num_layers:
            raise ValueError(f"cache has {self.num_layers} layers, {len(layers)} given")
        if self._bound:
            raise RuntimeError("this cache is already bound")
        for layer in layers:
            if getattr(layer, "kv_cache", None) is not None:
                raise RuntimeError("a layer already has a KV cache bound: nested rollouts?")
        try:
            for i, layer in enumerate(layers):
                layer.kv_cache = _LayerSlot(self, i, contiguous=getattr(layer, "backend", "") == "local")
            self._bound = list(layers)
            yield self
        finally:
            for layer in layers:
                layer.kv_cache = None
            self._bound = []

    # --- one forward -------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self, meta: Tensor, rows: slice | Tensor | None = None) -> Iterator[None]:
        """Scope of one model forward over rows ``rows`` with current-token metadata ``meta [b, 2, Sq]``.

        ``rows``: a slice of the active rows, or an ascending index tensor (a subset of rows, e.g.
        those whose block still has masks; their committed keys are then gathered, a copy).
        """
        rows = slice(0, self.rows) if rows is None else rows
        if isinstance(rows, slice):
            assert rows.step in (None, 1) and (rows.stop is None or rows.stop <= self.rows), (
                f"rows {rows} must be a contiguous slice of the {self.rows} active rows"
            )
            n_rows = len(range(*rows.indices(self.rows)))
        else:
            assert rows.dim() == 1 and (rows.numel() == 0 or int(rows.max()) < self.rows), "bad row index"
            n_rows = rows.numel()
        width = meta.shape[-1]
        assert self._pending is None, "a cache forward is already open"
        assert meta.shape[0] == n_rows, f"meta has {meta.shape[0]} rows, the selection {n_rows}"
        assert self.length + width <= self.capacity, (
            f"cache overflow: {self.length} committed + {width} current > capacity {self.capacity}"
        )
        assert self._round_width in (None, width), "all forwards of one round must have the same width"
        end = self.length + width
        self.meta[rows, :, self.length:end] = meta
        self._pending = _Pending(q_meta=meta, rows=rows, k_meta=self.meta[rows, :, :end], width=width)
        self._round_width = width
        try:
            yield
        finally:
            self._pending = None

    def extend(
        self, layer: int, key: Tensor, value: Tensor, meta: Tensor, contiguous: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Write layer ``layer``'s current keys/values ``[Sq, b, G, D]``; return ``[:length + Sq]`` views."""
        pending = self._pending
        assert pending is not None, "BlockAttention ran with a KV cache outside cache.forward()"
        assert meta is pending.q_meta, "attention metadata differs from the one the cache was opened with"
        assert key.shape[0] == pending.width, f"{key.shape[0]} current keys, forward opened for {pending.width}"
        start, end = self.length, self.length + pending.width
        k_buf, v_buf = self.keys[layer], self.values[layer]
        assert key.shape[1:] == (meta.shape[0], k_buf.shape[1], k_buf.shape[3]), (
            f"key {tuple(key.shape)} does not fit the cache [Sq, {meta.shape[0]}, {k_buf.shape[1]}, {k_buf.shape[3]}]"
        )
        k_buf[pending.rows, :, start:end] = key.permute(1, 2, 0, 3)  # [b, G, Sq, D]
        v_buf[pending.rows, :, start:end] = value.permute(1, 2, 0, 3)
        self._rows_written[layer] += meta.shape[0]
        key_all = k_buf[pending.rows, :, :end].permute(2, 0, 1, 3)  # [Sk, b, G, D]
        value_all = v_buf[pending.rows, :, :end].permute(2, 0, 1, 3)
        if contiguous:  # megatron's DotProductAttention reshapes with .view
            key_all, value_all = key_all.contiguous(), value_all.contiguous()
        return key_all, value_all, pending.k_meta

    # --- between rounds ----------------------------------------------------------------------
    def commit(self, n: int) -> None:
        """End a round: keep its first ``n`` columns (``length += n``); the rest will be overwritten."""
        width = self._round_width or 0
        assert self._pending is None, "commit inside an open forward"
        assert 0 <= n <= width, f"cannot commit {n} columns of a round {width} wide"
        if n:
            missing = [i for i, r in enumerate(self._rows_written) if r != self.rows]
            assert not missing, f"layers {missing} did not write all {self.rows} rows this round"
        self.length += n
        self._rows_written = [0] * self.num_layers
        self._round_width = None

    def keep(self, index: Tensor) -> None:
        """Keep rows ``index`` (ascending, 1-D) of the active rows, compacted to the front."""
        assert self._pending is None and self._round_width is None, "compaction in the middle of a round"
        index = index.to(self.meta.device)
        assert index.dim() == 1 and index.numel() <= self.rows
        if index.numel() and (int(index.max()) >= self.rows or bool((index[1:] <= index[:-1]).any())):
            raise AssertionError("keep() needs ascending row indices among the active rows")
        n, cols = index.numel(), self.length
        if n == self.rows:
            return
        for buf in (*self.keys, *self.values):
            buf[:n, :, :cols] = buf[index, :, :cols]
        self.meta[:n, :, :cols] = self.meta[index, :, :cols]
        self.rows = n
