"""Rollout math without a model: unmasking rules, length curriculum, token choice, KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_opdlm.models import masks
from nemo_opdlm.models.config import ConfigError
from nemo_opdlm.rollout import sampling, schedules
from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    with runtime(ParallelLayout()) as rt:
        yield rt


# --- schedules ---------------------------------------------------------------------------------
def test_static_counts():
    assert schedules.static_counts(4, 4) == [1, 1, 1, 1]
    assert schedules.static_counts(4, 3) == [2, 1, 1]
    assert schedules.static_counts(8, 2) == [4, 4]
    assert schedules.static_counts(1, 1) == [1]
    with pytest.raises(ConfigError):
        schedules.static_counts(4, 5)


def _reference_select(conf, masked, count, threshold):
    """Position-by-position statement of the rule."""
    out = torch.zeros_like(masked)
    for i in range(conf.shape[0]):
        cands = [j for j in range(conf.shape[1]) if masked[i, j]]
        cands.sort(key=lambda j: (-float(conf[i, j]), j))  # most confident first, leftmost on ties
        for j in cands[:count]:
            out[i, j] = True
        if threshold is not None:
            for j in cands:
                if float(conf[i, j]) > threshold:
                    out[i, j] = True
    return out


@pytest.mark.parametrize("threshold", [None, 0.5, 0.9, 1.5])
@pytest.mark.parametrize("count", [1, 2])
def test_select_unmask_matches_reference(count, threshold):
    gen = torch.Generator().manual_seed(3)
    conf = torch.rand(64, 6, generator=gen)
    conf[:, 4] = conf[:, 3]  # ties
    conf[::5, 1] = 0.9  # exactly at the threshold: strict comparison keeps it masked
    masked = torch.rand(64, 6, generator=gen) < 0.6
    got = schedules.select_unmask(conf, masked, count, threshold)
    assert torch.equal(got, _reference_select(conf, masked, count, threshold))
    assert not (got & ~masked).any()


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_select_unmask_per_row_counts(threshold):
    """One count per row (rows in different rounds of their blocks) = the rule row by row."""
    gen = torch.Generator().manual_seed(4)
    conf = torch.rand(40, 6, generator=gen)
    masked = torch.rand(40, 6, generator=gen) < 0.7
    counts = torch.randint(0, 4, (40,), generator=gen)
    got = schedules.select_unmask(conf, masked, counts, threshold)
    for i in range(40):
        want = _reference_select(conf[i: i + 1], masked[i: i + 1], int(counts[i]), threshold)
        assert torch.equal(got[i: i + 1], want), i


def test_dynamic_above_one_equals_static():
    conf = torch.rand(32, 4, generator=torch.Generator().manual_seed(0))
    masked = torch.ones(32, 4, dtype=torch.bool)
    assert torch.equal(schedules.select_unmask(conf, masked, 1, 1.01), schedules.select_unmask(conf, masked, 1))


def test_curriculum_formula():
    cur = schedules.LengthCurriculum()
    assert (cur.min_length, cur.max_length, cur.warmup_steps) == (100, 4000, 100)
    for s in [0, 1, 7, 29, 50, 99, 100, 101, 1000]:
        expected = min(4000, 100 + math.floor(s * 3900 / 100))
        assert cur.length(s) == expected
    assert cur.length(0) == 100 and cur.length(50) == 2050 and cur.length(100) == 4000
    odd = schedules.LengthCurriculum(min_length=10, max_length=17, warmup_steps=3)
    assert [odd.length(s) for s in range(5)] == [10, 12, 14, 17, 17]
    assert schedules.LengthCurriculum(warmup_steps=0).length(0) == 4000
    with pytest.raises(ConfigError):
        schedules.LengthCurriculum(min_length=10, max_length=5)


def test_cosine_curriculum_is_the_reference_ramp_in_whole_blocks():
    """start + (end - start) * (1 - cos(pi/2 * s / N)), rounded to a multiple of the block size."""
    cur = schedules.LengthCurriculum(min_length=100, max_length=4000, warmup_steps=100, shape="cosine", block_size=4)
    for s in [0, 1, 10, 33, 50, 77, 99, 100, 250]:
        raw = 100 + 3900 * (1 - math.cos(math.pi / 2 * min(s, 100) / 100))
        assert cur.length(s) == min(4000, 4 * round(raw / 4)), s
        assert cur.length(s) % 4 == 0
    lengths = [cur.length(s) for s in range(101)]
    assert lengths == sorted(lengths) and lengths[0] == 100 and lengths[-1] == 4000
    # slow first, fast last: the first half of the ramp covers less than a third of the span
    assert cur.length(50) - 100 < (4000 - 100) / 3 < 4000 - cur.length(50)
    with pytest.raises(ConfigError, match="shape"):
        schedules.LengthCurriculum(shape="exp")


# --- token choice ------------------------------------------------------------------------------
def test_greedy_choice_and_raw_confidence():
    logits = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(1)) * 3
    ids, conf = sampling.choose_tokens(logits, temperature=0, group=None)
    assert torch.equal(ids, logits.argmax(-1))
    probs = logits.softmax(-1)
    torch.testing.assert_close(conf, probs.gather(-1, ids[..., None])[..., 0])
    # Suppressing the argmax token: the second best is chosen, its confidence still under the raw softmax.
    top = int(logits[0, 0].argmax())
    ids2, conf2 = sampling.choose_tokens(logits[:1, :1], temperature=0, suppress_id=top, group=None)
    second = int(logits[0, 0].topk(2).indices[1])
    assert int(ids2) == second
    torch.testing.assert_close(conf2[0, 0], probs[0, 0, second])


def test_non_finite_logits_do_not_crash():
    logits = torch.randn(4, 10)
    logits[0] = float("nan")
    logits[1, 3] = float("inf")
    logits[2, :] = float("-inf")
    logits[3, 5] = float("nan")
    for temperature in (0.0, 0.7, 1.0):
        ids, conf = sampling.choose_tokens(
            logits, temperature=temperature, top_k=5, top_p=0.9, uniform=torch.full((4,), 0.5), group=None
        )
        assert torch.isfinite(conf).all() and ((ids >= 0) & (ids < 10)).all()
        assert int(ids[1]) == 3 and float(conf[1]) == 1.0  # +inf dominates
        assert int(ids[3]) != 5  # NaN is never preferred


def _reference_inverse_cdf(probs, u):
    cdf = probs.double().cumsum(-1)
    target = u.double() * cdf[..., -1]
    return (cdf <= target[..., None]).sum(-1)


def test_inverse_cdf_matches_reference():
    gen = torch.Generator().manual_seed(4)
    probs = torch.rand(200, 50, generator=gen) ** 4
    probs[:, 10:20] = 0.0  # zero-probability ids are never drawn
    u = torch.rand(200, generator=gen)
    ids = sampling.inverse_cdf(probs, u, None)
    assert torch.equal(ids, _reference_inverse_cdf(probs, u))
    assert (probs.gather(-1, ids[:, None]) > 0).all()
    # u -> 1 cannot run past the last token with mass.
    edge = sampling.inverse_cdf(probs[:3], torch.full((3,), 1.0 - 1e-9), None)
    assert (probs[:3].gather(-1, edge[:, None]) > 0).all()


def _reference_nucleus(probs, top_p):
    """HF's rule: sort descending, keep while the mass of strictly more probable tokens < top_p."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for i in range(probs.shape[0]):
        for j in range(probs.shape[1]):
            above = probs[i][probs[i] > probs[i, j]].double().sum()
            keep[i, j] = above < top_p
    return keep


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_topp_threshold_is_exact_nucleus(top_p):
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(20, 30, generator=gen) * 2, -1)
    probs[0, :4] = probs[0, 4]  # ties at the boundary are kept together
    tau = sampling.topp_threshold(probs, top_p, None)
    assert torch.equal(probs >= tau[:, None], _reference_nucleus(probs, top_p))


