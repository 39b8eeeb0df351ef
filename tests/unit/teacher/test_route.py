"""The teacher targets' route table (``teacher/route.py``), the one place config validation, the step
and ``opdlm plan`` ask: every cell, the route objects it builds, and the recipes' answers."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from nemo_opdlm.config import ConfigError, ParallelLayout
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.runtime.distributed import TeacherLayout
from nemo_opdlm.teacher import route as R


def test_every_cell_of_the_route_table():
    """Written out: what each combination of teacher, layout, pipeline and packing takes."""
    expected = {
        # (own_layout, pipelined, packed): route
        (False, False, False): "in_loss", (False, False, True): "in_loss",
        (False, True, False): "stream", (False, True, True): None,
        (True, False, False): "in_loss", (True, False, True): "before_pass",
        (True, True, False): "before_pass", (True, True, True): "before_pass",
    }
    for own, pipelined, packed in itertools.product((False, True), repeat=3):
        got = R.choose_route(teacher=True, own_layout=own, pipelined=pipelined, packed=packed)
        assert got == expected[own, pipelined, packed], (own, pipelined, packed)
        assert R.choose_route(teacher=False, own_layout=own, pipelined=pipelined, packed=packed) == "none"
    assert set(R.HELD) == set(R.ROUTES)
    assert [R.HELD[r] for r in ("in_loss", "stream", "before_pass")] == ["one micro-batch", "one micro-batch",
                                                                         "a whole step"]


def test_make_route_builds_the_contract_of_each_route():
    ctx = ParallelContext()
    teacher = [object()]
    assert isinstance(R.make_route("none", teacher=None, student=ctx, own_layout=False, top_k=16), R.TargetRoute)
    local = R.make_route("in_loss", teacher=teacher, student=ctx, own_layout=False, top_k=16)
    own = R.make_route("in_loss", teacher=teacher, student=ctx, own_layout=True, top_k=16, student_vocab=128,
                       teacher_vocab=128)
    assert isinstance(local, R.LocalInLoss) and isinstance(own, R.ExchangeInLoss)
    assert local.targets() is not None and own.targets() is not None
    streamed = R.make_route("stream", teacher=teacher, student=ctx, own_layout=False, top_k=16)
    assert isinstance(streamed, R.Streamed) and streamed.targets() is None and streamed.held == "one micro-batch"
    first = R.make_route("before_pass", teacher=teacher, student=ctx, own_layout=True, top_k=None,
                         student_vocab=128, teacher_vocab=128)
    assert isinstance(first, R.BeforePass) and first.targets() is None and first.held == "a whole step"
    with pytest.raises(ValueError, match="cannot ride the student's pipeline"):
        R.make_route("stream", teacher=teacher, student=ctx, own_layout=True, top_k=16, student_vocab=128,
                     teacher_vocab=128)
    with pytest.raises(ValueError, match="teacher route must be one of"):
        R.make_route("upfront", teacher=teacher, student=ctx, own_layout=False, top_k=16)


def test_exchange_in_loss_sends_each_micro_batch_alone():
    """The in-loss exchange carries its rows in the micro-batch and exchanges one micro-batch per
    call (every rank reaches each call in step)."""
    calls = []

    class Target:
        logprobs, ids = "logprobs", "ids"

    route = R.ExchangeInLoss(lambda rows: calls.append(list(rows)) or [Target()])
    mbs = [{}, {}]
    route.prepare([{"x0": 1}, {"x0": 2}], mbs)
    assert [mb[R.EXCHANGE_ROWS] for mb in mbs] == [{"x0": 1}, {"x0": 2}]
    assert route.targets()(mbs[1]) == ("logprobs", "ids") and calls == [[{"x0": 2}]]


def test_the_config_asks_the_table():
    """``RunConfig.teacher_route`` for the tiny recipe at each layout, and the refusal of the cell no
    route serves, naming the keys."""
    from nemo_opdlm.recipes.tiny import tiny_run

    cfg = tiny_run("t")
    assert cfg.teacher_route() == "in_loss"
    assert dataclasses.replace(cfg, parallel=ParallelLayout(pp=2)).teacher_route() == "stream"
    own = dataclasses.replace(cfg, parallel=ParallelLayout(teacher=TeacherLayout(tp=2)))
    assert own.teacher_route() == "in_loss" and own.teacher_route(packed=True) == "before_pass"
    assert dataclasses.replace(cfg, parallel=ParallelLayout(pp=2, teacher=TeacherLayout(pp=2))).teacher_route() \
        == "before_pass"
    with pytest.raises(ConfigError, match="train.pack_tokens with parallel.pp=2 .*give the teacher its own layout"):
        dataclasses.replace(cfg, parallel=ParallelLayout(pp=2), train=dataclasses.replace(cfg.train, pack_tokens=200))
