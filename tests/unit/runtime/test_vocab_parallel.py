"""Targets and KL (top-k and full vocabulary) without the whole fp32 log-softmax (``runtime/vocab_parallel.py``),
against the exact compositions they replace (log-softmax, then top-k or gather), at TP = 1 (TP = 2:
``tests/parity/test_loss_parallel.py``)."""

import pytest
import torch

from nemo_opdlm.runtime import vocab_parallel as VP


def _logits(n=7, v=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 3).to(dtype)


def _old_topk_kl(student, logp_t, ids):
    """Today's top-k KL: the full fp32 log-softmax, gathered at the teacher's ids."""
    logp_s = VP.gather_global(VP.log_softmax(student, None), ids, None)
    p_t = logp_t.exp()
    return torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)).sum(-1)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_topk_log_probs_equal_the_topk_of_the_log_softmax(chunk):
    logits = _logits(seed=1).view(1, 7, 50)
    want_v, want_i = VP.topk(VP.log_softmax(logits, None), 5, None)
    got_v, got_i = VP.topk_log_probs(logits, 5, None, chunk=chunk)
    assert torch.equal(got_i, want_i) and got_v.dtype == torch.float32
    assert (got_v - want_v).abs().max().item() < 1e-6
    lse = VP.log_normaliser(logits, None, chunk=chunk)
    assert (lse - torch.logsumexp(logits.double(), -1)).abs().max().item() < 1e-5
    assert torch.equal(logits, _logits(seed=1).view(1, 7, 50))  # the caller's logits untouched


@pytest.mark.parametrize("chunk", [2, 1024])
def test_topk_kl_equals_todays_loss_and_gradient(chunk):
    teacher = _logits(seed=2)
    logp_t, ids = VP.topk(VP.log_softmax(teacher, None), 6, None)
    logp_t[0, -1] = float("-inf")  # a target of probability 0 contributes nothing
    weights = torch.rand(7, generator=torch.Generator().manual_seed(3))
    a = _logits(seed=4).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    new = VP.topk_kl(a, logp_t, ids, None, chunk=chunk)
    old = _old_topk_kl(b, logp_t, ids)
    assert (new - old).abs().max().item() < 1e-6
    (new * weights).sum().backward()
    (old * weights).sum().backward()
    assert (a.grad - b.grad).abs().max().item() < 1e-6


def _old_full_kl(student, logp_t):
    """Today's full-vocabulary KL: the fp32 log-softmax of the whole ``[N, V]``."""
    p_t = logp_t.exp()
    logp_s = VP.log_softmax(student, None)
    return torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)).sum(-1)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_log_probs_equal_the_log_softmax(chunk):
    logits = _logits(seed=7, dtype=torch.bfloat16).view(1, 7, 50)
    got = VP.log_probs(logits, None, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert (got - VP.log_softmax(logits, None)).abs().max().item() < 1e-6
    fp32 = _logits(seed=7).view(1, 7, 50)
    VP.log_probs(fp32, None, chunk=chunk)
    assert torch.equal(fp32, _logits(seed=7).view(1, 7, 50))  # the caller's fp32 logits untouched


@pytest.mark.parametrize("chunk", [2, 1024])
def test_full_kl_equals_todays_loss_and_gradient(chunk):
    logp_t = VP.log_softmax(_logits(seed=8), None)
    logp_t[1, 3] = float("-inf")  # an id of probability 0 contributes nothing
    weights = torch.rand(7, generator=torch.Generator().manual_seed(9))
    a = _logits(seed=10).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    new = VP.full_kl(a, logp_t, None, chunk=chunk)
    old = _old_full_kl(b, logp_t)
    assert torch.equal(a, b)  # the student's logits untouched
    assert (new - old).abs().max().item() < 1e-6
    (new * weights).sum().backward()
    (old * weights).sum().backward()
    assert (a.grad - b.grad).abs().max().item() < 1e-6


def test_full_kl_refuses_targets_of_another_shard():
    with pytest.raises(ValueError, match="same tokenizer and TP"):
        VP.full_kl(_logits(), torch.zeros(7, 49), None)


def test_topk_kl_of_bf16_logits_keeps_their_dtype_and_fp32_math():
    teacher = _logits(seed=5)
    logp_t, ids = VP.topk(VP.log_softmax(teacher, None), 4, None)
    student = _logits(seed=6, dtype=torch.bfloat16).requires_grad_(True)
    kl = VP.topk_kl(student, logp_t, ids, None, chunk=3)
    kl.sum().backward()
    assert kl.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    ref = _old_topk_kl(student.detach().float().requires_grad_(True), logp_t, ids)
    assert (kl - ref).abs().max().item() < 1e-5


def test_the_memory_benchmark_runs_and_the_chunked_forms_hold_less(tmp_path):
    """``benchmarks/targets_memory.py`` at a small vocabulary: both forms measured, the chunked ones
    below today's (its committed run at 151,936 ids: ``benchmarks/results/targets_memory.json``)."""
    import json

    from benchmarks import targets_memory

    out = tmp_path / "m.json"
    assert targets_memory.main(["--vocab", "4000", "--positions", "600", "--out", str(out)]) == 0
    for case in json.load(open(out))["cases"]:
        for kind in ("topk", "full"):
            assert case[f"{kind}_targets_after_mib"] < case[f"{kind}_targets_before_mib"], (kind, case)
            assert case[f"{kind}_kl_fwd_bwd_after_mib"] < case[f"{kind}_kl_fwd_bwd_before_mib"], (kind, case)
