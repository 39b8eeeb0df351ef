"""Block grids: where blocks fall, the frame that reduces the absolute grid to the response grid, and
how a model's recorded grid is read and checked."""

import pytest
import torch

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models import grid


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    return torch.tensor([[pad] * (width - len(r)) + r for r in rows]), torch.tensor([len(r) for r in rows])


def test_heads_are_the_prompt_tokens_in_the_first_denoising_block():
    lens = torch.tensor([0, 1, 4, 5, 7, 8])
    assert grid.head_lengths(lens, 4, "absolute").tolist() == [0, 1, 0, 1, 3, 0]
    assert grid.head_lengths(lens, 4, "response").tolist() == [0] * 6
    assert grid.head_lengths(lens, 1, "absolute").tolist() == [0] * 6  # block 1: every grid is causal
    with pytest.raises(ValueError, match="block grid must be one of"):
        grid.head_lengths(lens, 4, "relative")


def test_the_frame_moves_each_prompt_tail_to_the_front_of_its_response():
    """Row by row, written out: the prefix stays right-aligned, the head opens the response, the
    response follows it; unframing gives the response back; positions line up with the blocks."""
    prompts, lens = _left_pad([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]])
    frame = grid.frame_prompts(prompts, lens, 4, "absolute", pad_id=0)
    assert frame.prefix_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 8, 9, 10, 11]]
    assert frame.prefix_lens.tolist() == [4, 0, 4] and frame.head.tolist() == [1, 2, 0]
    assert frame.width == 2 and frame.extra == 4
    response = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]])
    framed = grid.frame_response(frame, response, fill=0)
    assert framed.tolist() == [[5, 20, 21, 22, 23, 0, 0, 0], [6, 7, 30, 31, 32, 33, 0, 0],
                               [40, 41, 42, 43, 0, 0, 0, 0]]
    assert grid.unframe(framed, frame, fill=0)[:, :4].tolist() == response.tolist()
    # the block of each response position, counted from the first denoising block
    assert grid.block_index(frame.head, 4, 4).tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_frame_rows_marks_the_heads_given_and_leaves_the_response_grid_alone():
    prompts, lens = _left_pad([[1, 2, 3], [4, 5, 6, 7]])
    tokens = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    step_map = torch.tensor([[0, 1, 0, -1], [3, 2, 1, 0]])
    f = grid.frame_rows(prompts, lens, tokens, valid, step_map, 4, "absolute", pad_id=0)
    assert f.given.tolist() == [[True] * 3 + [False] * 5, [False] * 8]
    assert f.valid.tolist() == [[True] * 6 + [False] * 2, [True] * 4 + [False] * 4]
    assert f.step_map.tolist() == [[-1, -1, -1, 0, 1, 0, -1, -1], [3, 2, 1, 0, -1, -1, -1, -1]]
    assert f.tokens[0, :6].tolist() == [1, 2, 3, 10, 11, 12]
    same = grid.frame_rows(prompts, lens, tokens, valid, step_map, 4, "response", pad_id=0)
    assert same.tokens is tokens and same.prompt_ids is prompts and not same.given.any()


def test_recorded_grids_and_refusals():
    assert grid.recorded_grid(None, "ckpt") == (None, None)  # an AR model records none
    assert grid.recorded_grid({"block_grid": "absolute"}, "ckpt") == ("absolute", None)
    saved, note = grid.recorded_grid({"block_size": 4}, "ckpt/step_3")
    assert saved == "response" and note.startswith("ckpt/step_3 records no diffusion.block_grid")
    assert grid.resolve_grid(None, "absolute", "m") == ("absolute", None)
    assert grid.resolve_grid({"block_grid": "absolute"}, None, "m") == ("absolute", None)
    with pytest.raises(ConfigError, match=r"m was trained on the 'response' block grid, not 'absolute' \(--block-grid\)"
                                          r".*--allow-grid-mismatch"):
        grid.resolve_grid({"block_size": 4}, "absolute", "m")
    assert grid.resolve_grid({"block_size": 4}, "absolute", "m", allow_mismatch=True)[0] == "absolute"
    with pytest.raises(ConfigError, match="--block-grid must be one of"):
        grid.resolve_grid(None, "aligned", "m")


def test_benchmark_restates_the_grids():
    from benchmarks import token_efficiency

    assert token_efficiency.GRIDS == grid.GRIDS
