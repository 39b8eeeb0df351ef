"""A preallocated block KV cache for the rollout sampler, with a committed length per row.

One job: keep the roped keys/values (and the token metadata) of the tokens each row has
*committed* (its prompt and finished blocks), for every ``BlockAttention`` layer of this rank, and
hand each layer "committed + current" keys on every forward. Non-goals: deciding what to commit
or when (the sampler owns the cache and drives it), attention itself (``models/attention.py``).

Rows decode asynchronously (each row moves to its next block as soon as its own block is done),
so rows have committed different numbers of columns. Layout of row ``r``'s buffer columns:

    [ committed: lengths[r] | holes (PAD keys) up to frontier | current: Sq columns | unused ]

``frontier = max(lengths)``. Every forward writes the current tokens of all rows at the same
columns ``[frontier, frontier + Sq)``, so the queries are the last ``Sq`` keys of every row (the
rule ``masks.allowed`` assumes), and hands out ``[:frontier + Sq]`` as views (no copy). A row's
holes are PAD in the key metadata: nothing attends to them. They hold zeros or stale, finite
keys (never uninitialised memory: a masked NaN value would still poison ``softmax @ V``).

Life cycle, driven by the sampler:

1. The cache is built for the attention layers of this rank, named by their (global) layer numbers.
2. Per forward (one per micro-batch): ``with cache.forward(meta, rows) as view:`` for rows ``rows``
   of the active rows (a contiguous slice: views, no copy; or an index tensor: the committed keys
   are gathered, a copy); ``view`` is passed to the model's forward (``kv_cache=view``), whose
   attention layers call ``view.extend(layer_number, key, value, meta)``: it writes the current
   keys/values and returns the keys. Forwards of one round may differ in width (rows that commit
   forward a commit slot before their block); each active row is in exactly one forward of a round.
3. After every round: ``cache.commit(n)`` keeps the first ``n[r]`` current columns of row ``r``
   (``n`` an int for all rows, or a ``[rows]`` tensor): they move to ``[lengths[r], lengths[r] +
   n[r])`` (nothing moves for rows at the frontier) and ``lengths[r] += n[r]``.
4. ``cache.keep(index)`` drops finished rows (compaction), so they cost nothing afterwards.

No host syncs: on a GPU, reading a device value on the host (``int(t)``, ``bool(t)``,
``t.nonzero()``, a boolean-mask index) waits for every queued kernel, so the launches of the next
forward cannot overlap this one. What the host needs (``rows``, ``frontier``, the largest count of
a commit) are host ints; a caller that knows them passes them (``commit(n, largest=, frontier=)``,
``keep(index, frontier=)``: the sampler derives them from its one read per round), otherwise they
are read from the device (one sync each). Data movement has fixed shapes: a commit copies
``[rows, largest]`` columns, the entries that do not move being copied onto themselves, instead of
selecting the moving ones with ``nonzero``. Checks of device values run only where the values are
read anyway, or when ``BlockKVCache.verify`` is set (tests, debugging).

Buffers are ``[B, G/tp, capacity, D]`` per layer so that the views handed out are, per head, one
contiguous ``[Sk, D]`` run (what SDPA reads best); extend returns them as ``[Sk, B, G/tp, D]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.models.masks import PAD


@dataclass
class _Pending:
    """The forward in flight: its query metadata, its rows, and the key metadata all layers share."""

    q_meta: Tensor
    rows: slice | Tensor
    k_meta: Tensor
    width: int


class BlockKVCache:
    """Keys/values of committed tokens for this rank's attention layers, preallocated for ``capacity`` columns.

    Args:
        layer_numbers: the (global) layer numbers of this rank's ``BlockAttention`` layers, all model
            chunks together: what each layer names itself by in ``extend``.
        batch: rows at the start (compaction only shrinks it).
        capacity: columns (longest committed row + widest forward).
        groups: key/value heads on this rank (``num_query_groups / tp``).
        head_dim: per-head width.
        dtype, device: of the keys and values (the model's activations).
    """

    verify: bool = False
    """Also check host-supplied values (``largest``, ``frontier``, index tensors) against the device:
    a host sync each. For tests and debugging; off in the decode loop."""

    def __init__(
        self,
        *,
        layer_numbers: Sequence[int],
        batch: int,
        capacity: int,
        groups: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        num_layers = len(layer_numbers)
        if min(num_layers, batch, capacity, groups, head_dim) < 1:
            raise ValueError(
                f"cache dimensions must be >= 1: layers={num_layers} batch={batch} "
                f"capacity={capacity} groups={groups} head_dim={head_dim}"
            )
        if len(set(layer_numbers)) != num_layers:
            raise ValueError(f"layer numbers must be distinct, got {list(layer_numbers)}")
        self._slot = {number: i for i, number in enumerate(layer_numbers)}
        shape = (batch, groups, capacity, head_dim)
        # Zeros, not empty: holes are read (masked) before anything is written there.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.meta = torch.full((batch, 2, capacity), PAD, dtype=torch.long, device=device)  # [B, 2, C]
        self.capacity = capacity
        self.rows = batch
        """Rows still decoding (the first ``rows`` of every buffer)."""
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        """Committed columns of each active row (the first ``rows`` entries count)."""
        self.frontier = 0
        """``max(lengths)``: where the current tokens of every row are written."""
        self._aligned = True
        """Every active row has committed ``frontier`` columns (so far only equal counts): no row is
        behind, a commit moves nothing (a host flag: the autoregressive decode never moves)."""
        self._pending: Optional[_Pending] = None
        # Per layer, rows written at the current round's columns (checked by commit).
        self._rows_written = [0] * num_layers
        self._round_width: Optional[int] = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    # --- one forward -------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self, meta: Tensor, rows: slice | Tensor | None = None) -> Iterator["BlockKVCache"]:
        """Scope of one model forward over rows ``rows`` with current-token metadata ``meta [b, 2, Sq]``;
        yields what the model's forward takes as ``kv_cache`` (the cache, its forward opened).

        ``rows``: a contiguous slice of the active rows (default all), or an ascending index tensor.
        """
        rows = slice(0, self.rows) if rows is None else rows
        if isinstance(rows, slice):
            assert rows.step in (None, 1) and (rows.stop is None or rows.stop <= self.rows), (
                f"rows {rows} must be a contiguous slice of the {self.rows} active rows"
            )
            n_rows = len(range(*rows.indices(self.rows)))
        else:
            assert rows.dim() == 1, "bad row index"
            if self.verify:
                assert rows.numel() == 0 or int(rows.max()) < self.rows, "row index beyond the active rows"
            n_rows = rows.numel()
        width = meta.shape[-1]
        assert self._pending is None, "a cache forward is already open"
        assert meta.shape[0] == n_rows, f"meta has {meta.shape[0]} rows, the selection {n_rows}"
        assert self.frontier + width <= self.capacity, (
            f"cache overflow: frontier {self.frontier} + {width} current > capacity {self.capacity}"
        )
        end = self.frontier + width
        self.meta[rows, :, self.frontier:end] = meta
        self._pending = _Pending(q_meta=meta, rows=rows, k_meta=self.meta[rows, :, :end], width=width)
        self._round_width = max(self._round_width or 0, width)
        try:
            yield self
        finally:
            self._pending = None

    def extend(
        self, layer_number: int, key: Tensor, value: Tensor, meta: Tensor, contiguous: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Write layer ``layer_number``'s current keys/values ``[Sq, b, G, D]``; return keys, values
        ``[:frontier + Sq]`` and their metadata. ``contiguous``: copies instead of views (megatron's
        DotProductAttention reshapes with ``.view``)."""
        pending = self._pending
        assert pending is not None, "BlockAttention ran with a KV cache outside cache.forward()"
        assert layer_number in self._slot, f"layer {layer_number} has no slot in this cache ({sorted(self._slot)})"
        layer = self._slot[layer_number]
        assert meta is pending.q_meta, "attention metadata differs from the one the cache was opened with"
        assert key.shape[0] == pending.width, f"{key.shape[0]} current keys, forward opened for {pending.width}"
        start, end = self.frontier, self.frontier + pending.width
        k_buf, v_buf = self.keys[layer], self.values[layer]
        assert key.shape[1:] == (meta.shape[0], k_buf.shape[1], k_buf.shape[3]), (
            f"key {tuple(key.shape)} does not fit the cache [Sq, {meta.shape[0]}, {k_buf.shape[1]}, {k_buf.shape[3]}]"
        )
        k_buf[pending.rows, :, start:end] = key.permute(1, 2, 0, 3)  # [b, G, Sq, D]
        v_buf[pending.rows, :, start:end] = value.permute(1, 2, 0, 3)
        self._rows_written[layer] += meta.shape[0]
        key_all = k_buf[pending.rows, :, :end].permute(2, 0, 1, 3)  # [Sk, b, G, D]
        value_all = v_buf[pending.rows, :, :end].permute(2, 0, 1, 3)
        if contiguous:
            key_all, value_all = key_all.contiguous(), value_all.contiguous()
        return key_all, value_all, pending.k_meta

    # --- between rounds ----------------------------------------------------------------------
    def commit(self, n: int | Tensor, *, largest: Optional[int] = None, frontier: Optional[int] = None) -> None:
        """End a round: row ``r`` keeps its first ``n[r]`` current columns; the rest will be overwritten.

        ``n``: one count for every active row, or a ``[rows]`` integer tensor. Every active row must
        have been forwarded this round (by every layer) when anything is committed. With a tensor,
        ``largest`` (``max(n)``) and ``frontier`` (``max(lengths + n)``, the committed lengths
        afterwards) are host values the caller knows: without them they are read from the device
        (a host sync each, and the counts are checked).
        """
        width = self._round_width or 0
        assert self._pending is None, "commit inside an open forward"
        counts = torch.as_tensor(n, dtype=torch.long, device=self.lengths.device).expand(self.rows)  # [N]
        if isinstance(n, int):
            largest = n if self.rows else 0
            frontier = self.frontier + n if self.rows else 0  # every row grows by n, the longest too
        else:
            if largest is None or self.verify:
                assert not self.rows or int(counts.min()) >= 0, f"cannot commit {n} columns"
            largest = self._host_value(largest, lambda: int(counts.max()) if self.rows else 0, "largest")
        assert 0 <= largest <= width, f"cannot commit {largest} columns of a round {width} wide"
        self._round_width = None
        if largest:
            missing = [i for i, r in enumerate(self._rows_written) if r != self.rows]
            assert not missing, f"layers {missing} did not write all {self.rows} rows this round"
        self._rows_written = [0] * self.num_layers
        if largest == 0:
            return
        lengths = self.lengths[: self.rows]  # [N] (a view: updated in place below)
        start = self.frontier
        if not self._aligned:
            self._move_behind(lengths, counts, largest)
        self._aligned = self._aligned and isinstance(n, int)
        lengths += counts
        # Every current column at or past a row's new length is a hole (rows behind) or scratch (rows
        # at the frontier): PAD, so that nothing attends to it.
        cols = start + torch.arange(width, device=counts.device)  # [width]
        self.meta[: self.rows, 1, start:start + width].masked_fill_(cols[None, :] >= lengths[:, None], PAD)
        self.frontier = self._host_value(frontier, lambda: int(lengths.max()), "frontier")

    def _host_value(self, given: Optional[int], read: Callable[[], int], name: str) -> int:
        """``given`` (a host value the caller knows: no sync), else ``read()`` from the device; under
        ``verify`` both, and they must agree."""
        if given is not None and not self.verify:
            return given
        actual = read()
        assert given in (None, actual), f"{name}={given} given, the device holds {actual}"
        return actual

    def _move_behind(self, lengths: Tensor, counts: Tensor, largest: int) -> None:
        """Rows behind the frontier move their first ``counts[r]`` current columns down to
        ``lengths[r]`` (keys, values and metadata); rows at the frontier keep them in place.

        Fixed shapes, no host sync: every entry of the ``[N, largest]`` grid is copied, the ones
        that do not move onto themselves (``nonzero`` would pick the moving ones at the price of a
        sync). The targets are distinct: a row's moved columns end below ``frontier + counts[r]``,
        where its unmoved ones begin.
        """
        start, dev = self.frontier, counts.device
        offsets = torch.arange(largest, device=dev)  # [hi]
        src = (start + offsets).expand(self.rows, -1)  # [N, hi]
        move = (lengths < start)[:, None] & (offsets[None, :] < counts[:, None])  # [N, hi]
        dst = torch.where(move, lengths[:, None] + offsets, src)  # [N, hi]
        r_idx = torch.arange(self.rows, device=dev)[:, None].expand_as(src)  # [N, hi]
        for buf in (*self.keys, *self.values):
            buf[r_idx, :, dst] = buf[r_idx, :, src]  # [N, hi, G, D]; the source is read before writing
        self.meta[r_idx, :, dst] = self.meta[r_idx, :, src]  # [N, hi, 2]

    def keep(self, index: Tensor, frontier: Optional[int] = None) -> None:
        """Keep rows ``index`` (ascending, 1-D) of the active rows, compacted to the front.

        ``frontier``: the longest committed length among the kept rows, when the caller knows it on
        the host; without it, it is read from the device (a host sync) and ``index`` is checked.
        """
        assert self._pending is None and self._round_width is None, "compaction in the middle of a round"
        index = index.to(self.meta.device)
        assert index.dim() == 1 and index.numel() <= self.rows
        if frontier is None or self.verify:
            if index.numel() and (int(index.max()) >= self.rows or bool((index[1:] <= index[:-1]).any())):
                raise AssertionError("keep() needs ascending row indices among the active rows")
        n, cols = index.numel(), self.frontier
        if n == self.rows:
            return
        for buf in (*self.keys, *self.values):
            buf[:n, :, :cols] = buf[index, :, :cols]
        self.meta[:n, :, :cols] = self.meta[index, :, :cols]
        self.lengths[:n] = self.lengths[index]
        self.rows = n
        self.frontier = self._host_value(frontier, lambda: int(self.lengths[:n].max()) if n else 0, "frontier")
