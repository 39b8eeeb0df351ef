"""Packed rows give the padded rows' loss and gradients (issue 16 item 4).

The same four ``[prompt | x0 | xt]`` rows (prompts of 5, 3, 4 and 2 tokens, responses valid for 8,
4, 6 and 2 tokens) go through megatron-core's schedule twice with the trainer's loss function
(``step.make_loss_fn``): as two padded micro-batches of two rows, and packed by a 24-token budget
into three sequences of one, two and one rows. Each packed row sees exactly the keys it saw padded,
at the same positions, so only float summation order differs.
"""

import pytest
import torch

from nemo_opdlm.distill import loss as L
from nemo_opdlm.distill import packing, states
from nemo_opdlm.teacher.targets import compute_targets, teacher_batch
from nemo_opdlm.models import masks
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.models.student import build_student
from nemo_opdlm.runtime.pipeline import run_schedule
from nemo_opdlm.training.step import make_loss_fn
from tests.tiny import tiny_model

MASK, EOS, PAD_ID, BLOCK, BUDGET = 99, 7, 0, 4, 24


@pytest.fixture(scope="module")
def runtime(shared_runtime):
    return shared_runtime


def rollout():
    g = torch.Generator().manual_seed(3)
    prompt_lens = torch.tensor([5, 3, 4, 2])
    prompt_ids = torch.randint(10, 90, (4, 5), generator=g)
    response = torch.randint(10, 90, (4, 8), generator=g)
    response[2, 5] = EOS  # row 2 ends at its EOS (excluded from the loss)
    step_map = torch.stack([torch.randperm(4, generator=g) for _ in range(8)]).view(4, 8)
    valid = torch.arange(8)[None, :] < torch.tensor([[8], [4], [6], [2]])
    return prompt_ids, prompt_lens, response, step_map, valid


def run(student, microbatches, num_seq, **logits_args):
    """Summed loss and parameter gradients through the schedule with the trainer's loss function."""
    loss_fn = make_loss_fn("opdlm", num_seq, len(microbatches), None)
    student[0].zero_grad()
    reported = run_schedule(student, microbatches, loss_fn, forward_only=False, **logits_args)
    total = sum(float(r["loss"]) for r in reported)
    tokens = sum(int(r["num_tokens"]) for r in reported)
    return total, tokens, [p.grad.clone() for p in student[0].parameters()]


@pytest.mark.parametrize("backend", ["local", "auto"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("top_k", [None, 5])
def test_packed_rows_give_the_padded_loss_and_gradients(runtime, backend, shift, top_k):
    torch.manual_seed(0)
    cfg = tiny_model(attention_backend=backend)
    student = build_student(cfg, DiffusionConfig(block_size=BLOCK, mask_token_id=MASK, shift_logits=shift), runtime.ctx)
    teacher = build_student(cfg, DiffusionConfig(block_size=1, mask_token_id=MASK), runtime.ctx)  # any frozen net
    prompt_ids, prompt_lens, response, step_map, valid = rollout()
    rows = states.build_states(prompt_ids, prompt_lens, response, step_map, valid, block_size=BLOCK,
                               steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS],
                               generator=torch.Generator().manual_seed(1))
    targets = compute_targets(teacher, [teacher_batch(prompt_ids, prompt_lens, response, valid)],
                              prompt_ids.shape[1], response.shape[1], top_k=top_k)[0]
    per_row = dict(t_logprobs=targets.logprobs, **({"t_ids": targets.ids} if top_k else {}))
    num_seq = L.count_sequences([rows["loss_mask"]])
    assert num_seq == 4

    padded = states.split_microbatches(dict(rows, **per_row), 2)
    length = response.shape[1]
    cols = masks.prediction_columns(prompt_ids.shape[1], length, BLOCK, shift)
    ref_loss, ref_tokens, ref_grads = run(student, padded, num_seq,
                                          **({"logits_columns": cols} if shift else {"logits_last": length}))

    packed, groups = packing.pack_rows(rows, BUDGET, block_size=BLOCK, shift=shift, pad_id=PAD_ID)
    assert [g.tolist() for g in groups] == [[0], [1, 3], [2]]  # segments of 21, 11, 16 and 6 tokens
    for mb, index in zip(packed, groups):
        mb.update({k: v[index] for k, v in per_row.items()})
    loss, tokens, grads = run(student, packed, num_seq)

    assert ref_loss > 1e-2 and tokens == ref_tokens == int(rows["loss_mask"].sum())
    assert abs(loss - ref_loss) < 1e-6, (loss, ref_loss)
    for p, g in zip(grads, ref_grads):
        assert torch.allclose(p, g, atol=1e-6, rtol=0), float((p - g).abs().max())
    assert packing.padding_fraction(packed) < packing.padding_fraction([rows])  # 3 x 24 slots against 4 x 21


def test_teacher_inputs_and_targets_follow_the_packed_rows(runtime):
    """The teacher's routes with packed groups (``step.teacher_rows``): each micro-batch's teacher
    inputs (``in_loss``) and targets computed before the pass (``before_pass``) are its own rows'
    (equal to the whole batch's targets indexed by the group)."""
    from nemo_opdlm.rollout.schedules import BlockSchedule
    from nemo_opdlm.teacher.route import make_route
    from nemo_opdlm.training.step import Responses, teacher_rows

    torch.manual_seed(0)
    teacher = build_student(tiny_model(attention_backend="local"), DiffusionConfig(block_size=1, mask_token_id=MASK),
                            runtime.ctx)
    prompt_ids, prompt_lens, response, step_map, valid = rollout()
    rows = states.build_states(prompt_ids, prompt_lens, response, step_map, valid, block_size=BLOCK,
                               steps_per_block=4, mask_token_id=MASK, eos_ids=[EOS],
                               generator=torch.Generator().manual_seed(1))
    whole = compute_targets(teacher, [teacher_batch(prompt_ids, prompt_lens, response, valid)],
                            prompt_ids.shape[1], response.shape[1], top_k=5)[0]
    schedule = BlockSchedule(block_size=BLOCK, block_grid="response", rounds_per_block=4, threshold=None)
    resp = Responses(prompt_ids, prompt_lens, response, valid, step_map, {}, schedule)
    def route(name: str):
        return make_route(name, teacher=teacher, student=runtime.ctx, own_layout=False, top_k=5)

    lazy, groups = packing.pack_rows(rows, BUDGET, block_size=BLOCK, shift=False, pad_id=PAD_ID)
    route("in_loss").prepare(teacher_rows(resp, lazy, groups), lazy)
    upfront, _ = packing.pack_rows(rows, BUDGET, block_size=BLOCK, shift=False, pad_id=PAD_ID)
    route("before_pass").prepare(teacher_rows(resp, upfront, groups), upfront)
    for mb, up, index in zip(lazy, upfront, groups):
        assert torch.equal(mb["teacher_input_ids"][:, -response.shape[1]:], response[index])
        assert torch.allclose(up["t_logprobs"], whole.logprobs[index], atol=1e-5, rtol=0)
        assert up["t_ids"].shape == whole.ids[index].shape  # ids: near-ties of random weights may swap
