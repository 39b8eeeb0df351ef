"""Parallel steps equal single-rank ones: TP=2 and PP=2, DP=2 (padded and packed), the teacher
at its own layout (2 and 4 ranks), streamed targets, packed rows at PP=2."""

import json
import os

import pytest
import torch

from nemo_opdlm.training import step as train_step
from nemo_opdlm.training.loop import train
from tests.dist import torchrun
from tests.convert_models import save_hf
from tests.train_fixtures import losses, make_run


def _run_layout(tmp_dir, layout, name, *extra):
    rank = int(os.environ["RANK"])
    result = train(make_run(tmp_dir, layout, "train.save_dir=null", "train.steps=2", *extra))
    got = {"loss": [h.get("loss") for h in result["history"]],
           "grad_norm": [h["grad_norm"] for h in result["history"]]}
    if got["loss"][0] is not None:
        with open(os.path.join(tmp_dir, f"{name}_{rank}.json"), "w") as f:
            json.dump(got, f)


def close(got, want, tol):
    assert len(got) == len(want) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(got, want)), (got, want)


def worker_tp2(tmp_dir):
    _run_layout(tmp_dir, "parallel.tp=2", "tp2")


def worker_pp2(tmp_dir):
    _run_layout(tmp_dir, "parallel.pp=2", "pp2")


SHIFTED = ("diffusion.shift_logits=true", "rollout.static_fraction=0.5")


"""A shifted student (logits read at scattered columns) with half its rollout rows decoded statically."""


def worker_tp2_shifted(tmp_dir):
    _run_layout(tmp_dir, "parallel.tp=2", "tp2s", *SHIFTED)


def worker_pp2_shifted(tmp_dir):
    _run_layout(tmp_dir, "parallel.pp=2", "pp2s", *SHIFTED)


@pytest.mark.distributed
@pytest.mark.parametrize("shifted", [False, True])
def test_tp2_and_pp2_steps_equal_single(tmp_path, shifted):
    extra, suffix = (SHIFTED, "_shifted") if shifted else ((), "")
    history = train(make_run(str(tmp_path), "train.save_dir=null", "train.steps=2", *extra))["history"]
    ref, ref_norm = losses(history), [h["grad_norm"] for h in history]
    torchrun(f"tests.e2e.test_train_parallel:worker_tp2{suffix}", 2, tmp_path, timeout=300)
    torchrun(f"tests.e2e.test_train_parallel:worker_pp2{suffix}", 2, tmp_path, timeout=300)
    tag = "s" if shifted else ""
    tp = [json.load(open(tmp_path / f"tp2{tag}_{r}.json")) for r in (0, 1)]
    assert tp[0] == tp[1]
    pp = json.load(open(tmp_path / f"pp2{tag}_1.json"))  # the last stage holds the loss
    for got in (tp[0], pp):
        close(got["loss"], ref, 1e-5)
        close(got["grad_norm"], ref_norm, 1e-4)


def worker_dp2(tmp_dir):
    _run_layout(tmp_dir, "distill.method=ar", "dp2")


@pytest.mark.distributed
def test_dp2_step_equals_dp1(tmp_path):
    """Same global batch on 2 data-parallel ranks: same losses, so the same updates (the AR method has
    no sampling, so both runs see identical rows; DDP averaging and loss scaling must cancel)."""
    history = train(make_run(str(tmp_path), "distill.method=ar", "train.save_dir=null", "train.steps=2"))["history"]
    torchrun("tests.e2e.test_train_parallel:worker_dp2", 2, tmp_path, timeout=300)
    got = json.load(open(tmp_path / "dp2_0.json"))
    assert got == json.load(open(tmp_path / "dp2_1.json"))  # the metrics are reduced over DP
    close(got["loss"], losses(history), 1e-6)
    close(got["grad_norm"], [h["grad_norm"] for h in history], 1e-5)  # Adam hides a gradient scale; the norm does not


