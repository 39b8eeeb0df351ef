"""The block-diffusion mask against a hand-written statement of the method's rule."""

import pytest
import torch

from nemo_opdlm.models import masks
from tests.tiny import reference_allowed, sequence_layout


def handwritten_mask(prompt_lens, prompt_width, response_lens, response_len, block_size, with_xt):
    """Who may attend to whom, written from method.md's prose with segment positions, not metadata.

    Row = [left-padded prompt (width P) | x0 (L) | xt (L)]. The prompt is block-causal with blocks
    aligned to its end; x0 is block-causal with blocks from its start; xt block b sees the prompt,
    x0 blocks < b and itself. Padding keys are masked; a padding query sees only itself.
    """
    batch = len(prompt_lens)
    seq = prompt_width + response_len * (2 if with_xt else 1)
    out = torch.zeros(batch, seq, seq, dtype=torch.bool)

    def describe(row, col):
        if col < prompt_width:
            start = prompt_width - prompt_lens[row]
            if col < start:
                return None
            # blocks aligned to the prompt's end: the last block_size prompt tokens are one block
            return ("clean", -((prompt_width - col - 1) // block_size) - 1)
        i = col - prompt_width
        segment = "clean"
        if i >= response_len:
            i -= response_len
            segment = "noisy"
        if i >= response_lens[row]:
            return None
        return (segment, i // block_size)

    for r in range(batch):
        for q in range(seq):
            for k in range(seq):
                dq, dk = describe(r, q), describe(r, k)
                if q == k:
                    ok = True
                elif dk is None:
                    ok = False
                elif dq is None:
                    ok = False
                elif dq[0] == "clean":
                    ok = dk[0] == "clean" and dk[1] <= dq[1]
                else:  # noisy query
                    ok = (dk[0] == "clean" and dk[1] < dq[1]) or (dk[0] == "noisy" and dk[1] == dq[1])
                out[r, q, k] = ok
    return out


CASES = [
    # prompt_lens, prompt_width, response_lens, response_len, block_size, with_xt
    ([5, 3], 5, [6, 6], 6, 4, True),
    ([7, 1, 4], 8, [9, 5, 2], 9, 4, True),
    ([3], 3, [5], 5, 2, False),
    ([6, 2], 6, [7, 7], 7, 3, True),
    ([4], 4, [8], 8, 1, True),
    ([2, 2], 3, [3, 1], 3, 16, True),
]


@pytest.mark.parametrize("prompt_lens,width,response_lens,response_len,block,with_xt", CASES)
def test_mask_matches_handwritten(prompt_lens, width, response_lens, response_len, block, with_xt):
    valid = torch.arange(response_len)[None, :] < torch.tensor(response_lens)[:, None]
    layout = masks.build_layout(torch.tensor(prompt_lens), width, valid, block, with_xt)
    got = masks.allowed(layout.meta, layout.meta)
    want = handwritten_mask(prompt_lens, width, response_lens, response_len, block, with_xt)
    assert torch.equal(got, want)
    assert torch.equal(reference_allowed(layout.meta, layout.meta), want)


def test_position_ids_reuse_x0_and_skip_left_padding():
    valid = torch.ones(2, 3, dtype=torch.bool)
    layout = masks.build_layout(torch.tensor([4, 2]), 4, valid, 2, with_xt=True)
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert layout.position_ids[1].tolist() == [0, 0, 0, 1, 2, 3, 4, 2, 3, 4]
    assert layout.x0_slice == slice(4, 7) and layout.xt_slice == slice(7, 10)


def test_block_one_is_causal_and_large_block_is_bidirectional():
    causal = sequence_layout(1, 7, block_size=1)
    assert torch.equal(masks.allowed(causal.meta, causal.meta)[0], torch.ones(7, 7).tril().bool())
    full = sequence_layout(1, 7, block_size=7)
    assert masks.allowed(full.meta, full.meta).all()
    bigger = sequence_layout(1, 7, block_size=100)
    assert masks.allowed(bigger.meta, bigger.meta).all()


def test_cache_queries_are_the_last_keys():
    """With a KV cache the queries are the last Sq keys: the rule is the same as the full mask's."""
    valid = torch.ones(2, 8, dtype=torch.bool)
    layout = masks.build_layout(torch.tensor([5, 2]), 5, valid, 4, with_xt=False)
    full = masks.allowed(layout.meta, layout.meta)
    q_meta = layout.meta[:, :, -4:]
    assert torch.equal(masks.allowed(q_meta, layout.meta), full[:, -4:])


def test_flex_mask_mod_matches_dense():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    valid = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    layout = masks.build_layout(torch.tensor([3, 5]), 5, valid, 4, with_xt=True)
    mod = masks.flex_mask_mod(layout.meta, layout.meta)
    seq = layout.meta.shape[-1]
    dense = flex.create_mask(mod, 2, 1, seq, seq, device="cpu")[:, 0]
    assert torch.equal(dense, masks.allowed(layout.meta, layout.meta))


def test_bad_inputs():
    with pytest.raises(ValueError, match="block_size"):
        masks.build_layout(torch.tensor([1]), 1, torch.ones(1, 2, dtype=torch.bool), 0, True)
    with pytest.raises(ValueError, match="longer than prompt_width"):
        masks.build_layout(torch.tensor([4]), 2, torch.ones(1, 2, dtype=torch.bool), 4, True)
    with pytest.raises(ValueError, match="prompt_lens"):
        masks.build_layout(torch.tensor([1, 1]), 2, torch.ones(1, 2, dtype=torch.bool), 4, True)


def test_prediction_columns():
    """[prompt (3) | x0 (6) | xt (6)], block 4: unshifted, xt itself; shifted, the previous xt column
    inside a block and, at a block's first token, the clean column before it (x0, or the prompt)."""
    assert masks.prediction_columns(3, 6, 4, False).tolist() == [9, 10, 11, 12, 13, 14]
    assert masks.prediction_columns(3, 6, 4, True).tolist() == [2, 9, 10, 11, 6, 13]
    assert masks.prediction_columns(2, 3, 1, True).tolist() == [1, 2, 3]  # block 1: x0 before each token
    with pytest.raises(ValueError, match="prompt"):
        masks.prediction_columns(0, 4, 4, True)


def _two_docs():
    """Two rows' layouts concatenated into one sequence, doc 0 then doc 1 (packed rows)."""
    a = masks.build_layout(torch.tensor([3]), 3, torch.ones(1, 5, dtype=torch.bool), 4, with_xt=True).meta
    b = masks.build_layout(torch.tensor([2]), 2, torch.ones(1, 3, dtype=torch.bool), 4, with_xt=True).meta
    doc = torch.cat([torch.zeros(13, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    return a, b, torch.cat([torch.cat([a, b], -1), doc[None, None]], 1)  # [1, 3, 21]


def test_doc_channel_is_block_diagonal():
    """Packed rows: each doc's block of the mask is its own row's mask, nothing crosses docs; a
    single doc (or a 2-channel meta) is the unchanged rule."""
    a, b, packed = _two_docs()
    out = masks.allowed(packed, packed)[0]  # [21, 21]
    assert torch.equal(out[:13, :13], masks.allowed(a, a)[0])
    assert torch.equal(out[13:, 13:], masks.allowed(b, b)[0])
    assert not out[:13, 13:].any() and not out[13:, :13].any()
    one_doc = torch.cat([a, torch.zeros_like(a[:, :1])], 1)  # [1, 3, 13]
    assert torch.equal(masks.allowed(one_doc, one_doc), masks.allowed(a, a))
    # without the doc channel, doc 1's xt block 0 would see doc 0's prompt and x0 block 0 too
    assert int(masks.allowed(packed[:, :2], packed[:, :2])[0].sum()) > int(out.sum())


def test_flex_mask_mod_matches_dense_with_docs():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    _, _, packed = _two_docs()
    mod = masks.flex_mask_mod(packed, packed)
    dense = flex.create_mask(mod, 1, 1, 21, 21, device="cpu")[:, 0]
    assert torch.equal(dense, masks.allowed(packed, packed))