def test_sampling_respects_top_k_and_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 16).expand(20000, 16).contiguous()
    u = torch.rand(20000)
    ids, conf = sampling.choose_tokens(logits, temperature=1.0, top_k=4, uniform=u, group=None)
    allowed = set(logits[0].topk(4).indices.tolist())
    assert set(ids.unique().tolist()) <= allowed
    expected = torch.zeros(16)
    expected[list(allowed)] = logits[0, list(allowed)].softmax(-1)
    freq = torch.bincount(ids, minlength=16).float() / ids.numel()
    assert (freq - expected).abs().max() < 0.015  # ~4 sigma for 20k draws
    torch.testing.assert_close(conf, logits.softmax(-1).gather(-1, ids[:, None])[:, 0])  # raw softmax


# --- KV cache ----------------------------------------------------------------------------------
LAYERS = (3, 7)
"""Layer numbers of the cache's layers (a pipeline stage's: not 1..n)."""


def _meta(rows, cols, block):
    return torch.stack([torch.full((rows, cols), block), torch.ones(rows, cols, dtype=torch.long)], 1)


def test_kv_cache_extend_commit_keep_match_concatenation():
    cache = BlockKVCache(layer_numbers=LAYERS, batch=3, capacity=10, groups=2, head_dim=4, dtype=torch.float32,
                         device="cpu")
    gen = torch.Generator().manual_seed(0)
    reference = [torch.empty(0, 3, 2, 4) for _ in LAYERS]  # committed keys per layer, [S, B, G, D]
    for width, commit in [(4, 4), (2, 0), (4, 2), (2, 2)]:  # prefill, round, fused round, commit
        meta = _meta(3, width, 0)
        with cache.forward(meta) as view:
            for i, number in enumerate(LAYERS):
                key = torch.randn(width, 3, 2, 4, generator=gen)
                k_all, v_all, k_meta = view.extend(number, key, key * 2, meta)
                torch.testing.assert_close(k_all, torch.cat([reference[i], key]), rtol=0, atol=0)
                torch.testing.assert_close(v_all, 2 * torch.cat([reference[i], key]), rtol=0, atol=0)
                assert k_meta.shape == (3, 2, reference[i].shape[0] + width)
                reference[i] = torch.cat([reference[i], key[:commit]])
        cache.commit(commit)
    assert cache.frontier == 8 and cache.lengths.tolist() == [8, 8, 8]
    cache.keep(torch.tensor([0, 2]))
    assert cache.rows == 2
    meta = _meta(2, 2, 1)
    with cache.forward(meta) as view:
        key = torch.randn(2, 2, 2, 4)
        k_all, _, _ = view.extend(LAYERS[0], key, key, meta)
        torch.testing.assert_close(k_all, torch.cat([reference[0][:, [0, 2]], key]), rtol=0, atol=0)
        with pytest.raises(AssertionError, match="no slot"):  # a layer number the cache was not built for
            view.extend(5, key, key, meta)
    with pytest.raises(AssertionError):  # layer 7 did not write this round
        cache.commit(2)


