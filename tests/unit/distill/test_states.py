"""Training states against hand-made rollouts: which xt tokens are masked and which count in the loss."""

import collections

import pytest
import torch

from nemo_opdlm.distill import states
from nemo_opdlm.models import masks

MASK = 99
EOS = 9
EOT = 8


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _block_patterns(masked, block, block_size):
    """Counter of the masked pattern (tuple of bools) of one block over all rows."""
    cols = slice(block * block_size, (block + 1) * block_size)
    return collections.Counter(tuple(row.tolist()) for row in masked[:, cols])


def test_on_policy_masks_tokens_decoded_at_or_after_the_sampled_round():
    n = 4000
    # block 0 used rounds 0..3 (one token each); block 1 finished in 2 rounds (dynamic decoding);
    # block 2 used rounds {0, 2} (a gap); block 3 is half padding whose step_map is garbage.
    step_map = torch.tensor([[2, 0, 3, 1, 0, 0, 1, 0, 0, 2, 0, 2, 0, 1, 3, 3]]).repeat(n, 1)
    valid = torch.ones(n, 16, dtype=torch.bool)
    valid[:, 14:] = False
    masked = states.on_policy_mask(step_map, valid, block_size=4, steps_per_block=4, generator=_gen())
    T, F = True, False
    expected = {
        0: {(T, T, T, T): 1 / 4, (T, F, T, T): 1 / 4, (T, F, T, F): 1 / 4, (F, F, T, F): 1 / 4},
        1: {(T, T, T, T): 1 / 2, (F, F, T, F): 1 / 2},
        2: {(T, T, T, T): 1 / 2, (F, T, F, T): 1 / 2},
        3: {(T, T, F, F): 1 / 2, (F, T, F, F): 1 / 2},
    }
    for block, probs in expected.items():
        seen = _block_patterns(masked, block, 4)
        assert set(seen) == set(probs), (block, seen)
        for pattern, p in probs.items():
            assert abs(seen[pattern] / n - p) < 0.03, (block, pattern, seen[pattern] / n)


def test_on_policy_mask_padding_and_uneven_length():
    # L = 6 with block 4: the second block has 2 columns; row 1 has only one valid block
    step_map = torch.tensor([[0, 1, 2, 3, 1, 0], [3, 2, 1, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    for seed in range(20):
        masked = states.on_policy_mask(step_map, valid, 4, 4, _gen(seed))
        assert not (masked & ~valid).any()
        for row in range(2):
            for cols in (slice(0, 4), slice(4, 6)):
                v, m, s = valid[row, cols], masked[row, cols], step_map[row, cols]
                if not v.any():
                    continue
                assert m.any(), "every valid block keeps a masked token"
                r = int(s[m].min())  # the sampled round: masked == decoded at >= r
                assert torch.equal(m, v & (s >= r))


def test_on_policy_rejects_rounds_outside_the_schedule():
    with pytest.raises(ValueError, match="steps_per_block"):
        states.on_policy_mask(torch.tensor([[0, 4, 1, 2]]), torch.ones(1, 4, dtype=torch.bool), 4, 4, _gen())


def test_random_mask_ratio_and_at_least_one_per_block():
    n = 20000
    valid = torch.ones(n, 4, dtype=torch.bool)
    masked = states.random_mask(valid, 4, _gen(1))
    counts = masked.sum(-1).float()
    assert counts.min() >= 1
    # t ~ U(0,1), Bernoulli(t) per token: E[count] = 4 * 1/2; plus a forced token when none drawn,
    # P(none) = E[(1-t)^4] = 1/5
    assert abs(counts.mean().item() - 2.2) < 0.03
    # padding never masked; a block with a single valid token always masks it; an empty block nothing
    valid = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool).repeat(50, 1)
    masked = states.random_mask(valid, 4, _gen(2))
    assert not (masked & ~valid).any()
    assert masked[:, 4].all() and masked[:, :2].any(-1).all() and not masked[:, 8:].any()


def test_generator_is_the_only_randomness():
    step_map = torch.randint(0, 4, (8, 16), generator=_gen(5))
    valid = torch.ones(8, 16, dtype=torch.bool)
    before = torch.get_rng_state()
    a = states.on_policy_mask(step_map, valid, 4, 4, _gen(3))
    b = states.on_policy_mask(step_map, valid, 4, 4, _gen(3))
    c = states.random_mask(valid, 4, _gen(3))
    d = states.random_mask(valid, 4, _gen(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_loss_positions_eos_and_padding():
    response = torch.tensor([
        [5, EOS, 7, 6, 3, 3, 3, 3],   # EOS at 1: nothing after counts
        [5, 6, 7, EOT, EOS, 1, 1, 1],  # two EOS ids: the first one (EOT) ends the response
        [5, 6, 7, 4, 5, 6, EOS, 2],    # EOS only in the padding: ignored
        [1, 2, 3, 4, 5, 6, 7, 1],      # no EOS
    ])
    valid = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    masked = torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1, 1, 1],
        [1, 0, 1, 0, 1, 0, 1, 0],
    ], dtype=torch.bool)
    got = states.loss_positions(response, valid, masked, [EOS, EOT], exclude_eos=True)
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0, 1, 0],
    ], dtype=torch.bool)
    assert torch.equal(got, want)
    got = states.loss_positions(response, valid, masked, [EOS, EOT], exclude_eos=False)
    want[0, 1] = True
    want[1, 3] = True
    assert torch.equal(got, want)


