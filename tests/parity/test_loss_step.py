"""States + teacher targets + KL through megatron-core's schedule on a tiny model (one process).

Shows how the pieces compose for the trainer, and that the schedule's division of each
micro-batch loss by the number of micro-batches is undone correctly: 1 and 2 micro-batches give
the same summed loss and the same parameter gradients as a plain forward of the whole batch.
"""

import pytest
import torch

from nemo_opdlm.distill import loss as L
from nemo_opdlm.distill import states
from nemo_opdlm.models.masks import logits_needed
from nemo_opdlm.teacher.targets import compute_targets, shifted_targets, teacher_batch
from nemo_opdlm.models import masks
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.models.student import build_student, from_teacher
from nemo_opdlm.models.teacher import build_teacher
from nemo_opdlm.runtime.pipeline import model_inputs, run_schedule
from tests.tiny import tiny_model

MASK, EOS = 99, 7


@pytest.fixture(scope="module")
def models(shared_runtime):
    cfg = tiny_model(attention_backend="local")
    teacher = build_teacher(cfg, shared_runtime.ctx)
    student = build_student(cfg, DiffusionConfig(block_size=4, mask_token_id=MASK), shared_runtime.ctx)
    from_teacher(student, teacher)
    return student, teacher


def fake_rollout(batch=4, prompt=5, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.tensor([5, 3, 4, 2])[:batch]
    prompt_ids = torch.randint(10, 90, (batch, prompt), generator=g)
    response = torch.randint(10, 90, (batch, length), generator=g)
    response[1, 2] = EOS
    step_map = torch.stack([torch.randperm(4, generator=g) for _ in range(batch * length // 4)]).view(batch, length)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 4:] = False  # finished in its first block
    return prompt_ids, prompt_lens, response, step_map, valid


@pytest.mark.parametrize("top_k", [None, 5])
def test_kl_through_the_schedule_matches_a_plain_forward(models, top_k):
    student, teacher = models
    prompt_ids, prompt_lens, response, step_map, valid = fake_rollout()
    batch = states.build_states(prompt_ids, prompt_lens, response, step_map, valid, block_size=4,
                                steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS],
                                generator=torch.Generator().manual_seed(1))
    t_batch = teacher_batch(prompt_ids, prompt_lens, response, valid)
    targets = compute_targets(teacher, [t_batch], prompt_ids.shape[1], response.shape[1], top_k=top_k)[0]
    with torch.no_grad():  # compute_targets projects only the response columns: same targets as in full
        full = shifted_targets(teacher[0](**model_inputs(t_batch)), prompt_ids.shape[1], response.shape[1], top_k,
                               None)
    assert torch.allclose(full.logprobs, targets.logprobs, atol=1e-6, rtol=0)
    n_seq = L.count_sequences([batch["loss_mask"]])

    # plain forward of the whole batch
    student[0].zero_grad()
    logits = student[0](**model_inputs(batch))  # [B, P+2L, V_pad]
    ref, _ = L.kl_loss(logits, batch["loss_mask"], targets.logprobs, targets.ids, num_sequences=n_seq, tp_group=None)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student[0].parameters()]
    assert ref.item() > 0 and torch.isfinite(ref)

    # 1 or 2 micro-batches; logits of every column, or of the response's columns only
    for n_micro, last in ((1, None), (2, None), (1, logits_needed(response.shape[1])), (2, response.shape[1])):
        mbs = states.split_microbatches(batch, n_micro)
        tgt = [t.chunk(n_micro) if t is not None else [None] * n_micro for t in (targets.logprobs, targets.ids)]
        for i, mb in enumerate(mbs):
            mb["teacher_logprobs"] = tgt[0][i]
            if tgt[1][i] is not None:
                mb["teacher_ids"] = tgt[1][i]

        def loss_fn(out, mb):
            loss, metrics = L.kl_loss(out, mb["loss_mask"], mb["teacher_logprobs"], mb.get("teacher_ids"),
                                      num_sequences=n_seq, tp_group=None)
            return loss * n_micro, metrics  # the schedule divides by n_micro

        student[0].zero_grad()
        reported = run_schedule(student, mbs, loss_fn, forward_only=False, logits_last=last)
        total = sum(r["seq_mean_sum"] for r in reported) / n_seq
        assert abs(total.item() - ref.item()) < 1e-6, (n_micro, last)
        assert sum(r["num_tokens"] for r in reported).item() == batch["loss_mask"].sum().item()
        for p, g in zip(student[0].parameters(), ref_grads):
            assert torch.allclose(p.grad, g, atol=1e-7, rtol=1e-5), (n_micro, last)


def _kl_at(student, batch, targets, columns):
    """Mean token KL with the student's predictions read at ``columns`` of a full forward."""
    with torch.no_grad():
        logits = student[0](**model_inputs(batch))[:, columns]  # [B, L, V_pad]
    n_seq = L.count_sequences([batch["loss_mask"]])
    _, metrics = L.kl_loss(logits, batch["loss_mask"], targets.logprobs, num_sequences=n_seq, tp_group=None)
    return float(metrics["kl_sum"] / metrics["num_tokens"])


def test_shifted_block1_student_starts_at_its_teacher(models):
    """Shifted with block size 1, every xt token is predicted from the clean x0 token before it, which
    sees exactly the causal context: the student copied from the teacher starts at KL 0, while the
    unshifted student (predicting a [MASK] at its own position) is far from it."""
    student, teacher = models
    prompt_ids, prompt_lens, response, _, valid = fake_rollout()
    batch = states.build_states(prompt_ids, prompt_lens, response, torch.zeros_like(response), valid, block_size=1,
                                steps_per_block=1, mask_token_id=MASK, eos_ids=[EOS],
                                generator=torch.Generator().manual_seed(1))
    assert bool(batch["loss_mask"].any())
    targets = compute_targets(teacher, [teacher_batch(prompt_ids, prompt_lens, response, valid)],
                              prompt_ids.shape[1], response.shape[1], top_k=None)[0]
    width, length = prompt_ids.shape[1], response.shape[1]
    shifted = _kl_at(student, batch, targets, masks.prediction_columns(width, length, 1, True))
    own = _kl_at(student, batch, targets, masks.prediction_columns(width, length, 1, False))
    assert shifted < 1e-6 and own > 1e-2, (shifted, own)  # random tiny weights: near-uniform outputs


def test_shifted_columns_through_the_schedule_match_a_plain_forward(models):
    """``logits_columns`` through megatron-core's schedule: the same loss and gradients as a full
    forward whose logits are gathered at the prediction columns."""
    student, teacher = models
    prompt_ids, prompt_lens, response, step_map, valid = fake_rollout()
    batch = states.build_states(prompt_ids, prompt_lens, response, step_map, valid, block_size=4,
                                steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS],
                                generator=torch.Generator().manual_seed(1))
    targets = compute_targets(teacher, [teacher_batch(prompt_ids, prompt_lens, response, valid)],
                              prompt_ids.shape[1], response.shape[1], top_k=None)[0]
    columns = masks.prediction_columns(prompt_ids.shape[1], response.shape[1], 4, True)
    n_seq = L.count_sequences([batch["loss_mask"]])
    student[0].zero_grad()
    logits = student[0](**model_inputs(batch))[:, columns]
    ref, _ = L.kl_loss(logits, batch["loss_mask"], targets.logprobs, num_sequences=n_seq, tp_group=None)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student[0].parameters()]
    mbs = states.split_microbatches(dict(batch, teacher_logprobs=targets.logprobs), 2)

    def loss_fn(out, mb):
        assert out.shape[1] == response.shape[1]  # exactly the prediction columns reached the output layer
        loss, metrics = L.kl_loss(out, mb["loss_mask"], mb["teacher_logprobs"], num_sequences=n_seq, tp_group=None)
        return loss * 2, metrics

    student[0].zero_grad()
    reported = run_schedule(student, mbs, loss_fn, forward_only=False, logits_columns=columns)
    assert abs(float(sum(r["seq_mean_sum"] for r in reported) / n_seq) - ref.item()) < 1e-6
    for p, g in zip(student[0].parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-7, rtol=1e-5)
