"""Where blocks fall: the response grid and the absolute grid, and the frame that makes them one.

One job: given each row's prompt length and the block size, say where the blocks of
``[prompt | response]`` begin (``diffusion.block_grid``), and move rows between their natural form
(a left-padded prompt, then the response) and the *frame* every decoder, state and layout works
in. Non-goals: who attends to whom (``masks.py``), decoding (``rollout/``), training states
(``distill/states.py``).

- ``response`` (this project's original grid, the reference's training rows): blocks start at the
  response's first token; prompt blocks are counted back from the prompt's end.
- ``absolute`` (SGLang, lmdeploy and JetEngine for SDAR models; the reference's rollouts and
  evaluation): blocks are cut from position 0. With ``P`` prompt tokens and ``r = P mod b``, the
  engine prefills the first ``P - r`` tokens; the first denoising block holds the prompt's last
  ``r`` tokens (clean, never re-masked, attending both ways with the masks of their block) and
  ``b - r`` masks; every later block is whole.

The two agree when ``r = 0``. The absolute grid is the response grid of a *frame*: the prompt's
block-aligned prefix (``P - r`` tokens) as the prompt, and its tail (``r`` tokens, the *head*) as
the first tokens of the response. Framed, a row's blocks start where the response grid puts them,
so the decoders, the ``[prompt | x0 | xt]`` layout, the states and the packing run unchanged; the
head positions are only *given*: decided before round 0, never masked, never in a loss, never
counted as generated. In a training row the head sits in x0 (clean, in block 0, with the first
``b - r`` response tokens, exactly as the engine commits that block) and in xt (noisy-kind, so
the head and the masks of block 0 attend to each other, as in the engine's denoising forward).

Framing is a per-row roll of the concatenated ``[prompt | response]`` right by ``r`` columns: the
prefix stays right-aligned to the prompt's width, the head moves into the response's first
columns. On the response grid every head is 0 and the frame is the row itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nemo_opdlm.errors import ConfigError

GRIDS = ("response", "absolute")
"""``diffusion.block_grid`` values (see the module docstring)."""


def head_lengths(prompt_lens: Tensor, block_size: int, grid: str) -> Tensor:
    """``[B]``: each row's head, the prompt tokens that share the first denoising block with the
    response (``P mod b`` on the absolute grid, 0 on the response grid)."""
    if grid not in GRIDS:
        raise ValueError(f"block grid must be one of {GRIDS}, got {grid!r}")
    if grid == "response" or block_size == 1:
        return torch.zeros_like(prompt_lens)
    return prompt_lens % block_size


def roll_right(x: Tensor, shift: Tensor, fill: int | float | bool) -> Tensor:
    """``x [B, S, ...]`` with row ``b`` moved ``shift[b]`` columns to the right (``fill`` enters on
    the left; columns pushed past the end are dropped)."""
    cols = torch.arange(x.shape[1], device=x.device)[None, :] - shift.to(x.device)[:, None]  # [B, S]
    index = cols.clamp(min=0).view(*cols.shape, *([1] * (x.dim() - 2))).expand_as(x)
    moved = x.gather(1, index)
    keep = (cols >= 0).view(*cols.shape, *([1] * (x.dim() - 2)))
    return torch.where(keep, moved, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def roll_left(x: Tensor, shift: Tensor, fill: int | float | bool) -> Tensor:
    """``x [B, S]`` with row ``b`` moved ``shift[b]`` columns to the left (``fill`` enters on the right)."""
    cols = torch.arange(x.shape[1], device=x.device)[None, :] + shift.to(x.device)[:, None]  # [B, S]
    moved = x.gather(1, cols.clamp(max=x.shape[1] - 1))
    return torch.where(cols < x.shape[1], moved, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


@dataclass(frozen=True)
class PromptFrame:
    """Left-padded prompts in the frame: the aligned prefix as the prompt, the head as given
    response tokens.

    Attributes:
        prefix_ids: ``[B, P]`` the prompts without their heads, left-padded to the same width.
        prefix_lens: ``[B]`` their lengths (multiples of the block size on the absolute grid).
        head: ``[B]`` head lengths (0 on the response grid; < block size).
        head_ids: ``[B, H]`` each row's head tokens in its first ``head[b]`` columns (``H`` = the
            longest head, a host int; padding after).
        block_size: the grid's block size.
    """

    prefix_ids: Tensor
    prefix_lens: Tensor
    head: Tensor
    head_ids: Tensor
    block_size: int

    @property
    def width(self) -> int:
        """``H``: columns the heads take at the front of a framed response (0 when no row has one)."""
        return self.head_ids.shape[1]

    @property
    def extra(self) -> int:
        """Columns a framed response adds to the response: a whole block when some row has a head
        (so a response of whole blocks stays whole blocks), else none."""
        return self.block_size if self.width else 0


def frame_prompts(prompt_ids: Tensor, prompt_lens: Tensor, block_size: int, grid: str,
                  pad_id: int = 0) -> PromptFrame:
    """The frame of left-padded prompts ``[B, P]`` with lengths ``[B]`` (one host read for the
    longest head)."""
    head = head_lengths(prompt_lens, block_size, grid).to(prompt_ids.device)
    # the response grid (or block 1) has no heads: known without reading the device
    width = int(head.max()) if head.numel() and grid != "response" and block_size > 1 else 0
    if width == 0:
        return PromptFrame(prompt_ids, prompt_lens, head, prompt_ids.new_empty(prompt_ids.shape[0], 0), block_size)
    rolled = roll_right(torch.cat([prompt_ids, prompt_ids.new_full((prompt_ids.shape[0], width), pad_id)], 1),
                        head, pad_id)  # [B, P + H]
    return PromptFrame(rolled[:, :prompt_ids.shape[1]], prompt_lens - head.to(prompt_lens.device), head,
                       rolled[:, prompt_ids.shape[1]:], block_size)


def frame_response(frame: PromptFrame, response: Tensor, fill: int | bool,
                   head: Optional[Tensor | int | bool] = None) -> Tensor:
    """``[B, L + extra]``: each row's head, then its response ``[B, L]`` (``fill`` after it).

    ``head``: what the head positions hold: the head tokens (None), or one value (e.g. True for a
    validity mask, -1 for a step map)."""
    if frame.width == 0:
        return response
    padded = torch.cat([response, response.new_full((response.shape[0], frame.extra), fill)], 1)  # [B, L + extra]
    rolled = roll_right(padded, frame.head, fill)  # the response starts at column head[b]
    cols = torch.arange(frame.width, device=rolled.device)[None, :]
    in_head = cols < frame.head.to(rolled.device)[:, None]  # [B, H]
    values = frame.head_ids.to(rolled.dtype) if head is None else torch.as_tensor(head, dtype=rolled.dtype,
                                                                                   device=rolled.device)
    return torch.cat([torch.where(in_head, values, rolled[:, :frame.width]), rolled[:, frame.width:]], 1)


def given_mask(head: Tensor, length: int) -> Tensor:
    """``[B, length]`` bool: the head positions of framed responses."""
    return torch.arange(length, device=head.device)[None, :] < head[:, None]


def unframe(x: Tensor, frame: PromptFrame, fill: int | bool) -> Tensor:
    """A framed ``[B, S]`` back to per response token (the head dropped, ``fill`` at the end)."""
    return x if frame.width == 0 else roll_left(x, frame.head, fill)


def block_index(head: Tensor, length: int, block_size: int) -> Tensor:
    """``[B, length]``: the block of each response position, counted from the first denoising block."""
    cols = torch.arange(length, device=head.device)
    return (head[:, None] + cols[None, :]) // block_size


@dataclass(frozen=True)
class FramedResponses:
    """Prompts and responses in the frame (what the states, the teacher and the layout read)."""

    prompt_ids: Tensor  # [B, P] the aligned prefixes, left-padded
    prompt_lens: Tensor  # [B]
    tokens: Tensor  # [B, L + extra] head, then the response
    valid: Tensor  # [B, L + extra] the head is valid (real tokens)
    step_map: Optional[Tensor]  # [B, L + extra] -1 at the head
    given: Tensor  # [B, L + extra] the head: never masked, never in a loss


def frame_rows(prompt_ids: Tensor, prompt_lens: Tensor, tokens: Tensor, valid: Tensor, step_map: Optional[Tensor],
               block_size: int, grid: str, pad_id: int) -> FramedResponses:
    """Responses per response token -> the frame of ``grid`` (the identity on the response grid,
    with nothing given)."""
    frame = frame_prompts(prompt_ids, prompt_lens, block_size, grid, pad_id)
    framed_valid = frame_response(frame, valid, False, head=True)
    return FramedResponses(
        frame.prefix_ids, frame.prefix_lens, frame_response(frame, tokens, pad_id), framed_valid,
        None if step_map is None else frame_response(frame, step_map, -1, head=-1),
        given_mask(frame.head.to(valid.device), framed_valid.shape[1]))


def recorded_grid(recorded: Optional[dict], source: str) -> tuple[Optional[str], Optional[str]]:
    """``(grid, note)``: the grid saved diffusion settings record, and a line to print (or None).

    ``recorded``: a checkpoint's ``diffusion`` settings (``opdlm_convert.json``, ``config.yaml``) or
    an export's config.json; None or empty when it records none (an AR model: grid None). Settings
    saved before ``diffusion.block_grid`` existed read as ``response``, and the note says so.
    """
    if not recorded:
        return None, None
    saved = recorded.get("block_grid")
    if saved is None:
        return "response", f"{source} records no diffusion.block_grid (saved before the setting existed): read as 'response'"
    return saved, None


def resolve_grid(recorded: Optional[dict], requested: Optional[str], source: str, *, flag: str = "--block-grid",
                 allow_mismatch: bool = False) -> tuple[Optional[str], Optional[str]]:
    """``(grid, note)``: the grid a model is decoded or exported on, and a line to print (or None).

    ``recorded``: as for :func:`recorded_grid`. ``requested`` (``flag``) may only repeat the
    recorded grid: a model decoded on a grid it was not trained on sees states it never saw, so
    another grid is refused unless ``allow_mismatch`` (a measurement of exactly that). The grid is
    None when neither side names one (the caller's default, ``DiffusionConfig.block_grid``, applies).
    """
    if requested is not None and requested not in GRIDS:
        raise ConfigError(f"{flag} must be one of {GRIDS}, got {requested!r}")
    saved, note = recorded_grid(recorded, source)
    if requested is not None and saved is not None and requested != saved and not allow_mismatch:
        raise ConfigError(f"{source} was trained on the {saved!r} block grid, not {requested!r} ({flag}): on another "
                          f"grid it would decode from states it never saw; drop {flag} (or set it to {saved!r}), or "
                          "pass --allow-grid-mismatch to measure exactly that")
    return requested or saved, note
