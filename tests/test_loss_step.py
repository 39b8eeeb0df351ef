"""States + teacher targets + KL through megatron-core's schedule on a tiny model (one process).

Shows how the pieces compose for the trainer, and that the schedule's division of each
micro-batch loss by the number of micro-batches is undone correctly: 1 and 2 micro-batches give
the same summed loss and the same parameter gradients as a plain forward of the whole batch.
"""

import pytest
import torch

from nemo_opdlm.distill import loss as L
from nemo_opdlm.distill import states
from nemo_opdlm.distill.teacher_targets import compute_targets, logits_needed, shifted_targets, teacher_batch
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.models.student import build_student, from_teacher
from nemo_opdlm.models.teacher import build_teacher
from nemo_opdlm.runtime.pipeline import model_inputs, run_schedule
from tests.tiny import tiny_model

MASK, EOS = 99, 7


@pytest.fixture(scope="module")
def models():
    from megatron.core import parallel_state

    from nemo_opdlm.runtime.distributed import ParallelLayout, init_runtime, shutdown_runtime

    owned = not parallel_state.model_parallel_is_initialized()
    if owned:
        init_runtime(ParallelLayout(), seed=1, environ={})
    cfg = tiny_model(attention_backend="local")
    teacher = build_teacher(cfg)
    student = build_student(cfg, DiffusionConfig(block_size=4, mask_token_id=MASK))
    from_teacher(student, teacher)
    yield student, teacher
    if owned:
        shutdown_runtime()


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
        full = shifted_targets(teacher[0](**model_inputs(t_batch)), prompt_ids.shape[1], response.shape[1], top_k)
    assert torch.allclose(full.logprobs, targets.logprobs, atol=1e-6, rtol=0)
    n_seq = L.count_sequences([batch["loss_mask"]])

    # plain forward of the whole batch
    student[0].zero_grad()
    logits = student[0](**model_inputs(batch))  # [B, P+2L, V_pad]
    ref, _ = L.kl_loss(logits, batch["loss_mask"], targets.logprobs, targets.ids, num_sequences=n_seq)
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
                                      num_sequences=n_seq)
            return loss * n_micro, metrics  # the schedule divides by n_micro

        student[0].zero_grad()
        reported = run_schedule(student, mbs, loss_fn, forward_only=False, logits_last=last)
        total = sum(r["seq_mean_sum"] for r in reported) / n_seq
        assert abs(total.item() - ref.item()) < 1e-6, (n_micro, last)
        assert sum(r["num_tokens"] for r in reported).item() == batch["loss_mask"].sum().item()
        for p, g in zip(student[0].parameters(), ref_grads):
            assert torch.allclose(p.grad, g, atol=1e-7, rtol=1e-5), (n_micro, last)
