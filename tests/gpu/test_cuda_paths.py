"""What only a GPU can show (``pytest -m gpu``; ``benchmarks/gpu_check.sh`` runs them): compiled
FlexAttention forward *and backward* on ``[prompt | x0 | xt]`` rows, the number of graphs it compiles
as the curriculum grows the rows, and the trainer on CUDA against the CPU's committed losses.

The CPU half of these checks is ``tests/parity/test_compiled_paths.py`` (torch has no CPU backward
for FlexAttention). Without a CUDA device every test here is skipped with that reason
(``tests/conftest.py``); none passes by doing nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from nemo_opdlm.models import attention, masks
from tests.tiny import block_rows, random_qkv, written_out_attention

pytestmark = pytest.mark.gpu

CURRICULUM = (12, 20, 28)
"""Response lengths of three curriculum stages (rows of 8 + 2 L tokens)."""
MAX_GRAPHS = 2
"""The recompile bound: the first row length compiles a static graph, the second a dynamic one
(torch's automatic dynamic shapes) that every later length reuses."""


def _cuda(rows: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in rows.items()}


@pytest.mark.parametrize("block_grid", ["response", "absolute"])
def test_compiled_flex_forward_and_backward_equal_the_written_out_attention(block_grid):
    from torch.nn.attention.flex_attention import flex_attention

    meta = _cuda(block_rows(block_grid))["meta"]
    allowed = masks.allowed(meta, meta)
    block_mask = attention._flex_block_mask(None, meta, meta)
    q, k, v = (t.cuda().requires_grad_() for t in random_qkv(meta.cpu()))
    torch._dynamo.reset()
    flex = torch.compile(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)
    grads = torch.autograd.grad(flex.square().sum(), (q, k, v))
    ref = written_out_attention(q, k, v, allowed)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert (flex - ref).abs().max().item() < 1e-4
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max().item() < 1e-3 * max(1.0, want.abs().max().item())


def test_compiled_flex_compiles_a_bounded_number_of_graphs_across_the_curriculum():
    """Three row lengths (forward and backward each): at most ``MAX_GRAPHS`` graphs of FlexAttention.
    The block masks are built first, so that only the attention's compilations are counted."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    inputs = []
    for length in CURRICULUM:
        meta = _cuda(block_rows("absolute", response_len=length))["meta"]
        q, k, v = (t.cuda().requires_grad_() for t in random_qkv(meta.cpu()))
        inputs.append((q, k, v, attention._flex_block_mask(None, meta, meta)))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(flex_attention)
    for q, k, v, block_mask in inputs:
        compiled(q, k, v, block_mask=block_mask, enable_gqa=True).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= MAX_GRAPHS, dict(counters["stats"])


def test_a_flex_student_on_cuda_gives_the_sdpa_students_logits_and_gradients():
    from nemo_opdlm.models.config import DiffusionConfig
    from nemo_opdlm.models.student import build_student
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from tests.tiny import tiny_model

    rows = _cuda(block_rows("absolute"))
    with runtime(ParallelLayout()) as rt:
        out, grads = {}, {}
        for backend in ("flex", "sdpa"):
            torch.manual_seed(0)
            student = build_student(tiny_model(attention_backend=backend), DiffusionConfig(block_size=4, mask_token_id=99),
                                    rt.ctx)[0]
            logits = student(rows["input_ids"], rows["position_ids"], rows["meta"])
            logits.float().square().mean().backward()
            out[backend] = logits.detach()
            grads[backend] = torch.cat([p.main_grad.flatten() if getattr(p, "main_grad", None) is not None
                                        else p.grad.flatten() for p in student.parameters()])
    assert (out["flex"] - out["sdpa"]).abs().max().item() < 1e-3
    assert (grads["flex"] - grads["sdpa"]).abs().max().item() < 1e-3 * max(1.0, grads["sdpa"].abs().max().item())


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("method", ["off_policy", "sft"])
def test_the_trainer_on_cuda_gives_the_committed_cpu_losses(tmp_path, method, backend):
    """Dataset responses (no sampling, so the same rows on both devices): three fp32 steps on the GPU,
    on SDPA and on compiled FlexAttention, within 1e-3 of the CPU's golden losses."""
    from nemo_opdlm.training.loop import train
    from tests.e2e.test_golden_losses import GOLDEN, KEYS
    from tests.train_fixtures import make_run

    history = train(make_run(str(tmp_path), f"distill.method={method}", "train.save_dir=null", "train.steps=3",
                             f"model.attention_backend={backend}"))["history"]
    want = json.load(open(GOLDEN))[method]
    for step, (got, ref) in enumerate(zip(history, want), 1):
        assert got["train/loss_tokens"] == ref["train/loss_tokens"], step
        for key in KEYS:
            if key in ref:
                assert math.isclose(got[key], ref[key], rel_tol=1e-3, abs_tol=1e-6), (method, backend, step, key)
        assert got["memory/student_fwd_bwd_peak_gib"] > 0
