"""Who sends what to whom when the teacher has its own layout (``teacher/exchange.py``), and
the rank grid both layouts share (``runtime/teacher_groups.py``): pure arithmetic, no processes.
The exchange itself runs on 2 gloo ranks in ``tests/e2e/test_train_parallel.py``."""

import pytest
import torch

from nemo_opdlm.teacher.exchange import Routes
from nemo_opdlm.runtime.teacher_groups import Grid


def test_grid_orders_ranks_as_megatron_core_does():
    """tp fastest, then dp, then pp ("tp-cp-ep-dp-pp"): on 8 ranks at TP=2 x PP=2, DP=2."""
    grid = Grid.of(2, 2, 8)
    assert grid == Grid(tp=2, dp=2, pp=2)
    assert [grid.coords(r) for r in range(8)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0),
                                                  (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert all(grid.rank(*grid.coords(r)) == r for r in range(8))
    assert list(grid.groups("t")) == [[0, 1], [4, 5], [2, 3], [6, 7]]
    assert sorted(grid.groups("p")) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sorted(grid.groups("d")) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert list(grid.groups("")) == [[r] for r in (0, 4, 2, 6, 1, 5, 3, 7)]
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp = 4\\*1"):
        Grid.of(4, 1, 6)


def test_every_student_replica_is_served_once_and_evenly():
    """A 70B teacher at TP=8 beside an 8B student at TP=2 on 16 ranks: 2 teacher replicas serve
    the 8 student replicas, 4 each."""
    plan = Routes(student=Grid.of(2, 1, 16), teacher=Grid.of(8, 1, 16))
    assert [plan.server(d) for d in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert plan.served(0) == [0, 2, 4, 6] and plan.served(1) == [1, 3, 5, 7]
    assert plan.rounds == 4 and [plan.served(plan.server(d)).index(d) for d in range(8)] == [
        plan.round_of(d) for d in range(8)]  # one served replica per round
    sources = plan.input_sources(3)  # student replica 3 = ranks 6, 7; served by teacher replica 1 = ranks 8-15
    assert sorted(sources) == list(range(8, 16))
    assert set(sources.values()) == {6, 7}  # the reads are spread over the replica's ranks


def test_a_reader_inside_the_student_replica_reads_its_own_inputs():
    plan = Routes(student=Grid.of(1, 1, 2), teacher=Grid.of(2, 1, 2))  # the test layout
    assert plan.input_sources(0) == {0: 0, 1: 0} and plan.input_sources(1) == {0: 1, 1: 1}


def test_full_vocabulary_pieces_recut_the_teacher_shards_to_the_student_shards():
    """Teacher TP=4 shards of 96 ids (padded 384), student TP=2 shards of 160 (padded 320): each
    student shard is assembled from the teacher shards that overlap it, columns matched by global id."""
    plan = Routes(student=Grid.of(2, 1, 4), teacher=Grid.of(4, 1, 4))
    pieces = plan.target_pieces(1, student_vocab=160, teacher_vocab=96)  # student replica 1: ranks 2, 3
    covered = {}
    for src, dst, t_cols, s_cols in pieces:
        tt = Grid.of(4, 1, 4).coords(src)[0]
        ts = Grid.of(2, 1, 4).coords(dst)[0]
        t_ids = range(tt * 96 + t_cols.start, tt * 96 + t_cols.stop)
        s_ids = range(ts * 160 + s_cols.start, ts * 160 + s_cols.stop)
        assert list(t_ids) == list(s_ids)
        covered.setdefault(dst, []).extend(s_ids)
    assert sorted(covered) == [2, 3]
    assert sorted(covered[2]) == list(range(0, 160)) and sorted(covered[3]) == list(range(160, 320))
    assert [(src, dst) for src, dst, *_ in pieces] == [(0, 2), (1, 2), (1, 3), (2, 3), (3, 3)]


def test_student_ids_past_the_teacher_vocabulary_get_no_piece():
    """A student padded wider than the teacher: those columns stay -inf (no piece covers them)."""
    plan = Routes(student=Grid.of(1, 1, 2), teacher=Grid.of(2, 1, 2))
    pieces = plan.target_pieces(0, student_vocab=256, teacher_vocab=64)
    assert [(s, d, t.start, t.stop, c.start, c.stop) for s, d, t, c in pieces] == [(0, 0, 0, 64, 0, 64),
                                                                                    (1, 0, 0, 64, 64, 128)]


def test_top_k_targets_go_whole_to_each_student_tp_rank_from_the_teacher_last_stage():
    """Teacher TP=2 x PP=2 (DP=1), student TP=2 x PP=2 (DP=1) on 4 ranks: the last stages talk."""
    plan = Routes(student=Grid.of(2, 2, 4), teacher=Grid.of(2, 2, 4))
    pieces = plan.target_pieces(0, student_vocab=64, teacher_vocab=None)
    assert [(s, d) for s, d, *_ in pieces] == [(2, 2), (3, 3)]
    assert all(t == slice(None) and c == slice(None) for _, _, t, c in pieces)


def test_unequal_packed_groups_become_equal_microbatches_for_a_pipelined_teacher():
    """A teacher at PP > 1 sends one tensor shape per micro-batch: packed groups of 2 and 1 rows
    become three one-row micro-batches, in order; equal groups are left alone."""
    from nemo_opdlm.teacher.exchange import _equal_microbatches

    def rows(first: int, n: int) -> dict:
        ids = torch.arange(first, first + n)[:, None]
        return dict(prompt_ids=ids.repeat(1, 3), prompt_lens=torch.full((n,), 3), x0=ids.repeat(1, 4),
                    valid=torch.ones(n, 4, dtype=torch.bool))

    parts = _equal_microbatches([rows(0, 2), rows(2, 1)])
    assert [int(p["x0"].shape[0]) for p in parts] == [1, 1, 1]
    assert [int(p["x0"][0, 0]) for p in parts] == [0, 1, 2]
    equal = [rows(0, 2), rows(2, 2)]
    assert _equal_microbatches(equal) is equal
