"""Block-diffusion attention masks, built from named per-token parts.

One job: describe who may attend to whom in the student's and the teacher's inputs. Non-goals:
running attention (``attention.py``) and choosing which tokens are masked (``distill/states.py``).

Every token carries two integers, stacked as ``meta[:, 0]`` and ``meta[:, 1]``:

- ``block``: its block index. Response blocks count 0, 1, 2, ... from the first response token;
  prompt blocks count -1, -2, ... backwards from the prompt's end, i.e. prompt blocks are aligned
  to the prompt's end exactly as the rollout prefills a (left-padded) prompt.
- ``kind``: ``PAD`` (a padding token: never a key), ``CLEAN`` (prompt or x0) or ``NOISY`` (xt).

The rule, for a query ``q`` and a key ``k`` of the same row:

- ``k`` or ``q`` is padding: never, except a token always sees itself (so no softmax row is empty);
- ``k`` is clean: allowed if ``block(k) < block(q)``, or ``block(k) == block(q)`` and ``q`` is clean;
- ``k`` is noisy: allowed only if ``q`` is noisy and in the same block.

So clean tokens are block-causal (bidirectional in a block, causal across blocks), xt block b sees
the prompt, x0 blocks < b and itself, and with block size 1 and no xt the mask is exactly causal
(the AR teacher). A block size >= the sequence length makes a prompt-free row fully bidirectional.

An optional third integer, ``doc`` (``meta[:, 2]``), lets several rows share one sequence (packed
rows, ``distill/packing.py``): a query then also needs a key of its own doc. Two-channel metadata is
one doc per row (the KV cache and the rollouts keep two channels).

``meta`` is an integer tensor so that it can travel through megatron-core as the
``attention_mask`` argument (activation recompute saves it with ``save_for_backward``); the core
attention turns it into a dense mask or a FlexAttention ``BlockMask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = 0
CLEAN = 1
NOISY = 2


@dataclass(frozen=True)
class RowLayout:
    """Model inputs for one batch: token layout, position ids and mask metadata.

    Attributes:
        meta: ``[B, 2, S]`` int64, rows (block, kind) as described in the module docstring.
        position_ids: ``[B, S]`` int64 RoPE positions; xt reuses x0's positions.
        prompt_width: columns occupied by the (left-padded) prompt.
        response_len: response length L1 (x0 and xt each occupy L1 columns).
        has_xt: whether the row ends with an xt copy of the response.
    """

    meta: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    response_len: int
    has_xt: bool

    @property
    def x0_slice(self) -> slice:
        return slice(self.prompt_width, self.prompt_width + self.response_len)

    @property
    def xt_slice(self) -> slice:
        if not self.has_xt:
            raise ValueError("this layout has no xt segment")
        start = self.prompt_width + self.response_len
        return slice(start, start + self.response_len)


def prompt_blocks(prompt_lens: torch.Tensor, prompt_width: int, block_size: int) -> torch.Tensor:
    """Block ids ``[B, prompt_width]`` of left-padded prompts, blocks aligned to the prompt's end."""
    cols = torch.arange(prompt_width, device=prompt_lens.device)
    dist_from_end = prompt_width - cols  # 1 for the last prompt column
    return (-((dist_from_end + block_size - 1) // block_size)).expand(prompt_lens.shape[0], -1)


def build_layout(
    prompt_lens: torch.Tensor,
    prompt_width: int,
    response_valid: torch.Tensor,
    block_size: int,
    with_xt: bool,
) -> RowLayout:
    """The layout of rows ``[left-padded prompt | x0 | xt?]``.

    Args:
        prompt_lens: ``[B]`` true prompt lengths (<= prompt_width); prompts are left-padded.
        prompt_width: prompt columns in the batch.
        response_valid: ``[B, L]`` bool, False for response padding (after EOS, beyond the length).
        block_size: tokens per block (>= 1).
        with_xt: append the xt copy of the response (student training rows).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    batch, response_len = response_valid.shape
    if prompt_lens.shape != (batch,):
        raise ValueError(f"prompt_lens must have shape [{batch}], got {tuple(prompt_lens.shape)}")
    if prompt_lens.numel() and int(prompt_lens.max()) > prompt_width:
        raise ValueError(f"a prompt is longer than prompt_width={prompt_width}")
    device = response_valid.device
    prompt_lens = prompt_lens.to(device)
    cols = torch.arange(prompt_width, device=device)
    prompt_real = cols[None, :] >= (prompt_width - prompt_lens)[:, None]  # [B, P]
    p_block = prompt_blocks(prompt_lens, prompt_width, block_size)  # [B, P]
    p_kind = torch.where(prompt_real, CLEAN, PAD)
    p_pos = (cols[None, :] - (prompt_width - prompt_lens)[:, None]).clamp(min=0)  # [B, P]

    r_idx = torch.arange(response_len, device=device)
    r_block = (r_idx // block_size).expand(batch, -1)  # [B, L]
    r_pos = prompt_lens[:, None] + r_idx[None, :]  # [B, L]
    x0_kind = torch.where(response_valid, CLEAN, PAD)

    blocks = [p_block, r_block]
    kinds = [p_kind, x0_kind]
    positions = [p_pos, r_pos]
    if with_xt:
        blocks.append(r_block)
        kinds.append(torch.where(response_valid, NOISY, PAD))
        positions.append(r_pos)
    meta = torch.stack([torch.cat(blocks, 1), torch.cat(kinds, 1)], dim=1).long()  # [B, 2, S]
    return RowLayout(
        meta=meta,
        position_ids=torch.cat(positions, 1).long(),
        prompt_width=prompt_width,
        response_len=response_len,
        has_xt=with_xt,
    )


def prediction_columns(prompt_width: int, response_len: int, block_size: int, shift: bool,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Columns ``[L]`` of a ``[prompt | x0 | xt]`` row whose outputs predict response tokens 0..L-1.

    Unshifted (the paper): xt column ``P + L + i``, the token's own position. Shifted
    (``DiffusionConfig.shift_logits``): the previous token of the same xt block, ``P + L + i - 1``;
    a block's first token has no previous token in its block, so it is predicted from the last
    clean token before the block: x0 column ``P + i - 1``, which for ``i = 0`` is the prompt's last
    column. That clean column sees exactly the context an AR model would (the prompt and x0 up to
    ``i - 1``), which is why a shifted student starts near its teacher.
    """
    i = torch.arange(response_len, device=device)
    if not shift:
        return prompt_width + response_len + i
    if prompt_width < 1:
        raise ValueError("shifted predictions need a prompt: the first response token is predicted "
                         "from the last prompt token")
    return torch.where(i % block_size != 0, prompt_width + response_len + i - 1, prompt_width + i - 1)


def allowed(q_meta: torch.Tensor, k_meta: torch.Tensor) -> torch.Tensor:
    """Dense attention permission ``[B, Sq, Sk]`` (True = may attend); ``meta`` ``[B, 2 or 3, S]``.

    The queries are the last ``Sq`` of the ``Sk`` keys (a KV cache holds the first ``Sk - Sq``).
    Each clause of the rule is folded into per-token integers first, so that the ``[B, Sq, Sk]``
    work is one comparison per clause (five times faster on CPU than composing boolean matrices):
    a clean key is allowed iff ``block(k) < block(q) + [q is clean]``, with non-clean keys pushed
    to +inf and padding queries to -inf; a noisy key iff its block equals a noisy query's block,
    with the other tokens on distinct sentinels.
    """
    q_block, q_kind = q_meta[:, 0], q_meta[:, 1]  # [B, Sq]
    k_block, k_kind = k_meta[:, 0], k_meta[:, 1]  # [B, Sk]
    never = min(torch.iinfo(q_meta.dtype).max, torch.iinfo(k_meta.dtype).max) // 2
    clean_key = torch.where(k_kind == CLEAN, k_block, never)
    clean_limit = torch.where(q_kind == PAD, -never, q_block + (q_kind == CLEAN).to(q_block.dtype))
    out = clean_key[:, None, :] < clean_limit[:, :, None]
    noisy_key = torch.where(k_kind == NOISY, k_block, never)
    noisy_query = torch.where(q_kind == NOISY, q_block, -never)
    out |= noisy_key[:, None, :] == noisy_query[:, :, None]
    if q_meta.shape[1] > 2:  # packed rows: one more equality, same doc only
        out &= q_meta[:, 2, :, None] == k_meta[:, 2, None, :]
    sq, sk = q_meta.shape[-1], k_meta.shape[-1]
    out.diagonal(offset=sk - sq, dim1=1, dim2=2).fill_(True)  # a token always sees itself
    return out


def flex_mask_mod(q_meta: torch.Tensor, k_meta: torch.Tensor):
    """The same rule as :func:`allowed`, as a FlexAttention ``mask_mod``."""
    q_block, q_kind = q_meta[:, 0], q_meta[:, 1]  # [B, Sq]
    k_block, k_kind = k_meta[:, 0], k_meta[:, 1]  # [B, Sk]
    offset = k_meta.shape[-1] - q_meta.shape[-1]
    # two-channel metadata: every token in doc 0
    q_doc = q_meta[:, 2] if q_meta.shape[1] > 2 else torch.zeros_like(q_block)  # [B, Sq]
    k_doc = k_meta[:, 2] if k_meta.shape[1] > 2 else torch.zeros_like(k_block)  # [B, Sk]

    def mask_mod(b, h, q_idx, kv_idx):
        qb, qk = q_block[b, q_idx], q_kind[b, q_idx]
        kb, kk = k_block[b, kv_idx], k_kind[b, kv_idx]
        clean_ok = (kk == CLEAN) & (qk != PAD) & ((kb < qb) | ((kb == qb) & (qk == CLEAN)))
        noisy_ok = (kk == NOISY) & (qk == NOISY) & (kb == qb)
        same_doc = q_doc[b, q_idx] == k_doc[b, kv_idx]
        return ((clean_ok | noisy_ok) & same_doc) | (kv_idx == q_idx + offset)

    return mask_mod


def logits_needed(response_len: int) -> int:
    """Trailing columns of ``[prompt | response]`` whose logits a shifted target or a causal loss
    reads: the last prompt column predicts the first response token; the last column predicts
    nothing, but keeping it keeps every slice a plain "last n columns"."""
    return response_len + 1


def next_token_logits(logits: torch.Tensor, response_len: int) -> torch.Tensor:
    """The causal model's predictions of the response's tokens ``[B, L, V/tp]``: columns
    ``P - 1 .. P + L - 2`` of ``[prompt | response]`` logits, counted from the end (so the logits
    may also be only the last ``logits_needed(L)`` columns)."""
    return logits[:, -response_len - 1: -1]
