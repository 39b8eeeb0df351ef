"""The decoder as student and teacher: back ends agree, the mask reaches attention, from_teacher."""

import pytest
import torch

from nemo_opdlm.models import masks
from nemo_opdlm.models.attention import BlockAttention
from nemo_opdlm.models.config import ConfigError, DiffusionConfig
from nemo_opdlm.models.student import build_student, from_teacher
from nemo_opdlm.models.teacher import build_teacher
from nemo_opdlm.runtime.context import ParallelContext
from tests.tiny import sequence_layout, tiny_model


def set_backend(model, backend):
    for module in model.modules():
        if isinstance(module, BlockAttention):
            module.backend = backend


def training_row(batch=2, prompt_width=6, response_len=9, block=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.tensor([6, 3])[:batch]
    valid = torch.arange(response_len)[None, :] < torch.tensor([9, 7])[:batch, None]
    layout = masks.build_layout(prompt_lens, prompt_width, valid, block, with_xt=True)
    ids = torch.randint(0, 100, (batch, layout.meta.shape[-1]), generator=g)
    return ids, layout


@pytest.fixture(scope="module")
def student(single_rank):
    torch.manual_seed(0)
    cfg = tiny_model(attention_backend="local", num_layers=3)
    return build_student(cfg, DiffusionConfig(block_size=4, mask_token_id=99), single_rank.ctx)[0]


@pytest.mark.parametrize("query_tile", [None, 4])
def test_attention_backends_agree(student, monkeypatch, query_tile):
    """local (megatron dense mask) == sdpa == flex forward, fp32 within 1e-5; sdpa grads == local grads.
    With 4-token query tiles the sdpa path runs tiled (``plan_tiles``, as long rows do): same numbers."""
    from nemo_opdlm.models import attention

    tiled_calls = []
    if query_tile is not None:
        monkeypatch.setattr(attention, "QUERY_TILE", query_tile)
        real = attention.tiled_sdpa
        monkeypatch.setattr(attention, "tiled_sdpa", lambda *a: tiled_calls.append(1) or real(*a))
    ids, layout = training_row()
    outputs, grads = {}, {}
    for backend in ("local", "sdpa", "flex"):
        set_backend(student, backend)
        student.zero_grad()
        if backend == "flex":
            with torch.no_grad():  # FlexAttention has no backward on CPU
                outputs[backend] = student(ids, layout.position_ids, layout.meta)[..., :100]
            continue
        logits = student(ids, layout.position_ids, layout.meta)[..., :100]
        logits.float().pow(2).mean().backward()
        outputs[backend] = logits.detach()
        grads[backend] = [p.grad.clone() for p in student.parameters()]
    set_backend(student, "local")
    assert len(tiled_calls) == (3 if query_tile else 0)  # one per layer
    assert (outputs["sdpa"] - outputs["local"]).abs().max() <= 1e-5
    assert (outputs["flex"] - outputs["local"]).abs().max() <= 1e-5
    for g_local, g_sdpa in zip(grads["local"], grads["sdpa"]):
        assert torch.allclose(g_local, g_sdpa, atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_mask_reaches_attention(student):
    """Changing an xt token of block 1 changes only xt block 1's logits; an x0 token of block 1
    changes x0 blocks >= 1 and xt blocks >= 2, never xt block 1 or anything earlier."""
    ids, layout = training_row(batch=1)
    base = student(ids, layout.position_ids, layout.meta)
    x0, xt = layout.x0_slice, layout.xt_slice

    def changed(col):
        ids2 = ids.clone()
        ids2[0, col] = (ids2[0, col] + 1) % 100
        out = student(ids2, layout.position_ids, layout.meta)
        return ((out - base).abs().amax(-1) > 0)[0]

    diff = changed(xt.start + 5)  # xt block 1
    assert diff[xt.start + 4: xt.start + 8].all()
    assert not diff[: xt.start + 4].any() and not diff[xt.start + 8:].any()
    diff = changed(x0.start + 5)  # x0 block 1
    assert not diff[: x0.start + 4].any()
    assert diff[x0.start + 4: x0.stop].all()
    assert not diff[xt.start: xt.start + 8].any()
    assert diff[xt.start + 8:].all()


@torch.no_grad()
def test_padding_does_not_leak(student):
    """Left padding of the prompt and padding after the response never change real tokens' logits."""
    prompt = torch.randint(0, 100, (1, 3))
    response = torch.randint(0, 100, (1, 5))
    def run(pad_left, pad_right, pad_token):
        valid = torch.tensor([[True] * 5 + [False] * pad_right])
        layout = masks.build_layout(torch.tensor([3]), 3 + pad_left, valid, 4, with_xt=True)
        pads = torch.full((1, pad_left), pad_token)
        tail = torch.full((1, pad_right), pad_token)
        row = torch.cat([pads, prompt, response, tail, response, tail], 1)
        out = student(row, layout.position_ids, layout.meta)
        keep = torch.cat([torch.arange(pad_left, pad_left + 8),
                          torch.arange(pad_left + 8 + pad_right, pad_left + 13 + pad_right)])
        return out[0, keep]
    ref = run(0, 0, 0)
    assert torch.allclose(run(2, 3, 7), ref, atol=1e-5)
    assert torch.allclose(run(5, 1, 42), ref, atol=1e-5)


@torch.no_grad()
def test_from_teacher_block_one_reproduces_teacher(single_rank):
    cfg = tiny_model(attention_backend="sdpa")
    torch.manual_seed(1)
    teacher = build_teacher(cfg, single_rank.ctx)
    torch.manual_seed(2)
    student = build_student(cfg, DiffusionConfig(block_size=4, mask_token_id=99), single_rank.ctx)
    assert not torch.equal(student[0].output_layer.weight, teacher[0].output_layer.weight)
    from_teacher(student, teacher)
    for (n, s), (_, t) in zip(student[0].state_dict().items(), teacher[0].state_dict().items()):
        if torch.is_tensor(s):
            assert torch.equal(s, t), n
    assert all(p.requires_grad for p in student[0].parameters())
    assert not any(p.requires_grad for p in teacher[0].parameters())

    ids = torch.randint(0, 100, (2, 11))
    causal = sequence_layout(2, 11, block_size=1)
    t_logits = teacher[0](ids, causal.position_ids, causal.meta)
    student[0].eval()
    s_logits = student[0](ids, causal.position_ids, causal.meta)
    assert torch.equal(s_logits, t_logits)
    # an independent causal reference: with a causal mask, truncating the future changes nothing
    assert torch.allclose(teacher[0](ids[:, :6], causal.position_ids[:, :6], causal.meta[:, :, :6]),
                          t_logits[:, :6], atol=1e-5)
    block = sequence_layout(2, 11, block_size=4)
    assert not torch.allclose(student[0](ids, block.position_ids, block.meta), t_logits)


def test_vocab_padding_is_masked(student):
    ids, layout = training_row()
    with torch.no_grad():
        logits = student(ids, layout.position_ids, layout.meta)
    assert logits.shape[-1] == 104  # 100 padded to a multiple of 8
    assert (logits[..., 100:] == torch.finfo(logits.dtype).min).all()
    assert torch.isfinite(logits.log_softmax(-1)).all()
    assert logits.log_softmax(-1)[..., 100:].exp().sum() == 0


def test_grouped_query_sdpa_equals_sdpa_gqa():
    """Folding query heads into the query length (the decode path) == SDPA's own GQA, any mask."""
    import torch.nn.functional as F

    from nemo_opdlm.models.attention import grouped_query_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 5, 16, generator=g)  # 8 query heads in 2 groups, 5 queries
    k, v = torch.randn(2, 3, 2, 19, 16, generator=g).unbind(0)  # [B, G, Sk, D] each
    allowed = torch.rand(3, 5, 19, generator=g) < 0.6
    allowed[..., 0] = True  # every query sees at least one key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=0.3, enable_gqa=True)
    got = grouped_query_sdpa(q, k, v, allowed, 0.3)
    assert (got - want).abs().max() < 1e-6


@torch.no_grad()
def test_logits_last_projects_only_the_last_columns(student):
    """``logits_last=k`` gives exactly the last k columns of the full logits; out of range is refused."""
    ids, layout = training_row()
    full = student(ids, layout.position_ids, layout.meta)  # [B, S, V]
    for k in (1, 10, full.shape[1]):
        last = student(ids, layout.position_ids, layout.meta, logits_last=k)
        assert last.shape == (full.shape[0], k, full.shape[2])
        assert torch.allclose(last, full[:, -k:], atol=1e-6, rtol=0)  # same math; BLAS may block M differently
    for bad in (0, full.shape[1] + 1):
        with pytest.raises(ValueError, match="logits_last"):
            student(ids, layout.position_ids, layout.meta, logits_last=bad)


def test_bad_configs():
    with pytest.raises(ConfigError, match="num_query_groups"):
        tiny_model(num_attention_heads=4, num_query_groups=3)
    with pytest.raises(ConfigError, match="head_dim"):
        tiny_model(hidden_size=66, num_attention_heads=4)
    with pytest.raises(ConfigError, match="attention_backend"):
        tiny_model(attention_backend="cudnn")
    with pytest.raises(ConfigError, match="fp8"):
        tiny_model(fp8="hybrid", linear_impl="local")
    with pytest.raises(ConfigError, match="block_size"):
        DiffusionConfig(block_size=0, mask_token_id=1)
    with pytest.raises(ConfigError, match=r"\[MASK\] id 100 \(diffusion.mask_token_id\) is outside"):
        build_student(tiny_model(), DiffusionConfig(block_size=4, mask_token_id=100), ParallelContext())


def test_tiles_skip_what_the_block_mask_hides():
    """On a long [prompt | x0 | xt] row the tiles cover about what a causal row of the same length
    does (not the whole matrix), and tiled SDPA equals dense SDPA in output and gradients."""
    import torch.nn.functional as F

    from nemo_opdlm.models.attention import plan_tiles, tiled_sdpa

    layout = masks.build_layout(torch.tensor([256, 200]), 256, torch.ones(2, 384, dtype=torch.bool), 4, True)
    allowed = masks.allowed(layout.meta, layout.meta)  # [2, 1024, 1024]
    tiles = plan_tiles(allowed, 128)
    covered = sum(t.mask.shape[-1] * t.mask.shape[-2] for t in tiles)
    assert covered / 1024**2 == 30 / 64  # 30 of 64 tiles (dense: all; causal: 36)
    assert [t.spans for t in tiles][4:6] == [((0, 640),), ((0, 384), (640, 768))]  # last x0 tile; first xt tile
    assert plan_tiles(allowed[:, :200, :200], 128) is None  # too short to tile
    assert plan_tiles(torch.ones(1, 512, 512, dtype=torch.bool), 128) is None  # nothing to skip

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1024, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 1024, 16, generator=g, requires_grad=True) for _ in range(2))
    outs, grads = [], []
    for fn in (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=0.25,
                                                      enable_gqa=True),
               lambda: tiled_sdpa(q, k, v, tiles, 0.0, 0.25, True)):
        out = fn()
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        q.grad = k.grad = v.grad = None
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
