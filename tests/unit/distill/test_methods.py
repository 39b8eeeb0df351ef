"""The methods table: what each distill.method is made of, and the config checks it drives."""

from __future__ import annotations

import pytest

from nemo_opdlm.config import ConfigError, DistillConfig
from nemo_opdlm.distill.methods import METHODS, get_method
from tests.train_fixtures import make_run


def _rows(method: str, step_map):
    """The training rows ``method`` makes of one fixed response (4 tokens, 1 block), decoded in the
    rounds ``step_map`` gives; the states' randomness seeded alike."""
    import torch

    from nemo_opdlm.rollout.schedules import BlockSchedule
    from nemo_opdlm.training.step import Responses, training_rows

    cfg = make_run_cfg(method)
    schedule = BlockSchedule(block_size=4, block_grid="response", rounds_per_block=4, threshold=None)
    resp = Responses(torch.tensor([[5, 6, 7]]), torch.tensor([3]), torch.tensor([[10, 11, 12, 13]]),
                     torch.ones(1, 4, dtype=torch.bool), torch.tensor([step_map]), {}, schedule)
    masks = []
    for seed in range(16):
        rows = training_rows(cfg, resp, [1], torch.Generator().manual_seed(seed))
        masks.append(rows["loss_mask"][0].tolist())
    return rows, masks


def make_run_cfg(method: str):
    from nemo_opdlm.recipes.tiny import tiny_run
    import dataclasses

    cfg = tiny_run("t")
    data = dataclasses.replace(cfg.data, response_field="answer")
    return dataclasses.replace(cfg, distill=DistillConfig(method=method), data=data)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_as_it_says(method):
    """What each method does to the same response, observed: on-policy masks follow the decoding
    rounds (a state is the sampler's before a round it used), random masks do not look at them,
    the causal method trains every token with no xt copy."""
    m = get_method(method)
    in_order, reversed_ = _rows(method, [0, 1, 2, 3]), _rows(method, [3, 2, 1, 0])
    rows, masks = in_order
    if m.causal:
        assert rows["input_ids"].shape[1] == 3 + 4 and all(mask == [True] * 4 for mask in masks)
    elif m.masking == "on_policy":
        # decoded left to right, a state masks a suffix; decoded right to left, a prefix
        assert all(mask == sorted(mask) for mask in masks) and any(mask[0] is False for mask in masks)
        assert all(mask == sorted(mask, reverse=True) for mask in reversed_[1])
    else:
        assert masks == reversed_[1]  # the rounds play no part
        assert rows["input_ids"].shape[1] == 3 + 2 * 4


def test_unknown_methods_are_refused():
    for name in METHODS:
        DistillConfig(method=name)
    with pytest.raises(ConfigError, match=r"distill.method must be one of \('opdlm'.*got 'kd'"):
        DistillConfig(method="kd")


@pytest.mark.parametrize("method", ["sft", "ar"])
def test_methods_on_dataset_responses_need_the_field_at_config_time(tmp_path, method):
    with pytest.raises(ConfigError, match=f"distill.method={method} needs data.response_field"):
        make_run(str(tmp_path), f"distill.method={method}", "data.response_field=null")
    make_run(str(tmp_path), "distill.method=off_policy", "data.response_field=null")  # the teacher's rollouts then


def test_teacher_rollouts_at_the_teachers_own_layout_are_refused_at_config_time(tmp_path):
    """off_policy without data.response_field has the teacher decode, at the student's layout: not
    with ``parallel.teacher`` (its responses from the data are fine)."""
    with pytest.raises(ConfigError, match="set parallel.teacher=null, or give the teacher's responses"):
        make_run(str(tmp_path), "distill.method=off_policy", "data.response_field=null", "parallel.teacher.tp=2")
    make_run(str(tmp_path), "distill.method=off_policy", "parallel.teacher.tp=2")