@pytest.mark.parametrize("values", ["device", "host", "host_verified"])
def test_kv_cache_per_row_commits_match_concatenation(values):
    """Rows committing different counts (the asynchronous sampler): per row, the non-PAD keys are
    exactly its committed keys followed by the current ones, the current ones are the last Sq keys,
    and every key handed out is finite (holes are read, masked, by attention). The largest count and
    the frontier read from the device, or given as host ints (the sampler's way: no sync), checked
    against the device under ``verify``."""
    batch, width = 4, 3
    cache = BlockKVCache(layer_numbers=LAYERS, batch=batch, capacity=40, groups=2, head_dim=4, dtype=torch.float32,
                         device="cpu")
    cache.verify = values == "host_verified"
    gen = torch.Generator().manual_seed(1)
    reference = [[torch.empty(0, 2, 4) for _ in range(batch)] for _ in LAYERS]  # [layer][row] committed [S, G, D]
    ref_meta = [torch.empty(2, 0, dtype=torch.long) for _ in range(batch)]  # [row] committed [2, S]
    rows = list(range(batch))  # original ids of the active rows
    plan = [[3, 3, 3, 3], [0, 2, 3, 1], [3, 0, 0, 2], [1, 1, 0, 0], [0, 3, 2, 3], [2, 0, 3, 0]]
    for i, counts in enumerate(plan):
        if i == 4:  # drop rows 0 and 2 (finished)
            rows = [rows[1], rows[3]]
            kept_longest = max(reference[0][r].shape[0] for r in rows)
            cache.keep(torch.tensor([1, 3]), frontier=None if values == "device" else kept_longest)
        counts = torch.tensor([counts[r] for r in rows])
        n = len(rows)
        meta = torch.stack([torch.full((n, width), i), torch.randint(1, 3, (n, width), generator=gen)], 1)
        with cache.forward(meta) as view:
            for li, number in enumerate(LAYERS):
                key = torch.randn(width, n, 2, 4, generator=gen)  # [Sq, b, G, D]
                k_all, v_all, k_meta = view.extend(number, key, key * 2, meta)
                assert torch.isfinite(k_all).all() and torch.isfinite(v_all).all()
                torch.testing.assert_close(k_all[-width:], key, rtol=0, atol=0)
                assert torch.equal(k_meta[:, :, -width:], meta)
                for j, r in enumerate(rows):
                    real = k_meta[j, 1] != masks.PAD  # [Sk]
                    expected = torch.cat([reference[li][r], key[:, j]])
                    torch.testing.assert_close(k_all[real, j], expected, rtol=0, atol=0)
                    torch.testing.assert_close(v_all[real, j], 2 * expected, rtol=0, atol=0)
                    if li == 0:
                        assert torch.equal(k_meta[j][:, real], torch.cat([ref_meta[r], meta[j]], 1))
                    reference[li][r] = torch.cat([reference[li][r], key[: int(counts[j]), j]])
                if li == 0:
                    for j, r in enumerate(rows):
                        ref_meta[r] = torch.cat([ref_meta[r], meta[j, :, : int(counts[j])]], 1)
        lengths = [reference[0][r].shape[0] for r in rows]
        if values == "device":
            cache.commit(counts)
        else:
            cache.commit(counts, largest=int(counts.max()), frontier=max(lengths))
        assert cache.lengths[:n].tolist() == lengths and cache.frontier == max(lengths)
    assert cache.frontier < sum(max(c) for c in plan)  # rows behind fill their holes