def test_build_states_rows():
    prompt_ids = torch.tensor([[0, 0, 11, 12], [13, 14, 15, 16]])  # left-padded (0 = pad)
    prompt_lens = torch.tensor([2, 4])
    response = torch.tensor([[21, 22, 23, EOS, 7, 7, 7, 7], [31, 32, 33, 34, 35, 36, 37, 38]])
    step_map = torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 1, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = states.build_states(prompt_ids, prompt_lens, response, step_map, valid, block_size=4,
                                steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS], generator=_gen(4))
    P, L = 4, 8
    assert batch["input_ids"].shape == (2, P + 2 * L)
    assert torch.equal(batch["input_ids"][:, :P], prompt_ids)
    assert torch.equal(batch["input_ids"][:, P:P + L], response)
    assert torch.equal(batch["x0"], response)
    xt = batch["input_ids"][:, P + L:]
    m = batch["xt_masked"]
    assert torch.equal(xt == MASK, m)
    assert torch.equal(xt[~m], response[~m])
    assert not (m & ~valid).any()
    # every valid block has a masked token; the masked set is "decoded at >= r" within each block
    for row in range(2):
        for blk in range(2):
            cols = slice(4 * blk, 4 * blk + 4)
            if valid[row, cols].any():
                r = int(step_map[row, cols][m[row, cols]].min())
                assert torch.equal(m[row, cols], valid[row, cols] & (step_map[row, cols] >= r))
    assert torch.equal(batch["loss_mask"], states.loss_positions(response, valid, m, [EOS]))
    assert not batch["loss_mask"][0, 3:].any()
    # xt reuses x0's positions; meta: prompt padding PAD, xt valid NOISY, response padding PAD
    pos = batch["position_ids"]
    assert torch.equal(pos[:, P:P + L], pos[:, P + L:])
    assert pos[0, P].item() == 2 and pos[1, P].item() == 4
    kind = batch["meta"][:, 1]
    assert kind[0, :2].tolist() == [masks.PAD] * 2
    assert kind[0, P + L:].tolist() == [masks.NOISY] * 4 + [masks.PAD] * 4
    assert (kind[1, P + L:] == masks.NOISY).all()


def test_random_masking_of_given_responses():
    prompt_ids = torch.tensor([[11, 12], [13, 14]])
    prompt_lens = torch.tensor([2, 2])
    response = torch.tensor([[21, 22, EOS, 0, 0, 0], [31, 32, 33, 34, 35, EOS]])
    lens = torch.tensor([3, 6])
    valid = states.response_valid(response, lens, [EOS])
    assert valid.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    # a token after the first EOS is padding in a given response even inside the length
    assert states.response_valid(torch.tensor([[1, EOS, 2, 3]]), None, [EOS]).tolist() == [[1, 1, 0, 0]]
    batch = states.build_states(prompt_ids, prompt_lens, response, None, valid, block_size=4,
                                steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS], generator=_gen(6),
                                masking="random")
    m = batch["xt_masked"]
    assert not (m & ~valid).any()
    assert m[0, :4].any() and m[1, :4].any() and m[1, 4:].any()
    assert not batch["loss_mask"][0, 2:].any() and not batch["loss_mask"][1, 5]  # after EOS; the EOS itself
    with pytest.raises(ValueError, match="step_map"):
        states.build_states(prompt_ids, prompt_lens, response, None, valid, block_size=4, steps_per_block=4,
                            mask_token_id=MASK, eos_ids=[EOS], generator=_gen(6))


def test_split_microbatches():
    batch = {"a": torch.arange(8).view(4, 2), "b": torch.arange(4)}
    parts = states.split_microbatches(batch, 2)
    assert [p["b"].tolist() for p in parts] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        states.split_microbatches(batch, 3)


