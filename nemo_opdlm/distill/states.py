"""Training states: a decoded response -> the student's ``[prompt | x0 | xt]`` micro-batch.

One job: choose which response tokens are masked in xt (one noisy state per block) and assemble
the row, its position ids, its mask metadata and the loss mask. Non-goals: decoding (the
sampler), teacher targets (``targets.py``), the loss itself (``loss.py``).

Two ways to choose the state of a block (``masking``):

- ``on_policy`` (OPDLM): sample one round r uniformly among the rounds the block actually used
  (the distinct ``step_map`` values of its valid tokens; dynamic decoding may finish a block in
  fewer rounds than scheduled) and mask every token decoded at round >= r. The block is then exactly
  in the state the sampler saw before round r, and at least the tokens of the last round stay
  masked. The smallest used round gives a fully masked block.
- ``random`` (the "own rollouts + random mask" ablation, and off-policy KD / SFT on given
  responses, whose valid positions ``response_valid`` finds): per block a ratio t ~ U(0, 1); each
  valid token is masked with probability t; a block whose draw masked nothing gets one uniformly
  chosen valid token masked.

Every random draw comes from the ``torch.Generator`` passed in (never the global RNG, which dropout
shares on CPU).

The loss mask keeps masked xt positions that are valid, not after the first end-of-sequence token
and (``exclude_eos``, the reference's choice) not that token itself.

Rows come in the frame of their block grid (``models/grid.py``): on the absolute grid a response
starts with its prompt's last ``P mod b`` tokens, ``given``: valid (they are real tokens, clean in
x0 and present in xt), but never masked, never in the loss and never an end of sequence.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.models import masks

Masking = Literal["on_policy", "random"]
MASKINGS: tuple[str, ...] = ("on_policy", "random")


def _blocks(x: Tensor, block_size: int, fill) -> Tensor:
    """``[B, L]`` -> ``[B, nb, block_size]``, the last block padded with ``fill``."""
    batch, length = x.shape
    num_blocks = -(-length // block_size)
    pad = num_blocks * block_size - length
    if pad:
        x = torch.cat([x, x.new_full((batch, pad), fill)], dim=1)
    return x.view(batch, num_blocks, block_size)


def _unblock(x: Tensor, length: int) -> Tensor:
    """``[B, nb, block_size]`` -> ``[B, L]``."""
    return x.reshape(x.shape[0], -1)[:, :length]


def _check_response(name: str, x: Tensor, valid: Tensor) -> None:
    if x.shape != valid.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, valid has {tuple(valid.shape)}")


def on_policy_mask(step_map: Tensor, valid: Tensor, block_size: int, steps_per_block: int,
                   generator: torch.Generator) -> Tensor:
    """Mask ``[B, L]`` bool: per block, tokens decoded at round >= r, r uniform over the used rounds.

    Args:
        step_map: ``[B, L]`` int, the round (0-based, within its block) each token was decoded at.
        valid: ``[B, L]`` bool, False for padding (ignored: never masked, never counted as used).
        block_size: tokens per block.
        steps_per_block: rounds scheduled per block; every valid ``step_map`` must be below it.
        generator: the source of randomness (one uniform draw per block).
    """
    _check_response("step_map", step_map, valid)
    valid = valid.bool()
    if bool(valid.any()):
        used_steps = step_map[valid]
        lo, hi = int(used_steps.min()), int(used_steps.max())
        if lo < 0 or hi >= steps_per_block:
            raise ValueError(f"step_map values must lie in [0, steps_per_block={steps_per_block}) "
                             f"at valid positions, got [{lo}, {hi}]")
    steps = _blocks(step_map.long(), block_size, 0)  # [B, nb, bs]
    ok = _blocks(valid, block_size, False)  # [B, nb, bs]
    rounds = torch.arange(steps_per_block, device=steps.device)
    used = ((steps[..., None] == rounds) & ok[..., None]).any(dim=2)  # [B, nb, R]
    num_used = used.sum(-1)  # [B, nb]
    u = torch.rand(num_used.shape, generator=generator, device=generator.device).to(steps.device)
    pick = (u * num_used).long().clamp(max=(num_used - 1).clamp(min=0))  # [B, nb] index among used
    # the round whose rank among the used rounds is `pick`
    is_pick = used & (used.long().cumsum(-1) - 1 == pick[..., None])  # [B, nb, R]
    r = torch.where(is_pick, rounds, steps_per_block).amin(-1)  # [B, nb]; R where no round used
    masked = ok & (steps >= r[..., None])  # [B, nb, bs]
    return _unblock(masked, valid.shape[1])


def random_mask(valid: Tensor, block_size: int, generator: torch.Generator) -> Tensor:
    """Mask ``[B, L]`` bool: per block ratio t ~ U(0,1), Bernoulli(t) per valid token, >= 1 per block."""
    valid = valid.bool()
    ok = _blocks(valid, block_size, False)  # [B, nb, bs]
    dev = generator.device
    t = torch.rand(ok.shape[:2], generator=generator, device=dev).to(ok.device)  # [B, nb]
    draw = torch.rand(ok.shape, generator=generator, device=dev).to(ok.device)  # [B, nb, bs]
    masked = ok & (draw < t[..., None])
    # blocks with valid tokens but nothing masked: mask one valid token, uniformly chosen
    empty = ok.any(-1) & ~masked.any(-1)  # [B, nb]
    keys = torch.rand(ok.shape, generator=generator, device=dev).to(ok.device)
    choice = torch.where(ok, keys, -1.0).argmax(-1)  # [B, nb]
    forced = torch.nn.functional.one_hot(choice, ok.shape[-1]).bool() & empty[..., None]
    return _unblock(masked | forced, valid.shape[1])


def first_eos_mask(response: Tensor, valid: Tensor, eos_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(before, is_first_eos)``, both ``[B, L]`` bool.

    ``before``: valid positions up to and including the first EOS (all valid positions when a row
    has none); ``is_first_eos``: the first EOS position of each row.
    """
    eos = torch.as_tensor(list(eos_ids), dtype=response.dtype, device=response.device)
    is_eos = torch.isin(response, eos) & valid  # [B, L]
    seen = is_eos.long().cumsum(1)  # [B, L]
    is_first = is_eos & (seen == 1)
    before = valid & ((seen == 0) | is_first)
    return before, is_first


