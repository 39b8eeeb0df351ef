"""States for the ablations whose responses do not come from the student's own rollouts.

One job: turn given responses (teacher-generated for off-policy KD, dataset answers for SFT) into
the same micro-batch as ``states.build_states``, with random per-block masking (a given response
has no ``step_map``). The "own rollouts + random mask" ablation needs nothing here: it is
``build_states(..., masking="random")`` on a rollout. Non-goals: generating the responses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.distill.states import assemble, first_eos_mask, random_mask


def response_valid(response: Tensor, lengths: Optional[Tensor] = None,
                   eos_ids: Optional[Sequence[int]] = None) -> Tensor:
    """``[B, L]`` bool: positions below ``lengths[b]`` (all when None) and up to the first EOS.

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


def off_policy_states(prompt_ids: Tensor, prompt_lens: Tensor, response: Tensor,
                      response_lens: Optional[Tensor], *, block_size: int, mask_token_id: int,
                      eos_ids: Sequence[int], generator: torch.Generator,
                      exclude_eos: bool = True) -> dict[str, Tensor]:
    """Random-mask states on given (teacher or dataset) responses, right-padded ``[B, L]``.

    The same micro-batch as ``states.build_states``; use it with the KL loss (off-policy KD, teacher
    targets on these responses) or the cross-entropy loss (SFT with the block-diffusion loss).
    """
    valid = response_valid(response, response_lens, eos_ids)  # [B, L]
    masked = random_mask(valid, block_size, generator)  # [B, L]
    return assemble(prompt_ids, prompt_lens, response, valid, masked, block_size=block_size,
                    mask_token_id=mask_token_id, eos_ids=eos_ids, exclude_eos=exclude_eos)
