"""The block sampler on a tiny random student (fp32, CPU, one rank), against independent references."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nemo_opdlm.models import masks
from nemo_opdlm.models.student import build_chunks
from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.rollout.sampler import BlockSampler, left_pad
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
from tests.tiny import sampler_config, tiny_model

MASK = 95
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]


@pytest.fixture(scope="module")
def model():
    """Tiny student; its output layer is scaled so that confidences spread over (0, 1)."""
    with runtime(ParallelLayout()) as rt:
        chunks = build_chunks(tiny_model(vocab_size=96, init_method_std=0.1), rt.ctx)
        with torch.no_grad():
            chunks[0].output_layer.weight.mul_(10.0)
        yield chunks


@pytest.fixture(scope="module")
def prompts():
    return left_pad(PROMPTS, pad_id=0)


def _run(chunks, prompts, **kw):
    """The sampler's rollout; on the response grid unless asked (most tests below pin its block
    arithmetic: blocks at columns 4b of the response; the absolute grid has tests of its own)."""
    kw = dict(dict(mask_token_id=MASK, max_new_tokens=22, temperature=0.0, seed=7, block_grid="response"), **kw)
    return BlockSampler(chunks, sampler_config(**kw)).generate(*prompts)


def _same(a, b):
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.step_map, b.step_map), (a.step_map, b.step_map)
    assert torch.equal(a.valid, b.valid)


@pytest.mark.parametrize(
    "settings",
    [
        dict(mode="static"),
        dict(mode="dynamic", threshold=0.5),
        dict(mode="dynamic", threshold=0.5, block_size=8, steps_per_block=4),
        dict(mode="dynamic", threshold=0.7, temperature=1.0, top_k=30, top_p=0.95),
    ],
)
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid", ["response", "absolute"])
def test_cached_equals_uncached(model, prompts, settings, shift, grid):
    """The cache (rows asynchronous; committing rows forwarded apart, or with PAD commit slots) and the
    lockstep reference without it decode the same tokens and rounds, for an unshifted and a shifted
    model (a block's first token predicted from the clean token before it, kept across rounds), on
    both block grids (the prompts' lengths 5, 2, 1, 7, 3 leave 1, 2, 1, 3, 3 prompt tokens in the
    first block of the absolute grid at block 4)."""
    settings = dict(settings, shift_logits=shift, block_grid=grid)
    uncached = _run(model, prompts, use_cache=False, **settings)
    _same(_run(model, prompts, use_cache=True, **settings), uncached)
    _same(_run(model, prompts, use_cache=True, pad_commit_slots=True, **settings), uncached)
    if settings.get("mode") == "dynamic":
        assert uncached.metrics.tokens_per_round > 1.0  # the threshold did unmask several per round


def test_cached_equals_uncached_local_backend(model, prompts):
    """megatron-core's DotProductAttention path (contiguous cache views) too."""
    chunks = build_chunks(tiny_model(vocab_size=96, attention_backend="local"), model[0].parallel)
    _same(_run(chunks, prompts, use_cache=True), _run(chunks, prompts, use_cache=False))


def _reference_block1(chunks, prompt_ids, prompt_lens, steps):
    """Greedy AR loop: [prompt | x_<i | MASK] under the causal (block size 1) layout, argmax at MASK."""
    net = chunks[0]
    batch, width = prompt_ids.shape
    out = torch.empty(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for i in range(steps):
            ids = torch.cat([prompt_ids, out, torch.full((batch, 1), MASK)], dim=1)
            layout = masks.build_layout(prompt_lens, width, torch.ones(batch, i + 1, dtype=torch.bool), 1, False)
            logits = net(ids, layout.position_ids, layout.meta)[:, -1]  # [B, V]
            logits[:, MASK] = float("-inf")
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


def test_static_block1_equals_greedy_ar(model, prompts):
    reference = _reference_block1(model, *prompts, steps=12)
    for use_cache in (True, False):
        got = _run(model, prompts, mode="static", block_size=1, steps_per_block=1, max_new_tokens=12,
                   use_cache=use_cache)
        assert torch.equal(got.tokens, reference)
        assert (got.step_map == 0).all() and got.valid.all()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_rows_decode_as_a_static_run(model, prompts, use_cache, temperature):
    """``static_rows``: those rows decode exactly as in an all-static run, the others exactly as in an
    all-dynamic one (each row's decisions depend on its own context and uniforms only)."""
    kw = dict(use_cache=use_cache, temperature=temperature, threshold=0.5)
    rows = torch.tensor([True, False, True, False, False])
    dynamic = _run(model, prompts, mode="dynamic", **kw)
    static = _run(model, prompts, mode="static", use_cache=use_cache, temperature=temperature)
    cfg = sampler_config(mask_token_id=MASK, max_new_tokens=22, seed=7, mode="dynamic", block_grid="response", **kw)
    mixed = BlockSampler(model, cfg).generate(*prompts, static_rows=rows)
    for got, want, sel in ((mixed, static, rows), (mixed, dynamic, ~rows)):
        assert torch.equal(got.tokens[sel], want.tokens[sel])
        assert torch.equal(got.step_map[sel], want.step_map[sel])
    assert not torch.equal(static.step_map, dynamic.step_map)  # the two rules differ on these prompts
    with pytest.raises(ValueError, match="static_rows"):
        BlockSampler(model, cfg).generate(*prompts, static_rows=rows[:2])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("grid", ["response", "absolute"])
def test_per_row_length_limits(model, prompts, use_cache, grid):
    """``max_new_tokens`` per row: each row decodes exactly as in a run whose limit is its own, and
    nothing beyond its limit is valid (block diffusion on both grids, and AR decoding)."""
    limits = torch.tensor([22, 8, 13, 22, 5])
    for kw in (dict(mode="dynamic", threshold=0.5), dict(mode="ar")):
        sampler = BlockSampler(model, sampler_config(mask_token_id=MASK, max_new_tokens=22, temperature=0.0, seed=7,
                                                     use_cache=use_cache, block_grid=grid, **kw))
        mixed = sampler.generate(*prompts, limits)
        method = kw["mode"]
        for row, limit in enumerate(limits.tolist()):
            alone = _run(model, prompts, max_new_tokens=limit, use_cache=use_cache, block_grid=grid, **kw)
            width = alone.tokens.shape[1]
            assert torch.equal(mixed.valid[row, :width], alone.valid[row]), (method, row)
            assert torch.equal(mixed.tokens[row, :width][alone.valid[row]], alone.tokens[row][alone.valid[row]])
            assert not mixed.valid[row, limit:].any()
    with pytest.raises(ValueError, match="shape"):
        sampler.generate(*prompts, limits[:2])
    with pytest.raises(ValueError, match=">= 1"):
        sampler.generate(*prompts, torch.tensor([4, 0, 4, 4, 4]))


def test_shifted_block1_equals_ar(model, prompts):
    """A shifted model with block size 1 predicts each token from the clean token before it: exactly
    causal next-token decoding, whatever [MASK] does (with and without the cache, greedy and sampled)."""
    for temperature in (0.0, 1.0):
        ar = _run(model, prompts, mode="ar", max_new_tokens=12, temperature=temperature)
        for use_cache in (True, False):
            got = _run(model, prompts, mode="static", block_size=1, steps_per_block=1, max_new_tokens=12,
                       use_cache=use_cache, shift_logits=True, temperature=temperature)
            assert torch.equal(got.tokens[got.valid], ar.tokens[ar.valid]), (got.tokens, ar.tokens)


def test_shifted_first_token_is_the_prompts_prediction(model, prompts):
    """Shifted, the first response token is the prompt's own next-token prediction (greedy): the
    argmax of the logits at the last prompt column, read block-causally."""
    net = model[0]
    prompt_ids, prompt_lens = prompts
    layout = masks.build_layout(prompt_lens, prompt_ids.shape[1], torch.ones(len(PROMPTS), 0, dtype=torch.bool),
                                4, with_xt=False)
    with torch.no_grad():
        logits = net(prompt_ids, layout.position_ids, layout.meta)[:, -1]  # [B, V]
    logits[:, MASK] = float("-inf")
    for use_cache in (True, False):
        got = _run(model, prompts, mode="static", use_cache=use_cache, shift_logits=True)
        assert torch.equal(got.tokens[:, 0], logits.argmax(-1))
        assert torch.equal(got.step_map[:, 0] >= 0, torch.ones(len(PROMPTS), dtype=torch.bool))


def test_ar_mode_equals_next_token_loop(model, prompts):
    """mode='ar': the causal teacher's next-token decoding, with and without the cache."""
    net = chunks = model
    prompt_ids, prompt_lens = prompts
    batch, width = prompt_ids.shape
    out = torch.empty(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for i in range(10):
            ids = torch.cat([prompt_ids, out], dim=1)
            layout = masks.build_layout(prompt_lens, width, torch.ones(batch, i, dtype=torch.bool), 1, False)
            logits = net[0](ids, layout.position_ids, layout.meta)[:, -1]
            logits[:, MASK] = float("-inf")
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):
        got = _run(chunks, prompts, mode="ar", max_new_tokens=10, use_cache=use_cache)
        assert torch.equal(got.tokens, out)


def test_dynamic_at_one_equals_static(model, prompts):
    """No confidence is strictly above 1: the dynamic rule then unmasks the static count only."""
    for temperature in (0.0, 1.0):
        static = _run(model, prompts, mode="static", temperature=temperature)
        _same(_run(model, prompts, mode="dynamic", threshold=1.0, temperature=temperature), static)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_every_token_has_a_round(model, prompts, mode):
    got = _run(model, prompts, mode=mode, threshold=0.6, temperature=1.0, max_new_tokens=24)
    bs, steps = 4, 4
    assert got.tokens.shape == (5, 24) and got.valid.all()  # no EOS configured: all 24 decoded
    assert ((got.step_map >= 0) & (got.step_map < steps)).all()
    assert torch.equal(got.block_index, (torch.arange(24) // bs).expand(5, -1))
    per_round = torch.stack([(got.step_map.view(5, 6, bs) == r).sum(-1) for r in range(steps)], -1)  # [B, nb, steps]
    if mode == "static":
        assert (per_round == 1).all()
    else:  # at least one per round until the block is done, nothing after
        done = per_round.cumsum(-1) == bs
        first_done = done.float().argmax(-1, keepdim=True)
        active = torch.arange(steps) <= first_done
        assert ((per_round >= 1) == active).all()
    assert got.metrics.tokens_generated == 5 * 24
    rounds = int((got.step_map.view(5, 6, bs).amax(-1) + 1).sum())
    assert got.metrics.tokens_per_round == pytest.approx(120 / rounds)


def test_rows_advance_asynchronously(model, prompts):
    """With the cache each row moves on when its own block is done: batch rounds = the slowest row's
    own rounds; the lockstep reference takes the slowest row per block, summed over blocks."""
    settings = dict(mode="dynamic", threshold=0.6, temperature=1.0, max_new_tokens=24)
    cached = _run(model, prompts, use_cache=True, **settings)
    uncached = _run(model, prompts, use_cache=False, **settings)
    _same(cached, uncached)
    per_block = cached.step_map.view(5, 6, 4).amax(-1) + 1  # [B, nb] rounds each row spent on each block
    assert cached.metrics.rounds == int(per_block.sum(-1).max())
    assert uncached.metrics.rounds == int(per_block.amax(0).sum())
    assert cached.metrics.rounds < uncached.metrics.rounds


def test_length_limit_and_partial_block(model, prompts):
    got = _run(model, prompts, max_new_tokens=10)
    assert got.tokens.shape == (5, 12)  # 3 whole blocks
    assert got.valid[:, :10].all() and not got.valid[:, 10:].any()
    assert (got.step_map >= 0).all()  # the tail of the last block is decoded, but it is padding
    assert got.metrics.tokens_generated == 50 and got.metrics.frac_finished_eos == 0.0


def test_eos_finishes_rows(model, prompts):
    """EOS ends a row after its block; the other rows decode exactly as without EOS."""
    free = _run(model, prompts, mode="dynamic", threshold=0.6, temperature=1.0, max_new_tokens=24)
    eos = int(free.tokens[0, 9])  # a token row 0 samples in block 2
    got = _run(model, prompts, mode="dynamic", threshold=0.6, temperature=1.0, max_new_tokens=24,
               eos_token_ids=(eos,), pad_token_id=0)
    bs, finished = 4, 0
    for row in range(5):
        hits = (free.tokens[row] == eos).nonzero()
        if hits.numel() == 0:
            assert torch.equal(got.tokens[row], free.tokens[row]) and got.valid[row].all()
            assert not got.finished_eos[row]
            continue
        finished += 1
        first = int(hits[0])
        end = (first // bs + 1) * bs  # the EOS block is completed
        assert torch.equal(got.tokens[row, :end], free.tokens[row, :end])
        assert torch.equal(got.step_map[row, :end], free.step_map[row, :end])
        assert (got.tokens[row, end:] == 0).all() and (got.step_map[row, end:] == -1).all()
        assert got.valid[row, : first + 1].all() and not got.valid[row, first + 1:].any()
        assert got.finished_eos[row]
    assert finished >= 1
    assert got.metrics.frac_finished_eos == pytest.approx(finished / 5)
    assert got.metrics.tokens_generated == int(got.valid.sum())


def test_sampling_is_seeded_and_modes_restored(model, prompts):
    chunks = model
    chunks[0].train()
    a = _run(chunks, prompts, temperature=1.0, seed=3)
    b = _run(chunks, prompts, temperature=1.0, seed=3)
    c = _run(chunks, prompts, temperature=1.0, seed=4)
    _same(a, b)
    assert not torch.equal(a.tokens, c.tokens)
    assert chunks[0].training and all(m.training for m in chunks[0].modules())
    assert all(m.context is None for m in chunks[0].attention)  # no forward context left behind
    assert all(p.grad is None for p in chunks[0].parameters())
    chunks[0].eval()


class _HostReads(TorchFunctionMode):
    """Counts reads of tensor values on the host made by the project's code (``nemo_opdlm``).

    On a GPU each one is a sync: the host waits for every queued kernel. Counted: ``bool``/``int``/
    ``float``/``index`` conversions, ``item``, ``tolist``, ``numpy``, ``nonzero``-like calls (their
    output size is a device value) and boolean-mask indexing (a hidden ``nonzero``). Calls made by
    torch's own Python code are charged to the project line that called torch; calls made by
    megatron-core are not counted (e.g. its check of the CPU RNG state, a host tensor on a GPU
    too). A torch-function mode sees every such call without patching ``torch.Tensor`` (patched
    and restored dunder methods change how torch treats tensors for the rest of the process), and
    calls re-dispatched below it (the CPU compatibility layer's mode) are not seen twice.
    """

    READS = frozenset({
        torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
        torch.Tensor.argwhere, torch.argwhere, torch.Tensor.masked_select, torch.masked_select,
        torch.Tensor.unique, torch.unique,
    })
    INDEXING = frozenset({torch.Tensor.__getitem__, torch.Tensor.__setitem__})

    def __init__(self) -> None:
        super().__init__()
        self._torch_dir = os.path.dirname(torch.__file__) + os.sep
        self._project_dir = os.path.dirname(os.path.dirname(sys.modules[BlockSampler.__module__].__file__)) + os.sep
        self.count = 0
        self.sites: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS or (func in self.INDEXING and _bool_mask_index(*args)):
            self._charge()
        return func(*args, **(kwargs or {}))

    def _charge(self) -> None:
        frame = sys._getframe(2)  # the caller of the intercepted function
        while frame is not None and frame.f_code.co_filename.startswith(self._torch_dir):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(self._project_dir):
            site = f"{frame.f_code.co_filename[len(self._project_dir):]}:{frame.f_lineno}"
            self.sites[site] = self.sites.get(site, 0) + 1
            self.count += 1


def _bool_mask_index(tensor, index, *value) -> bool:
    """Indexing with a boolean tensor (it sizes its result, or its writes, from the device)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


@pytest.mark.parametrize("pad_commit_slots", [True, False])
def test_cached_round_reads_the_device_once(model, prompts, pad_commit_slots):
    """One host read per cached round (the GPU default, ``pad_commit_slots``, and the grouped CPU
    path alike), rounds where rows finish included: on a GPU each read would stall the host until
    the device caught up, so the next forward's launches could not overlap this one's kernels.

    Bound: ``syncs <= rounds + 6`` (the prompt check and the records at the end read a few values
    once per call), and between a short and a long rollout the extra reads are at most the extra
    rounds. Sampling with top-k/top-p (``choose_tokens``) and EOS (compaction) are on the path.
    """
    settings = dict(mode="dynamic", threshold=0.6, temperature=1.0, top_k=40, top_p=0.95,
                    pad_commit_slots=pad_commit_slots, pad_token_id=0)
    free = _run(model, prompts, max_new_tokens=40, **settings)
    eos = int(free.tokens[0, 13])  # row 0 finishes by block 3, the others at their own time or never
    counts = {}
    for max_new in (20, 40):
        reference = _run(model, prompts, max_new_tokens=max_new, eos_token_ids=(eos,), use_cache=False, **settings)
        with _HostReads() as reads:
            got = _run(model, prompts, max_new_tokens=max_new, eos_token_ids=(eos,), **settings)
        _same(got, reference)
        rounds = got.metrics.rounds
        assert reads.count <= rounds + 6, (reads.count, rounds, reads.sites)
        counts[max_new] = (reads.count, rounds)
    assert 0 < got.finished_eos.sum() < 5  # rows finished early: compaction was exercised
    (short_reads, short_rounds), (long_reads, long_rounds) = counts[20], counts[40]
    assert long_rounds > short_rounds and long_reads - short_reads <= long_rounds - short_rounds, counts


@pytest.mark.parametrize("pad_commit_slots", [True, False])
def test_cache_host_bookkeeping_matches_the_device(model, prompts, monkeypatch, pad_commit_slots):
    """The frontier, largest commit and row indices the sampler hands the cache as host ints (from
    its one read per round) are what the device holds: ``BlockKVCache.verify`` checks each one."""
    settings = dict(mode="dynamic", threshold=0.6, temperature=1.0, max_new_tokens=24,
                    pad_commit_slots=pad_commit_slots, pad_token_id=0)
    eos = int(_run(model, prompts, **settings).tokens[1, 6])
    monkeypatch.setattr(BlockKVCache, "verify", True)
    got = _run(model, prompts, eos_token_ids=(eos,), **settings)
    _same(got, _run(model, prompts, eos_token_ids=(eos,), use_cache=False, **settings))
    assert got.finished_eos.any()


def test_rollout_lifts_the_cpu_device_mode(model):
    """On CPU the compatibility layer's device mode is off while decoding and back on afterwards."""
    from torch.overrides import _get_current_function_mode_stack

    from nemo_opdlm.rollout.sampler import rollout_mode
    from nemo_opdlm.runtime import cpu_compat

    if not cpu_compat.cpu_compat_enabled():
        pytest.skip("the device mode only exists on CPU")
    assert _get_current_function_mode_stack()[-1] is cpu_compat._MODE
    with rollout_mode(model):
        assert cpu_compat._MODE not in _get_current_function_mode_stack()
    assert _get_current_function_mode_stack()[-1] is cpu_compat._MODE


def _engine_reference(net, prompt: list[int], new: int, block: int, threshold: float | None, shift: bool):
    """One row decoded on the absolute grid as the serving engines describe it, without the frame,
    the cache or the records: blocks cut from position 0; each round forwards the clean tokens of
    the finished blocks (block-causal) and the current block (prompt tail given, decided tokens and
    [MASK]s, all noisy); greedy; the most confident masked position unmasks (static), or every one
    above ``threshold`` and at least one. Returns (response tokens, step_map) of ``new`` tokens."""
    seq = list(prompt)  # clean tokens so far, prompt then response
    steps: list[int] = []
    while len(seq) < len(prompt) + new:
        start = len(seq) // block * block  # the current block's first position
        x = seq[start:] + [MASK] * (block - (len(seq) - start))  # [block] tail given, masks after
        st = [-2] * (len(seq) - start) + [-1] * (block - (len(seq) - start))
        for rnd in range(block):
            ids = torch.tensor([seq[:start] + x])
            pos = torch.arange(start + block)[None]
            kind = [masks.CLEAN] * start + [masks.NOISY] * block
            blocks = [p // block for p in range(start + block)]
            meta = torch.tensor([[blocks, kind]])
            with torch.no_grad():
                logits = net(ids, pos, meta)[0].float()  # [S, V]
            if shift:  # position j from j - 1: the block's first from the last clean token (none when
                # the block starts the sequence: its first position is then a given prompt token)
                logits = torch.cat([logits[max(start - 1, 0): max(start, 1)], logits[start: start + block - 1]])
            else:
                logits = logits[start:]
            logits[:, MASK] = float("-inf")
            probs = logits.softmax(-1)
            conf, cand = probs.max(-1)
            masked = torch.tensor([s == -1 for s in st])
            conf = torch.where(masked, conf, -1.0)
            pick = torch.zeros(block, dtype=torch.bool)
            pick[int(conf.argmax())] = True  # ties: the leftmost
            if threshold is not None:
                pick |= masked & (conf > threshold)
            for j in pick.nonzero().flatten().tolist():
                x[j], st[j] = int(cand[j]), rnd
            if -1 not in st:
                break
        seq = seq[:start] + x
        steps += [s for s in st if s != -2]
    return seq[len(prompt): len(prompt) + new], steps[:new]


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("shift", [False, True])
def test_absolute_grid_is_the_engines_decoding(model, prompts, threshold, shift):
    """The absolute grid decodes, token for token and round for round, what a serving engine's
    description of it gives: the prompt's last ``P mod b`` tokens share the first denoising block
    with the first masks (given, attending both ways), later blocks whole, each row on its own."""
    mode = dict(mode="static") if threshold is None else dict(mode="dynamic", threshold=threshold)
    for use_cache in (True, False):
        got = _run(model, prompts, max_new_tokens=14, block_grid="absolute", shift_logits=shift, use_cache=use_cache,
                   **mode)
        for row, prompt in enumerate(PROMPTS):
            tokens, steps = _engine_reference(model[0], prompt, 14, 4, threshold, shift)
            assert got.tokens[row, :14].tolist() == tokens, (row, use_cache)
            assert got.step_map[row, :14].tolist() == steps, (row, use_cache)
            head = len(prompt) % 4
            assert got.block_index[row, :14].tolist() == [(head + i) // 4 for i in range(14)]
    assert got.block_grid == "absolute"


def test_aligned_prompts_decode_alike_on_both_grids(model):
    """Prompts whose length is a multiple of the block size: the two grids are one."""
    aligned = left_pad([[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16]], pad_id=0)
    for mode in (dict(mode="static"), dict(mode="dynamic", threshold=0.5, temperature=1.0)):
        a = _run(model, aligned, block_grid="absolute", **mode)
        b = _run(model, aligned, block_grid="response", **mode)
        _same(a, b)
        assert torch.equal(a.block_index, b.block_index)
        assert a.metrics.tokens_per_round == b.metrics.tokens_per_round