def loss_positions(response: Tensor, valid: Tensor, masked: Tensor, eos_ids: Sequence[int],
                   exclude_eos: bool = True) -> Tensor:
    """``[B, L]`` bool: masked in xt, valid, not after the first EOS (nor on it if ``exclude_eos``)."""
    before, is_first = first_eos_mask(response, valid.bool(), eos_ids)
    keep = masked & before
    if exclude_eos:
        keep = keep & ~is_first
    return keep


def assemble(prompt_ids: Tensor, prompt_lens: Tensor, response: Tensor, valid: Tensor, masked: Tensor,
             *, block_size: int, mask_token_id: int, eos_ids: Sequence[int],
             exclude_eos: bool = True, given: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The training micro-batch for rows ``[left-padded prompt | x0 | xt]``.

    Args:
        prompt_ids: ``[B, P]`` left-padded prompt tokens.
        prompt_lens: ``[B]`` true prompt lengths.
        response: ``[B, L]`` decoded (or given) response tokens x0.
        valid: ``[B, L]`` bool, False for response padding.
        masked: ``[B, L]`` bool, positions replaced by ``mask_token_id`` in xt (only valid ones are).
        given: ``[B, L]`` bool, the framed heads (see the module docstring); None: none.

    Returns a dict of tensors: ``input_ids [B, P+2L]``, ``position_ids [B, P+2L]``,
    ``meta [B, 2, P+2L]`` (see ``models/masks.py``), ``loss_mask [B, L]`` (positions that count in
    the loss; xt is the LAST L columns of the row), ``x0 [B, L]`` (targets for cross-entropy) and
    ``xt_masked [B, L]`` (all masked xt positions, for metrics).
    """
    valid = valid.bool()
    _check_response("response", response, valid)
    _check_response("masked", masked, valid)
    if prompt_ids.shape[0] != response.shape[0]:
        raise ValueError(f"prompt batch {prompt_ids.shape[0]} != response batch {response.shape[0]}")
    learned = valid if given is None else valid & ~given.bool()  # [B, L] the response's own tokens
    masked = masked.bool() & learned
    layout = masks.build_layout(prompt_lens, prompt_ids.shape[1], valid, block_size, with_xt=True)
    xt = torch.where(masked, torch.full_like(response, mask_token_id), response)  # [B, L]
    return dict(
        input_ids=torch.cat([prompt_ids, response, xt], dim=1),  # [B, P + 2L]
        position_ids=layout.position_ids,  # [B, P + 2L]
        meta=layout.meta,  # [B, 2, P + 2L]
        loss_mask=loss_positions(response, learned, masked, eos_ids, exclude_eos),  # [B, L]
        x0=response,  # [B, L]
        xt_masked=masked,  # [B, L]
    )


def response_valid(response: Tensor, lengths: Tensor | None = None, eos_ids: Sequence[int] | None = None) -> Tensor:
    """``[B, L]`` bool for a given (dataset or teacher) response: positions below ``lengths[b]`` (all
    when None) and up to the first EOS.

    Tokens after the first EOS of a given response are padding: unlike a rollout's EOS block, no
    sampler decoded them.
    """
    batch, length = response.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=response.device)
    if lengths is not None:
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
        valid &= torch.arange(length, device=response.device)[None, :] < lengths.to(response.device)[:, None]
    if eos_ids:
        valid, _ = first_eos_mask(response, valid, eos_ids)
    return valid


def build_states(prompt_ids: Tensor, prompt_lens: Tensor, response: Tensor, step_map: Tensor | None,
                 valid: Tensor, *, block_size: int, steps_per_block: int, mask_token_id: int,
                 eos_ids: Sequence[int], generator: torch.Generator, masking: Masking = "on_policy",
                 exclude_eos: bool = True, given: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Sample one state per block and assemble the student's micro-batch (see :func:`assemble`).

    ``step_map`` (``[B, L]``, round of each token within its block) is needed for ``on_policy``
    and ignored by ``random``; ``given`` (``[B, L]``) marks the framed heads, never masked.
    """
    learned = valid.bool() if given is None else valid.bool() & ~given.bool()  # [B, L]
    if masking == "on_policy":
        if step_map is None:
            raise ValueError("masking='on_policy' needs the rollout's step_map")
        masked = on_policy_mask(step_map, learned, block_size, steps_per_block, generator)
    elif masking == "random":
        masked = random_mask(learned, block_size, generator)
    else:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    return assemble(prompt_ids, prompt_lens, response, valid, masked, block_size=block_size,
                    mask_token_id=mask_token_id, eos_ids=eos_ids, exclude_eos=exclude_eos, given=given)


def split_microbatches(batch: dict[str, Tensor], num_microbatches: int) -> list[dict[str, Tensor]]:
    """Split every tensor of a batch dict along dim 0 into ``num_microbatches`` equal parts."""
    size = next(iter(batch.values())).shape[0]
    if num_microbatches < 1 or size % num_microbatches:
        raise ValueError(f"batch of {size} rows does not split into {num_microbatches} micro-batches")
    chunks = {k: v.chunk(num_microbatches, dim=0) for k, v in batch.items()}
    return [{k: v[i] for k, v in chunks.items()} for i in range(num_microbatches)]
