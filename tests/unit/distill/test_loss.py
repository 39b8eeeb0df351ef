"""Distillation losses (one process, TP=1) against direct float64 computations.

The references below take full teacher and student distributions over the REAL vocabulary (padding
columns dropped) with torch's own softmax / kl_div / cross_entropy, and reduce with Python loops.
"""

import pytest
import torch
import torch.nn.functional as F

from nemo_opdlm.distill import loss as L

V_REAL, V_PAD = 50, 56
NEG = torch.finfo(torch.float32).min


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    from megatron.core import parallel_state

    from nemo_opdlm.runtime.distributed import ParallelLayout, init_runtime, shutdown_runtime

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    init_runtime(ParallelLayout(), seed=1, environ={})
    yield
    shutdown_runtime()


def random_case(seed=0, batch=4, prompt=3, length=6, teacher_pad=NEG):
    """Student logits ``[B, P+2L, V_PAD]`` and teacher log-probs ``[B, L, V_PAD]``, padded vocab."""
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, prompt + 2 * length, V_PAD, generator=g)
    student[..., V_REAL:] = NEG
    t_logits = 2 * torch.randn(batch, length, V_PAD, generator=g)
    teacher = torch.log_softmax(t_logits[..., :V_REAL], -1)
    teacher = torch.cat([teacher, torch.full((batch, length, V_PAD - V_REAL), teacher_pad)], -1)
    loss_mask = torch.rand(batch, length, generator=g) < 0.6
    loss_mask[1] = False  # a sequence without loss tokens
    loss_mask[0, 0] = True
    return student, teacher, loss_mask


def reference_token_kl(s_logits, t_logprobs, ids=None):
    """float64 KL(p_T || p_S) at one position from real-vocabulary distributions."""
    log_ps = torch.log_softmax(s_logits[:V_REAL].double(), -1)
    log_pt = t_logprobs[:V_REAL].double()
    if ids is None:
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")
    return sum(log_pt[i].exp() * (log_pt[i] - log_ps[i]) for i in ids.tolist())


def reference_loss(student, loss_mask, token_fn, num_sequences):
    length = loss_mask.shape[1]
    total = 0.0
    for b in range(loss_mask.shape[0]):
        vals = [token_fn(b, i, student[b, student.shape[1] - length + i]) for i in range(length) if loss_mask[b, i]]
        if vals:
            total = total + sum(vals) / len(vals)
    return total / num_sequences


def test_full_vocab_kl_equals_direct_computation():
    for teacher_pad in (NEG, float("-inf")):
        student, teacher, loss_mask = random_case(teacher_pad=teacher_pad)
        student.requires_grad_(True)
        n_seq = L.count_sequences([loss_mask])
        assert n_seq == 3
        loss, metrics = L.kl_loss(student, loss_mask, teacher, num_sequences=n_seq, tp_group=None)
        ref = reference_loss(student.detach(), loss_mask, lambda b, i, s: reference_token_kl(s, teacher[b, i]), n_seq)
        assert abs(loss.item() - ref.item()) < 1e-5
        assert metrics["num_tokens"].item() == loss_mask.sum().item()
        assert metrics["num_sequences"].item() == 3
        assert abs(metrics["seq_mean_sum"].item() - ref.item() * n_seq) < 1e-4
        loss.backward()
        grad = student.grad
        assert torch.isfinite(grad).all()
        assert (grad[..., V_REAL:] == 0).all(), "padded vocabulary gets no gradient"
        # gradient: d KL / d logits = (p_S - p_T) / (tokens of the row * num_sequences) at loss positions
        length = loss_mask.shape[1]
        want = torch.zeros_like(grad)
        for b in range(4):
            n = int(loss_mask[b].sum())
            for i in range(length):
                if loss_mask[b, i]:
                    col = student.shape[1] - length + i
                    p_s = torch.softmax(student[b, col, :V_REAL].detach(), -1)
                    want[b, col, :V_REAL] = (p_s - teacher[b, i, :V_REAL].exp()) / (n * n_seq)
        assert (grad - want).abs().max().item() < 1e-6


def test_topk_kl_equals_direct_and_full_when_k_is_vocab():
    from nemo_opdlm.runtime import vocab_parallel

    student, teacher, loss_mask = random_case(seed=1)
    for k in (5, V_REAL, V_PAD):
        values, ids = vocab_parallel.topk(teacher, k, None)  # [B, L, k]
        s = student.clone().requires_grad_(True)
        loss, metrics = L.kl_loss(s, loss_mask, values, ids, num_sequences=3, tp_group=None)
        real_ids = lambda b, i: ids[b, i][ids[b, i] < V_REAL]  # noqa: E731
        ref = reference_loss(student, loss_mask,
                             lambda b, i, x: reference_token_kl(x, teacher[b, i], real_ids(b, i)), 3)
        assert abs(loss.item() - ref.item()) < 1e-5, k
        loss.backward()
        assert torch.isfinite(s.grad).all()
        if k >= V_REAL:
            full = student.clone().requires_grad_(True)
            full_loss, _ = L.kl_loss(full, loss_mask, teacher, num_sequences=3, tp_group=None)
            full_loss.backward()
            assert abs(full_loss.item() - loss.item()) < 1e-6
            assert (full.grad - s.grad).abs().max().item() < 1e-7
    # top-k is not renormalised: with k < V the top-k term differs from KL over renormalised top-k
    values, ids = vocab_parallel.topk(teacher, 5, None)
    renorm = values - values.logsumexp(-1, keepdim=True)
    a, _ = L.kl_loss(student, loss_mask, values, ids, num_sequences=3, tp_group=None)
    b, _ = L.kl_loss(student, loss_mask, renorm, ids, num_sequences=3, tp_group=None)
    assert abs(a.item() - b.item()) > 1e-3


