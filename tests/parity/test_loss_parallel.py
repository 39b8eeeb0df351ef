"""Distillation losses under TP=2 (vocabulary split) and DP=2 (sequences split): 2 gloo processes.

TP=2: each rank holds half of the (padded) vocabulary of random logits; loss and logits gradients
must equal the float64 full-vocabulary reference of ``test_loss.py`` (which the TP=1 path matches),
the top-k KL's chunked normaliser and gradient included; the chunked top-k targets equal the top-k
of the full log-softmax.
DP=2: each rank holds half of the sequences and the global sequence count; the summed losses and
gradients equal the single-rank values on the whole batch.
"""

import pytest
import torch

from tests.dist import torchrun

pytestmark = pytest.mark.distributed


def _reference_and_grad(student, loss_mask, token_fn, n_seq):
    from tests.unit.distill.test_loss import reference_loss

    s = student.double().requires_grad_(True)
    ref = reference_loss(s, loss_mask, token_fn, n_seq)
    ref.backward()
    return ref.item(), s.grad.float()


def _check_tp(student, teacher, loss_mask, targets, n_seq, group):
    import torch.nn.functional as F

    from nemo_opdlm.distill import loss as L
    from nemo_opdlm.runtime import vocab_parallel
    from tests.unit.distill.test_loss import V_REAL, reference_token_kl

    rank = torch.distributed.get_rank()
    local = student.shape[-1] // 2
    cols = slice(rank * local, (rank + 1) * local)
    shard = lambda x: x[..., cols].contiguous()  # noqa: E731
    values, ids = vocab_parallel.topk(shard(teacher), 6, group)  # global top-6 from the shards
    assert torch.equal(ids, teacher.topk(6, dim=-1).indices)
    # top-k targets from raw logits and a chunked normaliser == the top-k of the full log-softmax
    want_v, want_i = vocab_parallel.topk(vocab_parallel.log_softmax(shard(teacher), group), 6, group)
    got_v, got_i = vocab_parallel.topk_log_probs(shard(teacher), 6, group, chunk=2)
    assert torch.equal(got_i, want_i) and (got_v - want_v).abs().max().item() < 1e-6

    cases = {
        "full": (lambda s: L.kl_loss(s, loss_mask, shard(teacher), num_sequences=n_seq, tp_group=group),
                 lambda b, i, x: reference_token_kl(x, teacher[b, i])),
        "topk": (lambda s: L.kl_loss(s, loss_mask, values, ids, num_sequences=n_seq, tp_group=group),
                 lambda b, i, x: reference_token_kl(x, teacher[b, i], ids[b, i])),
        "ce": (lambda s: L.cross_entropy_loss(s, loss_mask, targets, num_sequences=n_seq),
               lambda b, i, x: F.cross_entropy(x[:V_REAL][None], targets[b, i][None])),
    }
    for name, (ours, reference) in cases.items():
        s = shard(student).requires_grad_(True)
        loss, _ = ours(s)
        loss.backward()
        ref, ref_grad = _reference_and_grad(student, loss_mask, reference, n_seq)
        assert abs(loss.item() - ref) < 1e-5, (name, loss.item(), ref)
        err = (s.grad - ref_grad[..., cols]).abs().max().item()
        assert err < 1e-6, (name, "grad", err)
        print("TP_OK", name, rank, loss.item())


def _check_dp(loss_mask, teacher, n_seq_full, ctx):
    from nemo_opdlm.distill import loss as L

    g = torch.Generator().manual_seed(11)
    batch, length = loss_mask.shape
    feats = torch.randn(batch, 3 + 2 * length, 8, generator=g)
    weight0 = torch.randn(8, teacher.shape[-1], generator=g)

    def run(f, m, t, n_seq):
        w = weight0.clone().requires_grad_(True)
        loss, _ = L.kl_loss(f @ w, m, t, num_sequences=n_seq, tp_group=None)
        loss.backward()
        return loss.detach(), w.grad

    full_loss, full_grad = run(feats, loss_mask, teacher, n_seq_full)
    rank = ctx.dp_rank
    assert ctx.dp_size == 2
    half = slice(rank * batch // 2, (rank + 1) * batch // 2)
    n_seq = L.count_sequences([loss_mask[half]], ctx.dp_group)
    assert n_seq == n_seq_full
    loss, grad = run(feats[half], loss_mask[half], teacher[half], n_seq)
    torch.distributed.all_reduce(loss)
    torch.distributed.all_reduce(grad)  # DDP sums (then divides by dp: undone by the trainer)
    assert abs(loss.item() - full_loss.item()) < 1e-6, (loss.item(), full_loss.item())
    assert (grad - full_grad).abs().max().item() < 1e-6
    print("DP_OK", rank, loss.item())


def worker_tp_dp(tmp_dir):
    from megatron.core import parallel_state

    from nemo_opdlm.distill import loss as L
    from nemo_opdlm.runtime.distributed import ParallelLayout, parallel_context, runtime
    from tests.unit.distill.test_loss import V_REAL, random_case

    student, teacher, loss_mask = random_case(seed=21, batch=4)
    targets = torch.randint(0, V_REAL, loss_mask.shape, generator=torch.Generator().manual_seed(2))
    n_seq = L.count_sequences([loss_mask])
    with runtime(ParallelLayout(tp=2)) as rt:
        _check_tp(student, teacher, loss_mask, targets, n_seq, rt.ctx.tp_group)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        _check_dp(loss_mask, teacher, n_seq, parallel_context())


def test_tp2_and_dp2_equal_single_rank(tmp_path):
    out = torchrun("tests.parity.test_loss_parallel:worker_tp_dp", 2, tmp_path)
    assert out.count("TP_OK") == 6 and out.count("DP_OK") == 2
