"""Pick a token and its confidence at each position, from logits split across the TP group.

One job: turn this rank's vocabulary shard of logits ``[..., V/tp]`` into a candidate token (global
id) and its confidence per position, identically on every rank of the TP group and without
gathering the full vocabulary anywhere. Non-goals: which candidates are kept (``schedules.py``).

- Non-finite logits (bf16 overflow) are replaced before any softmax: NaN and -inf by the dtype's
  minimum, +inf by its maximum, so nothing downstream becomes NaN.
- Confidence is the probability of the chosen token under the softmax of the **raw** logits,
  before temperature, top-k and top-p (with filtered probabilities a greedy pick always has
  confidence 1).
- Greedy (temperature 0): the global argmax (ties: lowest id).
- Sampling: temperature, then top-k (global k-th value), then top-p (exact nucleus: the threshold is
  found by bisection on the float's bit pattern with one small all-reduce per step), then
  inverse-CDF sampling: one uniform per position, the same on every TP rank (the caller draws it
  from its own seeded generator); each rank knows the probability mass of every shard, so all
  agree which shard owns the sample, and the owner finds it in its local cumulative sum.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
from torch import Tensor

from nemo_opdlm.runtime import vocab_parallel
from nemo_opdlm.runtime.vocab_parallel import Group

_TOPP_BISECTION_STEPS = 31  # 2**31 > bit pattern of 1.0f: the bisection is exact
_ONE_BITS = struct.unpack("<i", struct.pack("<f", 1.0))[0]  # int32 bit pattern of 1.0f (a host int)


def sanitize(logits: Tensor) -> Tensor:
    """fp32 copy of ``logits`` with NaN/-inf -> float32 min and +inf -> float32 max."""
    finfo = torch.finfo(torch.float32)
    return torch.nan_to_num(logits.float(), nan=finfo.min, posinf=finfo.max, neginf=finfo.min)


def suppress_token(values: Tensor, token_id: int, group: Group, fill: Optional[float] = None) -> Tensor:
    """``values`` (a vocabulary shard) with one global id set to ``fill`` (default: the dtype's
    minimum) on the rank that owns it; a copy when changed."""
    local = values.shape[-1]
    local_id = token_id - vocab_parallel.shard_offset(local, group)
    if 0 <= local_id < local:
        values = values.clone()
        values[..., local_id] = torch.finfo(values.dtype).min if fill is None else fill
    return values


def log_normaliser(logits: Tensor, shift: Tensor, group: Group) -> Tensor:
    """``log sum_v exp(logits_v)`` over the full vocabulary, computed as ``shift + log sum exp(l - shift)``.

    ``shift [...]`` should be near the global maximum (any value works numerically up to overflow,
    which gives a normaliser of +inf and a confidence of 0, never NaN).
    """
    local = (logits - shift[..., None]).exp().sum(dim=-1)  # [...]
    return shift + vocab_parallel.reduce_sum(local, group).log()


def topp_threshold(probs: Tensor, top_p: float, group: Group) -> Tensor:
    """Smallest probability ``tau [...]`` kept by nucleus sampling with mass ``top_p``.

    Keeping ``{v : p_v >= tau}`` is the standard rule "keep v if the mass of strictly more probable
    tokens is < top_p" (ties at the threshold are all kept). ``tau`` is the largest float with
    ``S(tau) = sum_{p_v >= tau} p_v >= top_p``; it is found by bisection over the (monotone)
    int32 bit pattern of non-negative floats, so it is exact after 31 steps.
    """
    ascending, _ = probs.sort(dim=-1)  # [..., V/tp]
    suffix = ascending.flip(-1).cumsum(-1).flip(-1)  # [..., V/tp] mass of entries >= each
    suffix = torch.cat([suffix, suffix.new_zeros(*suffix.shape[:-1], 1)], dim=-1)  # [..., V/tp + 1]
    flat_sorted = ascending.reshape(-1, ascending.shape[-1])  # [M, V/tp]
    flat_suffix = suffix.reshape(-1, suffix.shape[-1])  # [M, V/tp + 1]
    lo = torch.zeros(flat_sorted.shape[0], dtype=torch.int32, device=probs.device)  # S(0) = 1
    hi = torch.full_like(lo, _ONE_BITS + 1)  # S(>1) = 0
    for _ in range(_TOPP_BISECTION_STEPS):
        mid = lo + (hi - lo) // 2  # [M]
        tau = mid.view(torch.float32)  # [M]
        idx = torch.searchsorted(flat_sorted, tau[:, None], right=False)  # [M, 1] first entry >= tau
        mass = vocab_parallel.reduce_sum(flat_suffix.gather(-1, idx)[:, 0], group)  # [M]
        ok = mass >= top_p
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo.view(torch.float32).reshape(probs.shape[:-1])


def inverse_cdf(probs: Tensor, uniform: Tensor, group: Group) -> Tensor:
    """Global ids ``[...]`` drawn from unnormalised shard probabilities ``[..., V/tp]``.

    ``uniform [...]`` in [0, 1) must be identical on every TP rank.
    """
    local = probs.shape[-1]
    mass = probs.sum(dim=-1, keepdim=True)  # [..., 1]
    masses = vocab_parallel.all_gather_last(mass, group)  # [..., tp] identical on every rank
    inclusive = masses.cumsum(-1)  # [..., tp]
    target = uniform * inclusive[..., -1]  # [...]
    tp = masses.shape[-1]
    # Owner: first shard whose inclusive mass exceeds the target; rounding past the total falls
    # back to the last shard that has any mass.
    beyond = (inclusive <= target[..., None]).sum(-1)  # [...]
    shard_ids = torch.arange(tp, device=probs.device)
    last_nonzero = torch.where(masses > 0, shard_ids, -1).amax(-1)  # [...]
    owner = torch.minimum(beyond, last_nonzero.clamp(min=0))  # [...]
    before = (inclusive - masses).gather(-1, owner[..., None])[..., 0]  # [...]
    cdf = probs.cumsum(-1)  # [..., V/tp]
    idx = torch.searchsorted(cdf.contiguous(), (target - before)[..., None].contiguous(), right=True)[..., 0]
    positions = torch.arange(local, device=probs.device)
    last_positive = torch.where(probs > 0, positions, 0).amax(-1)  # [...]
    idx = torch.minimum(idx, last_positive)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    ids = torch.where(owner == rank, idx + vocab_parallel.shard_offset(local, group), -1)
    return vocab_parallel.all_reduce_max(ids, group)


def choose_tokens(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform: Optional[Tensor] = None,
    suppress_id: Optional[int] = None,
    group: Group,
) -> tuple[Tensor, Tensor]:
    """Candidate global ids and their raw-softmax confidences, both ``[...]``.

    Args:
        logits: ``[..., V/tp]`` this rank's shard (any float dtype; vocab padding at dtype min).
        temperature: 0 = greedy.
        top_k: keep the k largest (0 = off).
        top_p: nucleus mass (1.0 = off).
        uniform: ``[...]`` uniforms in [0, 1), identical on all TP ranks (needed when sampling).
        suppress_id: a global id never chosen (the [MASK] token); its raw mass still counts in
            the confidence's normaliser.
        group: the tensor-parallel group the vocabulary is split over (None: not split).
    """
    raw = sanitize(logits)  # [..., V/tp]
    pickable = raw if suppress_id is None else suppress_token(raw, suppress_id, group)
    if temperature == 0:
        best, ids = vocab_parallel.argmax(pickable, group)  # [...], [...]
        # The picked logit is the maximum of `pickable`; used as the shift, it cannot overflow
        # unless the suppressed token dominates by > 88 nats (confidence 0 then, as it should be).
        conf = (best - log_normaliser(raw, best, group)).exp()
        return ids, conf
    if uniform is None:
        raise ValueError("sampling with temperature > 0 needs the uniforms (same on all TP ranks)")
    # exp(raw - max pickable): the raw softmax's numerators, shared by the confidence and (at
    # temperature 1 without top-k, the rollout setting) by the sampling distribution itself.
    shift = vocab_parallel.all_reduce_max(pickable.amax(dim=-1), group)  # [...]
    numer = (raw - shift[..., None]).exp()  # [..., V/tp]; +inf only if the suppressed id dominates
    if temperature == 1.0 and top_k == 0:
        probs = numer if suppress_id is None else suppress_token(numer, suppress_id, group, fill=0.0)
        if top_p < 1.0:
            probs = probs / vocab_parallel.reduce_sum(probs.sum(dim=-1, keepdim=True), group)
    else:
        # Clamped: dividing the float32 extremes by a temperature < 1 gives +-inf (NaN downstream).
        finfo = torch.finfo(torch.float32)
        scaled = (pickable / temperature).clamp(min=finfo.min, max=finfo.max)  # [..., V/tp]
        if top_k > 0:
            kth = vocab_parallel.topk(scaled, top_k, group)[0][..., -1:]  # [..., 1]
            scaled = scaled.masked_fill(scaled < kth, finfo.min)
        probs = vocab_parallel.log_softmax(scaled, group).exp()  # [..., V/tp]
    if top_p < 1.0:
        tau = topp_threshold(probs, top_p, group)  # [...]
        probs = probs.masked_fill(probs < tau[..., None], 0.0)
    ids = inverse_cdf(probs, uniform, group)  # [...]
    z = vocab_parallel.reduce_sum(numer.sum(dim=-1), group)  # [...] (inf -> confidence 0, never NaN)
    picked = vocab_parallel.gather_global(numer, ids[..., None], group)[..., 0]  # [...]
    return ids, picked / z