def test_cross_entropy_equals_direct_and_one_hot_kl():
    student, _, loss_mask = random_case(seed=2)
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, V_REAL, loss_mask.shape, generator=g)
    s = student.clone().requires_grad_(True)
    loss, metrics = L.cross_entropy_loss(s, loss_mask, targets, num_sequences=3)
    ref = reference_loss(student, loss_mask,
                         lambda b, i, x: F.cross_entropy(x[:V_REAL].double()[None], targets[b, i][None]), 3)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert "ce_sum" in metrics
    loss.backward()
    # a one-hot teacher (top-1 with log-prob 0) gives the same loss and gradient through the KL path
    s2 = student.clone().requires_grad_(True)
    kl, _ = L.kl_loss(s2, loss_mask, torch.zeros(*loss_mask.shape, 1), targets[..., None], num_sequences=3, tp_group=None)
    kl.backward()
    assert abs(kl.item() - loss.item()) < 1e-6
    assert (s.grad - s2.grad).abs().max().item() < 1e-7
    assert torch.equal(student, s.detach()), "the caller's logits are not modified"


def test_bf16_logits_with_padded_vocab_stay_finite():
    student, teacher, loss_mask = random_case(seed=4)
    s = student.to(torch.bfloat16)
    s[..., V_REAL:] = torch.finfo(torch.bfloat16).min
    s.requires_grad_(True)
    for fn in (lambda x: L.kl_loss(x, loss_mask, teacher, num_sequences=3, tp_group=None),
               lambda x: L.cross_entropy_loss(x, loss_mask, torch.zeros_like(loss_mask, dtype=torch.long),
                                              num_sequences=3)):
        loss, _ = fn(s)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad.float()).all()
        s.grad = None


def test_micro_batch_without_loss_tokens_still_backpropagates():
    student, teacher, loss_mask = random_case(seed=5)
    s = student.clone().requires_grad_(True)
    loss, metrics = L.kl_loss(s, torch.zeros_like(loss_mask), teacher, num_sequences=0, tp_group=None)
    assert loss.item() == 0 and metrics["num_sequences"].item() == 0
    loss.backward()
    assert (s.grad == 0).all()


def test_reduction_is_invariant_to_micro_batch_count():
    """Split 8 sequences into 1, 2 or 4 micro-batches: same total loss and same parameter grads."""
    g = torch.Generator().manual_seed(6)
    batch, prompt, length, hidden = 8, 2, 5, 16
    feats = torch.randn(batch, prompt + 2 * length, hidden, generator=g)
    weight0 = torch.randn(hidden, V_REAL, generator=g) / 4
    teacher = torch.log_softmax(2 * torch.randn(batch, length, V_REAL, generator=g), -1)
    loss_mask = torch.rand(batch, length, generator=g) < 0.5
    loss_mask[3] = False
    loss_mask[5] = True  # token counts differ across sequences
    targets = torch.randint(0, V_REAL, (batch, length), generator=g)
    results = {}
    for kind in ("kl", "ce"):
        for n_micro in (1, 2, 4):
            weight = weight0.clone().requires_grad_(True)
            mbs = list(zip(feats.chunk(n_micro), loss_mask.chunk(n_micro), teacher.chunk(n_micro),
                           targets.chunk(n_micro)))
            n_seq = L.count_sequences(m for _, m, _, _ in mbs)
            total = 0.0
            for f, m, t, y in mbs:
                logits = f @ weight  # [b, S, V]
                if kind == "kl":
                    loss, _ = L.kl_loss(logits, m, t, num_sequences=n_seq, tp_group=None)
                else:
                    loss, _ = L.cross_entropy_loss(logits, m, y, num_sequences=n_seq)
                loss.backward()
                total += loss.item()
            results[kind, n_micro] = (total, weight.grad.clone())
        ref_total, ref_grad = results[kind, 1]
        assert ref_grad.abs().max() > 0
        for n_micro in (2, 4):
            total, grad = results[kind, n_micro]
            assert abs(total - ref_total) < 1e-6, (kind, n_micro)
            assert (grad - ref_grad).abs().max().item() < 1e-6, (kind, n_micro)


def test_shape_errors():
    student, teacher, loss_mask = random_case()
    with pytest.raises(ValueError, match="do not match"):
        L.kl_loss(student, loss_mask, teacher[..., :V_REAL], num_sequences=1, tp_group=None)
    with pytest.raises(ValueError, match="cannot hold"):
        L.kl_loss(student[:, :5], loss_mask, teacher, num_sequences=1, tp_group=None)