def _absolute_rollout(prompt_lens, length, block_size, seed):
    """Hand-made rollouts on the absolute grid: response position i of a row whose prompt has P tokens
    is in block (P mod b + i) // b, and each block's response tokens were decoded in a random order,
    one or two per round (so some blocks used fewer rounds than positions)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(prompt_lens)
    step_map = torch.full((batch, length), -1)
    for row, p in enumerate(prompt_lens):
        blocks = (p % block_size + torch.arange(length)) // block_size
        for b in blocks.unique().tolist():
            cols = (blocks == b).nonzero().flatten()
            per_round = 1 + int(torch.randint(2, (), generator=g))
            order = cols[torch.randperm(cols.numel(), generator=g)]
            step_map[row, order] = torch.arange(order.numel()) // per_round
    return step_map


def test_states_on_the_absolute_grid_follow_the_state_law():
    """On the absolute grid each block's state is the sampler's state before one of the rounds it
    used: a response token is clean iff it was decoded before that round in its (absolute) block;
    the prompt's last P mod b tokens sit in the first block of x0 (clean) and xt (noisy, never
    masked, never in the loss), and the prefix before them is the row's prompt."""
    from nemo_opdlm.models import grid

    bs, length = 4, 12
    prompt_lens = [5, 6, 7, 8, 3]  # heads 1, 2, 3, 0, 3 (the last: no aligned prefix at all)
    prompts = [list(range(10, 10 + p)) for p in prompt_lens]
    width = max(prompt_lens)
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    lens = torch.tensor(prompt_lens)
    response = torch.randint(20, 90, (len(prompts), length), generator=_gen(3))
    valid = torch.ones(len(prompts), length, dtype=torch.bool)
    valid[1, 9:] = False  # a short response
    for seed in range(10):
        step_map = _absolute_rollout(prompt_lens, length, bs, seed)
        f = grid.frame_rows(prompt_ids, lens, response, valid, step_map, bs, "absolute", pad_id=0)
        rows = states.build_states(f.prompt_ids, f.prompt_lens, f.tokens, f.step_map, f.valid, block_size=bs,
                                   steps_per_block=bs, mask_token_id=MASK, eos_ids=[EOS], generator=_gen(seed),
                                   given=f.given)
        framed_len = f.tokens.shape[1]
        assert framed_len == length + bs
        x0 = rows["input_ids"][:, width:width + framed_len]
        xt = rows["input_ids"][:, width + framed_len:]
        meta = rows["meta"]
        for row, p in enumerate(prompt_lens):
            head = p % bs
            # the prefix is the prompt without its head, right-aligned; the head opens x0 and xt
            assert rows["input_ids"][row, width - (p - head):width].tolist() == prompts[row][:p - head]
            assert x0[row, :head].tolist() == prompts[row][p - head:]
            assert xt[row, :head].tolist() == prompts[row][p - head:]
            assert not rows["loss_mask"][row, :head].any() and not rows["xt_masked"][row, :head].any()
            assert (meta[row, 0, width:width + head] == 0).all() and (meta[row, 1, width:width + head] == masks.CLEAN).all()
            xt_meta = meta[row, :, width + framed_len:width + framed_len + head]
            assert (xt_meta[0] == 0).all() and (xt_meta[1] == masks.NOISY).all()
            assert (meta[row, 0, :width] < 0).all()  # the prefix's blocks come before block 0
            # the response: x0 holds it after the head; xt masks exactly the tokens decoded at or after
            # the block's sampled round, that round one the block used
            n = int(valid[row].sum())
            assert torch.equal(x0[row, head:head + n], response[row, :n])
            blocks = (head + torch.arange(n)) // bs
            masked = xt[row, head:head + n] == MASK
            for b in blocks.unique().tolist():
                sel = blocks == b
                steps, m = step_map[row, :n][sel], masked[sel]
                rounds = [r for r in steps.unique().tolist() if torch.equal(m, steps >= r)]
                assert len(rounds) == 1, (row, b, steps, m)
                assert torch.equal(xt[row, head:head + n][sel][~m], response[row, :n][sel][~m])
            assert torch.equal(rows["loss_mask"][row, head:head + n], masked)  # no EOS in these responses


def test_aligned_prompts_give_the_same_rows_on_both_grids():
    """Prompts whose length is a multiple of the block size: the absolute grid's frame is the row
    itself, and the states are the response grid's, token for token."""
    from nemo_opdlm.models import grid

    prompt_ids = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    lens = torch.tensor([4, 8])
    response = torch.randint(20, 90, (2, 8), generator=_gen(1))
    valid = torch.ones(2, 8, dtype=torch.bool)
    step_map = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0], [1, 0, 0, 1, 0, 0, 0, 0]])
    built = []
    for name in grid.GRIDS:
        f = grid.frame_rows(prompt_ids, lens, response, valid, step_map, 4, name, pad_id=0)
        assert not f.given.any() and torch.equal(f.tokens, response) and torch.equal(f.prompt_ids, prompt_ids)
        built.append(states.build_states(f.prompt_ids, f.prompt_lens, f.tokens, f.step_map, f.valid, block_size=4,
                                         steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS], generator=_gen(5),
                                         given=f.given))
    assert built[0].keys() == built[1].keys()
    for key in built[0]:
        assert torch.equal(built[0][key], built[1][key]), key