def test_kv_cache_guards():
    cache = BlockKVCache(layer_numbers=[1], batch=2, capacity=4, groups=1, head_dim=2, dtype=torch.float32,
                         device="cpu")
    with pytest.raises(AssertionError):  # overflow
        with cache.forward(_meta(2, 5, 0)):
            pass
    meta = _meta(2, 2, 0)
    with cache.forward(meta) as view:
        with pytest.raises(AssertionError):  # metadata other than the forward's
            view.extend(1, torch.zeros(2, 2, 1, 2), torch.zeros(2, 2, 1, 2), meta.clone())
    with pytest.raises(AssertionError):  # extend outside a forward
        cache.extend(1, torch.zeros(2, 2, 1, 2), torch.zeros(2, 2, 1, 2), meta)
    with pytest.raises(AssertionError):
        cache.commit(3)  # wider than the round
    cache.commit(0)
    with pytest.raises(AssertionError):
        cache.keep(torch.tensor([1, 0]))  # not ascending
    cache.verify = True  # host-supplied values are checked against the device
    with cache.forward(meta) as view:
        view.extend(1, torch.zeros(2, 2, 1, 2), torch.zeros(2, 2, 1, 2), meta)
    with pytest.raises(AssertionError):
        cache.commit(torch.tensor([1, 2]), largest=2, frontier=1)  # the longest row has 2
    with pytest.raises(ValueError, match="distinct"):
        BlockKVCache(layer_numbers=[1, 1], batch=2, capacity=4, groups=1, head_dim=2, dtype=torch.float32,
                     device="cpu")


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_temperature_one_sampling_distribution(top_p):
    """The temperature-1 path (no top-k): the softmax without the suppressed id, cut to the nucleus."""
    torch.manual_seed(1)
    logits = (torch.randn(1, 12) * 1.5).expand(20000, 12).contiguous()
    ids, conf = sampling.choose_tokens(logits, temperature=1.0, top_p=top_p, uniform=torch.rand(20000),
                                       suppress_id=int(logits[0].argmax()), group=None)
    probs = logits[0].softmax(-1)
    expected = probs.clone()
    expected[logits[0].argmax()] = 0.0
    expected /= expected.sum()
    expected[~_reference_nucleus(expected[None], top_p)[0]] = 0.0
    expected /= expected.sum()
    freq = torch.bincount(ids, minlength=12).float() / ids.numel()
    assert (freq - expected).abs().max() < 0.015
    torch.testing.assert_close(conf, probs[ids])  # raw softmax, suppressed id included


def test_rows_rounds_counts_rounds_that_committed_a_response_token():
    """tok/round's denominator: a round that only filled positions after the EOS is not counted, so
    static decoding reads exactly 1 token per round (it read 0.80-0.93 when such rounds counted)."""
    from nemo_opdlm.models import grid
    from nemo_opdlm.rollout.rows import rows_rounds

    # row 0, static, block 4: EOS at position 1 decoded in round 2; positions 2, 3 (after EOS) in rounds 0, 3
    # row 1, dynamic: block 0 in 2 rounds (3 + 1 tokens); block 1: round 0 commits 2 valid tokens, round 1
    # only the 2 positions past the length limit
    step_map = torch.tensor([[1, 2, 0, 3, -1, -1, -1, -1],
                             [0, 0, 1, 0, 0, 0, 1, 1]])
    valid = torch.tensor([[True, True, False, False, False, False, False, False],
                          [True, True, True, True, True, True, False, False]])
    blocks = (torch.arange(8) // 4).expand(2, -1)
    assert rows_rounds(step_map, valid, blocks, 4) == 2 + 2 + 1
    assert int(valid[0].sum()) / rows_rounds(step_map[:1], valid[:1], blocks[:1], 4) == 1.0  # static: 2 tokens, 2 rounds
    assert int(valid[1].sum()) / rows_rounds(step_map[1:], valid[1:], blocks[1:], 4) == 2.0  # 6 tokens, 3 rounds
    # The absolute grid: a prompt of P = 4k + 3 leaves one response position in the first block, so
    # response positions 0 | 1-4 | 5-7 fall in blocks 0 | 1 | 2; row 1's rounds regroup accordingly:
    # block 0: round 0; block 1: rounds 0, 1; block 2: round 0 (position 7 is past the limit).
    shifted = grid.block_index(torch.tensor([3]), 8, 4)
    assert shifted.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2]]
    assert rows_rounds(step_map[1:], valid[1:], shifted, 4) == 1 + 2 + 1