def worker_dp2_packed(tmp_dir):
    counts = []
    real = train_step.make_microbatches

    def counted(*args):
        out = real(*args)
        counts.append(len(out[0]))
        return out

    train_step.make_microbatches = counted
    if os.environ["RANK"] == "0":  # rank 0 packs one row per sequence: a valid packing, more micro-batches
        from nemo_opdlm.distill import packing
        packing.plan_packing = lambda segs, budget: [[seg] for seg in segs]
    _run_layout(tmp_dir, "distill.method=sft", "dp2pack", "train.pack_tokens=51", "train.steps=3")
    with open(os.path.join(tmp_dir, f"dp2pack_counts_{os.environ['RANK']}.json"), "w") as f:
        json.dump(counts, f)


def worker_dp2_padded(tmp_dir):
    _run_layout(tmp_dir, "distill.method=sft", "dp2pad", "train.steps=3")


@pytest.mark.distributed
def test_dp2_packed_steps_equal_padded(tmp_path):
    """Packed rows at DP=2, where each rank packs its own rows into its own number of micro-batches
    (the loss scale follows the local count): the same losses and gradient norms as padded rows."""
    torchrun("tests.e2e.test_train_parallel:worker_dp2_padded", 2, tmp_path, timeout=300)
    torchrun("tests.e2e.test_train_parallel:worker_dp2_packed", 2, tmp_path, timeout=300)
    want, got = (json.load(open(tmp_path / f"{name}_0.json")) for name in ("dp2pad", "dp2pack"))
    assert got == json.load(open(tmp_path / "dp2pack_1.json"))
    close(got["loss"], want["loss"], 1e-5)
    close(got["grad_norm"], want["grad_norm"], 1e-4)
    counts = [json.load(open(tmp_path / f"dp2pack_counts_{r}.json")) for r in (0, 1)]
    assert counts == [[2, 2, 2], [1, 1, 1]], counts  # two rows per rank: apart on rank 0, together on rank 1


def _count_live_targets(monkeypatch_targets):
    """Patch the functions that make teacher targets so that every target tensor is counted while
    it is alive; returns the counter ``{"live", "peak", "made"}``."""
    import weakref

    from nemo_opdlm.teacher import route, stream, targets

    counter = {"live": 0, "peak": 0, "made": 0}
    real = targets.shifted_targets

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        counter["live"] += 1
        counter["made"] += 1
        counter["peak"] = max(counter["peak"], counter["live"])
        weakref.finalize(out.logprobs, lambda: counter.__setitem__("live", counter["live"] - 1))
        return out

    for module in (targets, stream, route):
        monkeypatch_targets(module, "shifted_targets", counted)
    return counter


def worker_pp2_targets(tmp_dir):
    """PP=2, full-vocabulary targets, one step: the live target tensors on this rank. The directory's
    name says how: ``streamed_N`` (the trainer's path) or ``upfront_N`` (every micro-batch's targets
    computed before the student's pass), N micro-batches of the step's 4 prompts."""
    from nemo_opdlm.training import loop as loop_module

    how, n = os.path.basename(tmp_dir).split("_")
    patched = []

    def patch(module, name, value):
        patched.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    counter = _count_live_targets(patch)
    real = loop_module.forward_backward
    patch(loop_module, "forward_backward",
          lambda *a, **k: real(*a, route="before_pass" if how == "upfront" else None, **k))
    _run_layout(tmp_dir, "parallel.pp=2", "targets", "distill.top_k=null", f"train.micro_batch_size={4 // int(n)}",
                "train.steps=1", "optim.warmup_steps=0")
    with open(os.path.join(tmp_dir, f"live_targets_{os.environ['RANK']}.json"), "w") as f:
        json.dump(counter, f)


