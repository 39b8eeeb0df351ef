"""The methods table: what each distill.method is made of, and the config checks it drives."""

from __future__ import annotations

import pytest

from nemo_opdlm.config import ConfigError, DistillConfig
from nemo_opdlm.distill.methods import METHODS, get_method
from tests.train_fixtures import make_run


def test_each_method_is_its_three_choices():
    table = {m.name: (m.responses, m.masking, m.loss) for m in METHODS.values()}
    assert table == {
        "opdlm": ("own_rollouts", "on_policy", "kl"),
        "random_mask": ("own_rollouts", "random", "kl"),
        "off_policy": ("teacher", "random", "kl"),
        "sft": ("dataset", "random", "ce"),
        "ar": ("dataset", None, "causal_ce"),
    }
    assert [m for m in METHODS if get_method(m).needs_teacher] == ["opdlm", "random_mask", "off_policy"]
    assert [m for m in METHODS if get_method(m).causal] == ["ar"]
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
