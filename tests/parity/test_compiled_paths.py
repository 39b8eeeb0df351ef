"""The paths every GPU run takes, exercised on the CPU: FlexAttention compiled by inductor on
``[prompt | x0 | xt]`` rows (alone, and inside the student), and a training step with bf16 parameters.

What the CPU cannot show (torch 2.13), so the GPU check owes it: FlexAttention has no CPU backward
("FlexAttention does not support backward on CPU"), and inductor's CPU template fails to compile it
with dynamic shapes for a mask that reads per-token tensors, as ours does (``CppCompileError:
'cur_kvSplitSize0' was not declared``; static shapes compile, one graph per row length). The GPU
path compiles with torch's automatic dynamic shapes: a second row length recompiles once as a
dynamic graph, which every later length reuses (bound: two graphs).
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_opdlm.models import attention, masks
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.models.student import build_student
from tests.tiny import block_rows, random_qkv, tiny_model, written_out_attention

from torch.nn.attention.flex_attention import flex_attention  # noqa: E402  (torch >= 2.5: the package needs it)


@pytest.mark.parametrize("block_grid", ["response", "absolute"])
def test_compiled_flex_equals_sdpa_and_the_written_out_attention(block_grid):
    rows = block_rows(block_grid)
    meta = rows["meta"]
    q, k, v = random_qkv(meta)
    allowed = masks.allowed(meta, meta)
    block_mask = attention._flex_block_mask(None, meta, meta)
    torch._dynamo.reset()
    with torch.no_grad():
        flex = torch.compile(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)
    ref = written_out_attention(q, k, v, allowed)
    assert (flex - ref).abs().max().item() < 1e-5
    assert (sdpa - ref).abs().max().item() < 1e-5


def test_a_student_with_compiled_flex_gives_the_sdpa_students_logits(monkeypatch):
    """The whole model: megatron-core's layers with the block mask as a BlockMask, compiled, against
    the same weights on SDPA (the CPU default) and on megatron's local path."""
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    rows = block_rows("absolute")
    compiled = torch.compile(flex_attention)
    monkeypatch.setattr(attention, "_compiled_flex", lambda: compiled)
    torch._dynamo.reset()
    with runtime(ParallelLayout()) as rt:
        out = {}
        for backend in ("flex", "sdpa", "local"):
            torch.manual_seed(0)
            student = build_student(tiny_model(attention_backend=backend), DiffusionConfig(block_size=4, mask_token_id=99),
                                    rt.ctx)[0].eval()
            with torch.no_grad():
                out[backend] = student(rows["input_ids"], rows["position_ids"], rows["meta"])
    assert (out["flex"] - out["sdpa"]).abs().max().item() < 1e-4
    assert (out["local"] - out["sdpa"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["off_policy", "sft"])
def test_a_bf16_step_equals_the_fp32_step_within_bf16_precision(tmp_path, method):
    """One step with bf16 parameters (the GPU recipes' dtype; teacher and student) on dataset
    responses, so that both runs see the same rows: the loss and the gradient norm within bf16's
    precision of the fp32 step's."""
    from nemo_opdlm.training.loop import train
    from tests.train_fixtures import make_run

    got = {}
    for dtype in ("float32", "bfloat16"):
        history = train(make_run(str(tmp_path), f"distill.method={method}", "train.save_dir=null", "train.steps=1",
                                 "optim.warmup_steps=0",
                                 f"model.params_dtype={dtype}"))["history"]
        got[dtype] = history[0]
    for key in ("loss", "grad_norm"):
        assert math.isclose(got["bfloat16"][key], got["float32"][key], rel_tol=2e-2), (key, got)
    assert got["bfloat16"]["loss"] != got["float32"]["loss"]  # bf16 arithmetic did run