@pytest.mark.distributed
def test_streamed_teacher_targets_do_not_grow_with_the_micro_batch_count(tmp_path):
    """With PP=2 the teacher rides the student's pipeline pass: the last stage holds at most one or
    two micro-batches of (full-vocabulary) targets at a time, at 2 or 4 micro-batches per step,
    where computing them up front holds all of them. Equal losses to PP=1:
    ``test_tp2_and_pp2_steps_equal_single``."""
    got = {}
    for how in ("streamed_2", "streamed_4", "upfront_4"):
        run = tmp_path / how
        run.mkdir()
        torchrun("tests.e2e.test_train_parallel:worker_pp2_targets", 2, run, timeout=300)
        got[how] = [json.load(open(run / f"live_targets_{r}.json")) for r in (0, 1)]
    for how, (first, last) in got.items():
        assert first["made"] == 0 and last["made"] == int(how[-1]), (how, got)  # on the last stage only
    assert got["upfront_4"][1]["peak"] == 4, got  # the old path: every micro-batch's targets at once
    assert got["streamed_2"][1]["peak"] == got["streamed_4"][1]["peak"] <= 2, got


def worker_teacher_layout(tmp_dir):
    """One step at DP=2 (student TP=1), the teacher at the layout this directory's name gives
    (``shared``: the student's; ``tp2``/``pp2``: its own), top-k or full-vocabulary targets; every
    micro-batch's targets are computed before the student's pass and saved, with the loss and the
    gradient norm."""
    from nemo_opdlm.training import loop as loop_module

    layout, targets = os.path.basename(tmp_dir).split("_")
    from_ckpt = ("init.teacher_hf=null", f"init.tokenizer={tmp_dir}/teacher_hf",
                 f"init.teacher_checkpoint={os.path.dirname(tmp_dir)}/teacher_ckpt")
    teacher = {"shared": ("parallel.teacher=null",), "tp2": ("parallel.teacher.tp=2",),
               "tp1": ("parallel.teacher.tp=1",), "tp2pp2": ("parallel.teacher.tp=2", "parallel.teacher.pp=2"),
               "pp2": ("parallel.teacher.pp=2",), "tp2ckpt": ("parallel.teacher.tp=2",) + from_ckpt,
               "pp2ckpt": ("parallel.teacher.pp=2",) + from_ckpt}
    top_k = {"topk": "distill.top_k=16", "full": "distill.top_k=null"}
    from nemo_opdlm.teacher.route import BeforePass

    real_fb, real_prepare = loop_module.forward_backward, BeforePass.prepare
    saved = []

    def prepare(self, rows, microbatches):
        real_prepare(self, rows, microbatches)
        saved.append([{k: mb[k] for k in ("t_logprobs", "t_ids") if k in mb} for mb in microbatches])

    loop_module.forward_backward = lambda *a, **k: real_fb(*a, **dict(k, route="before_pass"))
    BeforePass.prepare = prepare
    student = ("parallel.tp=2",) if int(os.environ["WORLD_SIZE"]) == 4 else ()  # 4 ranks: student TP=2 x DP=2
    _run_layout(tmp_dir, "distill.method=opdlm", "run", *student, *teacher[layout], top_k[targets], "train.steps=2",
                "train.micro_batch_size=1")
    torch.save(saved, os.path.join(tmp_dir, f"targets_{os.environ['RANK']}.pt"))


