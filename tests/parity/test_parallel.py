"""TP=2 == TP=1 and PP=2 == PP=1 for the student and the teacher (2 gloo processes).

Weights move between layouts through megatron-core dist_checkpointing (saved at TP=PP=1,
loaded resharded), so the comparison is the same weights under another layout.
"""

import os

import pytest
import torch

from tests.dist import torchrun

pytestmark = pytest.mark.distributed


def _reinit(tp=1, pp=1):
    """Another layout on the same processes; returns its context."""
    from megatron.core import parallel_state

    from nemo_opdlm.runtime.distributed import parallel_context
    from nemo_opdlm.runtime.seeding import seed_everything

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = parallel_context()
    seed_everything(1234, ctx)
    return ctx


def _save(chunks, path):
    from megatron.core import dist_checkpointing

    sharded = {}
    for chunk in chunks:
        sharded.update(chunk.sharded_state_dict())
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, path)


def _load(chunks, path):
    from megatron.core import dist_checkpointing

    for chunk in chunks:
        state = dist_checkpointing.load(chunk.sharded_state_dict(), path)
        chunk.load_state_dict(state, strict=False)


def _inputs():
    from nemo_opdlm.models import masks

    g = torch.Generator().manual_seed(7)
    valid = torch.arange(9)[None, :] < torch.tensor([[9], [6]])
    layout = masks.build_layout(torch.tensor([5, 2]), 5, valid, 4, with_xt=True)
    ids = torch.randint(0, 100, (2, layout.meta.shape[-1]), generator=g)
    causal = masks.build_layout(torch.tensor([5, 2]), 5, valid, 1, with_xt=False)
    return ids, layout, causal


def _gather_vocab(local, ctx):
    from nemo_opdlm.runtime.vocab_parallel import all_gather_last

    return all_gather_last(local, ctx.tp_group)


def worker_tensor_parallel(tmp_dir):
    from nemo_opdlm.teacher.targets import shifted_targets
    from nemo_opdlm.models.student import build_chunks
    from nemo_opdlm.models.teacher import build_teacher
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from tests.tiny import tiny_model

    cfg = tiny_model(num_attention_heads=4, num_query_groups=2, vocab_size=97)
    ids, layout, causal = _inputs()
    ckpt = os.path.join(tmp_dir, "tp1")
    with runtime(ParallelLayout(tp=1), environ=None) as rt:
        model = build_chunks(cfg, rt.ctx)
        with torch.no_grad():
            ref_student = model[0](ids, layout.position_ids, layout.meta)
            ref_teacher = model[0](ids[:, :14], causal.position_ids, causal.meta)
        ref_top = shifted_targets(ref_teacher, 5, 9, top_k=16, tp_group=None)
        ref_full = shifted_targets(ref_teacher, 5, 9, top_k=None, tp_group=None)
        _save(model, ckpt)

        ctx = _reinit(tp=2)
        torch.manual_seed(99)  # different init: the loaded weights must be what matters
        student = build_chunks(cfg, ctx)
        _load(student, ckpt)
        teacher = build_teacher(cfg, ctx)
        _load(teacher, ckpt)
        with torch.no_grad():
            tp_student = student[0](ids, layout.position_ids, layout.meta)
            tp_teacher = teacher[0](ids[:, :14], causal.position_ids, causal.meta)
        assert tp_student.shape[-1] * 2 == ref_student.shape[-1] == 104
        full_student = _gather_vocab(tp_student, ctx)
        err = (full_student[..., :97] - ref_student[..., :97]).abs().max().item()
        assert err <= 1e-5, f"student TP=2 vs TP=1: {err}"
        err = (_gather_vocab(tp_teacher, ctx)[..., :97] - ref_teacher[..., :97]).abs().max().item()
        assert err <= 1e-5, f"teacher TP=2 vs TP=1: {err}"
        top = shifted_targets(tp_teacher, 5, 9, top_k=16, tp_group=ctx.tp_group)
        assert torch.equal(top.ids, ref_top.ids)
        assert (top.logprobs - ref_top.logprobs).abs().max() <= 1e-5
        # the TP=1 top-k is the top-k of the full-vocabulary log-probs (the same ids; the values are
        # the raw logits less the log-normaliser, equal to the log-softmax's within rounding)
        want_v, want_i = ref_full.logprobs.topk(16, dim=-1)
        assert torch.equal(ref_top.ids, want_i) and (ref_top.logprobs - want_v).abs().max() <= 1e-6
        full_tp = _gather_vocab(shifted_targets(tp_teacher, 5, 9, top_k=None, tp_group=ctx.tp_group).logprobs, ctx)
        assert (full_tp[..., :97] - ref_full.logprobs[..., :97]).abs().max() <= 1e-5
        print("TP_OK", err)


def _pipeline_loss_and_grads(chunks, ids, layout):
    """Mean log-prob of the xt tokens, through get_forward_backward_func (2 micro-batches)."""
    from nemo_opdlm.runtime.pipeline import run_schedule

    microbatches = [
        dict(input_ids=ids[i:i + 1], position_ids=layout.position_ids[i:i + 1], meta=layout.meta[:, :][i:i + 1])
        for i in range(ids.shape[0])
    ]

    def loss_fn(logits, batch):
        xt = layout.xt_slice
        logp = logits[:, xt].float().log_softmax(-1)
        target = batch["input_ids"][:, xt]
        loss = -logp.gather(-1, target[..., None]).mean()
        return loss, {"loss": loss.detach()}

    for chunk in chunks:
        chunk.zero_grad()
    reported = run_schedule(chunks, microbatches, loss_fn, forward_only=False)
    return reported


def _global_grads(chunks, layers_per_stage, stage):
    grads = {}
    for name, p in chunks[0].named_parameters():
        if p.grad is None:
            continue
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + stage * layers_per_stage)
        grads[".".join(parts)] = p.grad.clone()
    return grads


def worker_pipeline_parallel(tmp_dir):
    from nemo_opdlm.models.student import build_chunks
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from tests.tiny import tiny_model

    cfg = tiny_model(num_layers=4)
    ids, layout, _ = _inputs()
    ckpt = os.path.join(tmp_dir, "pp1")
    with runtime(ParallelLayout(pp=1), environ=None) as rt:
        model = build_chunks(cfg, rt.ctx)
        ref = _pipeline_loss_and_grads(model, ids, layout)
        ref_grads = _global_grads(model, 4, 0)
        _save(model, ckpt)

        ctx = _reinit(pp=2)
        stage = ctx.pp_rank
        torch.manual_seed(5)
        model = build_chunks(cfg, ctx)
        _load(model, ckpt)
        got = _pipeline_loss_and_grads(model, ids, layout)
        grads = _global_grads(model, 2, stage)
        if stage == 1:
            assert len(got) == 2
            for a, b in zip(got, ref):
                assert torch.allclose(a["loss"], b["loss"], atol=1e-6), (a, b)
        else:
            assert got == []
        assert grads, "no gradients on this stage"
        for name, g in grads.items():
            err = (g - ref_grads[name]).abs().max().item()
            assert err <= 1e-6, f"{name}: {err}"
        print("PP_OK", stage, len(grads))


def test_tensor_parallel_equals_single(tmp_path):
    out = torchrun("tests.parity.test_parallel:worker_tensor_parallel", 2, tmp_path)
    assert out.count("TP_OK") == 2


def test_pipeline_parallel_equals_single(tmp_path):
    out = torchrun("tests.parity.test_parallel:worker_pipeline_parallel", 2, tmp_path)
    assert out.count("PP_OK") == 2
