"""``opdlm plan --measure``: the real step under fake tensors, beside the plan.

The tiny TP=2 recipe end to end through the command (a process of its own: the measurement runs a
fake process group), the refusal of pipeline layouts, and the dispatch rules that let host work
run on real tensors while the models' tensors stay fake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_opdlm.plan.measure import HostOpsReal, measured_config
from nemo_opdlm.recipes.lookup import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_opdlm.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_tiny_tp2_recipe_is_measured_beside_its_plan():
    proc = _plan("tiny_self_tp2_pp1_2g", "--measure", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout)["measured"]
    rows = measured["rows"]
    # what the plan counts parameter by parameter is exact: weights, gradients, fp32 master, moments
    for name in ("student weights", "teacher weights", "student grads + fp32 master + Adam moments",
                 "held between steps"):
        assert rows[name]["measured_over_plan"] == 1.0, (name, rows[name])
    assert 0.5 < rows["peak"]["measured_over_plan"] < 2.0, rows
    assert rows["train phase peak"]["measured_gib"] >= rows["held between steps"]["measured_gib"]
    tiny = resolve("tiny_self_tp2_pp1_2g")
    assert measured["row_tokens"] == tiny.data.max_prompt_tokens + 2 * (tiny.rollout.max_length + 4)


def test_the_table_follows_the_report():
    proc = _plan("tiny_self_tp2_pp1_2g", "--measure")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, _, table = proc.stdout.partition("measured (fake tensors")
    assert report.rstrip().endswith("ok") and "train phase peak" in table


def test_a_pipeline_layout_is_refused_with_the_remedy():
    proc = _plan("tiny_self_tp1_pp2_2g", "--measure")
    assert proc.returncode == 2
    assert "--measure simulates PP=1 layouts only" in proc.stderr and "parallel.pp=1" in proc.stderr


def test_the_measured_config_is_the_gpu_path_without_transformer_engine():
    cfg = measured_config(resolve("qwen3_8b_self_tp2_pp1_8g"))
    for model in (cfg.model, cfg.teacher):
        assert (model.attention_backend, model.linear_impl, model.fp8) == ("flex", "local", None)


def test_host_ops_run_on_real_tensors_and_model_ops_stay_fake():
    from torch._subclasses import FakeTensorMode
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    lens = torch.tensor([3, 5])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    with fake_mode, HostOpsReal(fake_mode):
        weight = torch.empty(1000, 64)  # a factory under the fake mode: fake, holds nothing
        longest = int(lens.max())  # host work on a real tensor: a real number
        picked = weight[:2, None, :].expand(2, 3, 64)[mask]  # a real mask picks rows of a fake tensor
    assert isinstance(weight, FakeTensor) and longest == 5
    assert isinstance(picked, FakeTensor) and picked.shape == (3, 64)