@pytest.mark.distributed
@pytest.mark.parametrize("targets", ["topk", "full"])
def test_teacher_with_its_own_layout_gives_the_same_step(tmp_path, targets):
    """A teacher at TP=2, then at PP=2, beside a student at TP=1 x DP=2 on the same 2 ranks: its inputs
    travel to the one teacher replica and its targets back to each student replica (full-vocabulary
    targets re-cut from the teacher's 2 vocabulary shards to the student's one). The targets, losses
    and gradient norms equal those of the teacher sharing the student's layout (TP=1 x DP=2), which reads
    the HF weights. ``*ckpt`` (the top-k case): both models read a megatron-core checkpoint saved at
    TP=1, each at its own layout."""
    from tests.e2e.test_bad_inputs import tool_main

    save_hf("qwen3", str(tmp_path / "hf"), seed=0)  # make_run's teacher
    assert tool_main("import_hf")(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "teacher_ckpt")]) == 0
    got = {}
    for layout in ("shared",) + (("tp2ckpt", "pp2ckpt") if targets == "topk" else ("tp2", "pp2")):
        run = tmp_path / f"{layout}_{targets}"
        run.mkdir()
        torchrun("tests.e2e.test_train_parallel:worker_teacher_layout", 2, run, timeout=300)
        got[layout] = ([json.load(open(run / f"run_{r}.json")) for r in (0, 1)],
                       [torch.load(run / f"targets_{r}.pt") for r in (0, 1)])
    (want, want_targets) = got.pop("shared")
    assert want[0] == want[1]  # metrics are reduced over DP
    for layout, (metrics, targets_by_rank) in got.items():
        close(metrics[0]["loss"], want[0]["loss"], 1e-5)
        close(metrics[0]["grad_norm"], want[0]["grad_norm"], 1e-4)
        for rank in (0, 1):  # each student replica's own rows: the student rank holds its replica's targets
            steps, want_steps = targets_by_rank[rank], want_targets[rank]
            assert len(steps) == len(want_steps) == 2
            for mbs, want_mbs in zip(steps, want_steps):
                assert len(mbs) == len(want_mbs) == 2
                for mb, want_mb in zip(mbs, want_mbs):
                    assert sorted(mb) == sorted(want_mb), (layout, sorted(mb))
                    assert mb["t_logprobs"].shape == want_mb["t_logprobs"].shape
                    finite = want_mb["t_logprobs"].isfinite()
                    assert torch.equal(finite, mb["t_logprobs"].isfinite()), layout  # padding: -inf on both
                    torch.testing.assert_close(mb["t_logprobs"][finite], want_mb["t_logprobs"][finite],
                                               atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_teacher_layouts_on_four_ranks_recut_full_vocabulary_targets(tmp_path):
    """Student TP=2 x DP=2 on 4 ranks, full-vocabulary targets. Teacher TP=1 x DP=4 (more teacher
    replicas than student ones: two serve, two idle; each whole-vocabulary target cut into the
    student's 2 shards) and teacher TP=2 x PP=2 (one replica serving both student replicas from its
    last stage, ranks 2 and 3) give the targets, losses and gradient norms of the teacher sharing the
    student's TP=2 x DP=2."""
    got = {}
    for layout in ("shared", "tp1", "tp2pp2"):
        run = tmp_path / f"{layout}_full"
        run.mkdir()
        torchrun("tests.e2e.test_train_parallel:worker_teacher_layout", 4, run, timeout=600)
        got[layout] = ([json.load(open(run / f"run_{r}.json")) for r in range(4) if (run / f"run_{r}.json").exists()],
                       [torch.load(run / f"targets_{r}.pt") for r in range(4)])
    want, want_targets = got.pop("shared")
    for layout, (metrics, targets_by_rank) in got.items():
        close(metrics[0]["loss"], want[0]["loss"], 1e-5)
        close(metrics[0]["grad_norm"], want[0]["grad_norm"], 1e-4)
        for rank in range(4):  # ranks 0, 1: student replica 0's two vocabulary shards; 2, 3: replica 1's
            for mbs, want_mbs in zip(targets_by_rank[rank], want_targets[rank], strict=True):
                for mb, want_mb in zip(mbs, want_mbs, strict=True):
                    finite = want_mb["t_logprobs"].isfinite()
                    assert torch.equal(finite, mb["t_logprobs"].isfinite()), (layout, rank)
                    torch.testing.assert_close(mb["t_logprobs"][finite], want_mb["t_logprobs"][finite],
                                               atol=1e-5, rtol=1e-5)


def worker_own_layout_stream(tmp_dir):
    """One step at student TP=1 x DP=2, 8 prompts, full-vocabulary targets from a teacher at its own
    layout; the directory's name ``{how}_{N}_{teacher}`` says how the targets come (``stream``: the
    trainer's path, exchanged per micro-batch inside the loss; ``first``: all before the pass), in N
    micro-batches per rank, from a teacher at ``tp2`` or ``pp2``. Saves the metrics and the live
    count of exchanged target tensors on this rank."""
    import weakref

    from nemo_opdlm.training import loop as loop_module

    how, n, layout = os.path.basename(tmp_dir).split("_")
    counter = {"live": 0, "peak": 0, "made": 0}
    from nemo_opdlm.teacher import route as route_module

    real_exchange, real_fb = route_module.exchange_targets, loop_module.forward_backward

    def counted(*args, **kwargs):
        out = real_exchange(*args, **kwargs)
        for target in out:
            counter["live"] += 1
            counter["made"] += 1
            counter["peak"] = max(counter["peak"], counter["live"])
            weakref.finalize(target.logprobs, lambda: counter.__setitem__("live", counter["live"] - 1))
        return out

    route_module.exchange_targets = counted
    loop_module.forward_backward = lambda *a, **k: real_fb(*a, **dict(k, route="before_pass" if how == "first" else None))
    teacher = {"tp2": "parallel.teacher.tp=2", "pp2": "parallel.teacher.pp=2"}[layout]
    _run_layout(tmp_dir, teacher, "run", "distill.top_k=null", "train.prompts_per_step=8",
                f"train.micro_batch_size={4 // int(n)}", "train.steps=1", "optim.warmup_steps=0")
    with open(os.path.join(tmp_dir, f"live_targets_{os.environ['RANK']}.json"), "w") as f:
        json.dump(counter, f)


@pytest.mark.distributed
def test_own_teacher_layout_streams_targets_per_micro_batch(tmp_path):
    """A teacher at its own layout beside a one-stage student exchanges each micro-batch's targets
    inside the loss: one target tensor alive at a time on every rank, at 2 or 4 micro-batches per
    rank, where exchanging them before the pass holds all 4; the same loss and gradient norm (and so,
    by ``test_teacher_with_its_own_layout_gives_the_same_step``, those of the shared layout)."""
    got = {}
    for how in ("first_4_tp2", "stream_4_tp2", "stream_2_pp2"):
        run = tmp_path / how
        run.mkdir()
        torchrun("tests.e2e.test_train_parallel:worker_own_layout_stream", 2, run, timeout=300)
        got[how] = ([json.load(open(run / f"live_targets_{r}.json")) for r in (0, 1)],
                    json.load(open(run / "run_0.json")))
    for how, (counts, _) in got.items():
        n = int(how.split("_")[1])
        for c in counts:
            assert c["made"] == n and c["live"] == 0, (how, counts)
            assert c["peak"] == (1 if how.startswith("stream") else n), (how, counts)
    want = got.pop("first_4_tp2")[1]
    for how, (_, metrics) in got.items():
        close(metrics["loss"], want["loss"], 1e-5)
        close(metrics["grad_norm"], want["grad_norm"], 1e-4)


PACKED_PP = {"sft": ("distill.method=sft",), "opdlm": ("distill.method=opdlm", "parallel.teacher.pp=2")}


"""Packed rows at PP=2: without a teacher, and with the teacher at its own layout (targets first)."""


def worker_pp2_packed(tmp_dir):
    method = os.path.basename(tmp_dir)
    _run_layout(tmp_dir, "parallel.pp=2", "pp2pack", "train.pack_tokens=51", "train.steps=2", *PACKED_PP[method])


@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(PACKED_PP))
def test_packed_rows_at_pp2_equal_pp1(tmp_path, method):
    """Packed sequences are exactly train.pack_tokens long, so the pipeline's buffers keep one shape:
    at PP=2 the packed steps give PP=1's losses and gradient norms (the teacher, where the method has
    one, at its own layout: its targets are computed before the student's pass)."""
    extra = tuple(o for o in PACKED_PP[method] if not o.startswith("parallel.teacher"))
    want = train(make_run(str(tmp_path), "train.save_dir=null", "train.pack_tokens=51", "train.steps=2",
                          *extra))["history"]
    run = tmp_path / method
    run.mkdir()
    torchrun("tests.e2e.test_train_parallel:worker_pp2_packed", 2, run, timeout=300)
    got = json.load(open(run / "pp2pack_1.json"))  # the last stage holds the loss
    close(got["loss"], losses(want), 1e-5)
    close(got["grad_norm"], [h["grad_norm"] for h in want], 1e-4)
