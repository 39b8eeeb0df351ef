"""Packed rows (distill/packing.py): the layout of a packed sequence, written out by hand."""

import pytest
import torch

from nemo_opdlm.distill import packing, states
from nemo_opdlm.models import masks

MASK, EOS, PAD_ID = 99, 7, 0


def padded_rows():
    """Three ``[prompt (5) | x0 (6) | xt (6)]`` rows, block 4: prompts of 5, 2 and 4 tokens,
    responses valid for 6, 3 and 1 tokens (segments of 17, 8 and 6 tokens)."""
    g = torch.Generator().manual_seed(0)
    prompt_lens = torch.tensor([5, 2, 4])
    prompt_ids = torch.randint(10, 90, (3, 5), generator=g)
    response = torch.randint(10, 90, (3, 6), generator=g)
    valid = torch.arange(6)[None, :] < torch.tensor([[6], [3], [1]])
    masked = torch.ones(3, 6, dtype=torch.bool)
    return states.assemble(prompt_ids, prompt_lens, response, valid, masked, block_size=4, mask_token_id=MASK,
                           eos_ids=[EOS])


def test_first_fit_layout_docs_positions():
    rows = padded_rows()
    mbs, groups = packing.pack_rows(rows, 20, block_size=4, shift=False, pad_id=PAD_ID)
    # 17 fills the first sequence; 8 and 6 share the second (first fit in row order)
    assert [g.tolist() for g in groups] == [[0], [1, 2]]
    mb = mbs[1]
    assert mb["input_ids"].shape == (1, 20) and mb["meta"].shape == (1, 3, 20)
    assert mb["meta"][0, 2].tolist() == [0] * 8 + [1] * 6 + [-1] * 6
    assert mb["position_ids"][0, :14].tolist() == [0, 1, 2, 3, 4, 2, 3, 4] + [0, 1, 2, 3, 4, 4]
    assert mb["meta"][0, 0, :14].tolist() == [-1, -1, 0, 0, 0, 0, 0, 0] + [-1, -1, -1, -1, 0, 0]
    assert mb["meta"][0, 1].tolist() == [1] * 5 + [2] * 3 + [1] * 5 + [2] + [masks.PAD] * 6
    assert mb["input_ids"][0, :8].tolist() == rows["input_ids"][1, [3, 4, 5, 6, 7, 11, 12, 13]].tolist()
    assert mb["input_ids"][0, 14:].tolist() == [PAD_ID] * 6
    for key in ("loss_mask", "x0", "xt_masked"):
        assert torch.equal(mb[key], rows[key][[1, 2]])  # row-shaped [R, L]


def test_logits_columns_unshifted_and_shifted():
    rows = padded_rows()
    unshifted, _ = packing.pack_rows(rows, 20, block_size=4, shift=False, pad_id=PAD_ID)
    shifted, _ = packing.pack_rows(rows, 20, block_size=4, shift=True, pad_id=PAD_ID)
    assert unshifted[0]["logits_columns"].tolist() == [11, 12, 13, 14, 15, 16]
    # the second sequence's rows are valid for 3 and 1 tokens: 3 columns per row (W), not 6 (L)
    assert unshifted[1]["logits_columns"].tolist() == [5, 6, 7] + [13, 0, 0]
    # shifted: a block's first token from the clean column before it (prompt's last, or x0 j-1)
    assert shifted[0]["logits_columns"].tolist() == [4, 11, 12, 13, 8, 15]
    assert shifted[1]["logits_columns"].tolist() == [1, 5, 6] + [11, 0, 0]
    # each valid prediction column holds the padded row's token at the same position and kind
    for shift, mbs in ((False, unshifted), (True, shifted)):
        padded_cols = masks.prediction_columns(5, 6, 4, shift)
        for mb, group in zip(mbs, ([0], [1, 2])):
            cols = mb["logits_columns"].view(len(group), -1)  # [R, W]
            for r, row in enumerate(group):
                n = int((rows["meta"][row, 1, 5:11] != masks.PAD).sum())
                for name in ("input_ids", "position_ids"):
                    assert torch.equal(mb[name][0, cols[r, :n]], rows[name][row, padded_cols[:n]])


def test_padding_fraction_and_budget_errors():
    rows = padded_rows()
    mbs, _ = packing.pack_rows(rows, 20, block_size=4, shift=False, pad_id=PAD_ID)
    assert packing.padding_fraction(mbs) == pytest.approx(9 / 40)  # 3 + 6 of 2 x 20
    assert packing.padding_fraction([rows]) == pytest.approx(20 / 51)  # 0 + 9 + 11 of 3 x 17
    with pytest.raises(ValueError, match="train.pack_tokens=16 is shorter than a row of 17"):
        packing.pack_rows(rows, 16, block_size=4, shift=False, pad_id=PAD_ID)
    holes = dict(rows, meta=rows["meta"].clone())
    holes["meta"][0, 1, 5] = masks.PAD  # x0[0] invalid but x0[1] valid
    with pytest.raises(ValueError, match="not a prefix"):
        packing.pack_rows(holes, 20, block_size=4, shift=False, pad_id=PAD_ID)


def test_pack_tokens_config_is_checked():
    """``train.pack_tokens`` must hold the longest row (tiny recipe: 32 prompt + 2 x 16 response
    tokens) and is refused, by name, where packed rows are not supported."""
    import dataclasses

    from nemo_opdlm.config import ConfigError, DistillConfig, ParallelLayout
    from nemo_opdlm.runtime.distributed import TeacherLayout
    from nemo_opdlm.recipes.tiny import tiny_run

    cfg = tiny_run("t")
    absolute = cfg.diffusion
    assert absolute.block_grid == "absolute"  # the default
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, block_grid="response"))
    packed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pack_tokens=64))
    assert packed.train.pack_tokens == 64
    with pytest.raises(ConfigError, match=r"train.pack_tokens=63 cannot hold the longest row.* = 64"):
        dataclasses.replace(packed, train=dataclasses.replace(cfg.train, pack_tokens=63))
    # on the absolute grid x0 and xt also carry the prompt's last P mod 4 tokens: up to 3 more
    with pytest.raises(ConfigError, match=r"rollout.max_length \+ \(diffusion.block_size - 1\) = 67; raise"):
        dataclasses.replace(packed, diffusion=absolute)
    dataclasses.replace(packed, diffusion=absolute, train=dataclasses.replace(cfg.train, pack_tokens=67))
    with pytest.raises(ConfigError, match=r"train.pack_tokens must be >= 1"):
        dataclasses.replace(cfg.train, pack_tokens=0)
    with pytest.raises(ConfigError, match=r"train.pack_tokens with parallel.pp=2 .*give the teacher its own layout"):
        dataclasses.replace(packed, parallel=ParallelLayout(pp=2))  # the streamed teacher needs padded rows
    dataclasses.replace(packed, parallel=ParallelLayout(pp=2, teacher=TeacherLayout(pp=2)))  # its targets come first
    dataclasses.replace(packed, parallel=ParallelLayout(pp=2), distill=DistillConfig(method="sft"),
                        data=dataclasses.replace(cfg.data, response_field="answer"))  # no teacher
    with pytest.raises(ConfigError, match=r"distill.method=ar trains causal rows"):
        dataclasses.replace(packed, distill=DistillConfig(method="ar"),
                            data=dataclasses.replace(cfg.data, response_field="answer"))
