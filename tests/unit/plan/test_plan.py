"""``opdlm plan``: every recipe passes on its cluster; broken ones fail with the right message.

Memory numbers are checked against closed forms computed by hand from the published shapes (not
against the estimator's own helpers).
"""

from __future__ import annotations

import json
import os

import pytest

from nemo_opdlm import recipes
from nemo_opdlm.recipes.lookup import resolve
from nemo_opdlm.plan.cli import plan_main
from nemo_opdlm.plan.layout import GIB, GPUS, Cluster, GpuSpec, check_layout, usable_bytes
from nemo_opdlm.plan.memory import estimate_stage
from nemo_opdlm.plan.remedies import suggest
from nemo_opdlm.plan.report import make_plan
from nemo_opdlm.recipes.tiny import tiny_shape
from tests.tiny import hf_config

H100x8 = Cluster(1, 8, "h100-80g")

L = 4000 + 4
"""The trained response width of the 4,000-token recipes: 4,000 tokens in whole blocks of 4, and the
absolute grid's framed block (each prompt's last P mod 4 tokens, ``models/grid.py``)."""


@pytest.mark.parametrize("name", sorted(recipes.ALL_RECIPES))
def test_every_recipe_passes_on_its_cluster(name, capsys):
    assert plan_main([name]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok") and "fits" in out


def test_broken_layout_names_the_field(capsys):
    assert plan_main(["qwen3_8b_self_tp2_pp1_8g", "parallel.tp=3"]) == 2
    assert "model.num_attention_heads=32 is not divisible by parallel.tp=3" in capsys.readouterr().err


def test_world_that_does_not_divide_the_prompts(capsys):
    # 3 nodes x 8 GPUs at tp=2: DP=12 does not divide 128 prompts
    assert plan_main(["qwen3_8b_self_tp2_pp1_8g", "--nodes", "3"]) == 2
    assert "train.prompts_per_step=128 is not divisible by DP=12" in capsys.readouterr().err
    # a layout larger than the world
    assert plan_main(["qwen3_8b_self_tp2_pp1_8g", "parallel.tp=8", "--gpus-per-node", "4"]) == 2
    assert "world size 4 is not divisible by tp*pp*cp" in capsys.readouterr().err


def test_packed_rows_are_noted_as_not_planned(capsys):
    plan_main(["qwen3_8b_self_tp2_pp1_8g", "train.pack_tokens=20000"])
    assert "train.pack_tokens=20000: the memory below is for padded micro-batches" in capsys.readouterr().out


def test_plan_that_does_not_fit_is_refused_with_remedies(capsys):
    args = ["qwen3_8b_self_tp2_pp1_8g", "model.recompute=none", "train.micro_batch_size=2", "--gpu", "a100-40g"]
    assert plan_main(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and out.rstrip().endswith("refused: the plan does not fit in GPU memory")
    assert "model.recompute=full" in out and "parallel.tp=4" in out and "combined:" in out
    # the suggested combination really fits when applied
    cfg = resolve(args[0], args[1:3])
    cluster = Cluster(1, 8, "a100-40g")
    _, combo = suggest(cfg, cluster)
    overrides = [o for r in combo for o in r.overrides]
    nodes = [r.nodes for r in combo if r.nodes]
    fixed = make_plan(resolve(args[0], args[1:3] + overrides), Cluster(nodes[-1] if nodes else 1, 8, "a100-40g"))
    assert fixed.fits


GPU3 = GpuSpec("an 80 GB GPU without FP8", 80.0, overhead_gib=3.0)


def test_fp8_auto_is_declared_and_planned_by_gpu_kind():
    """Recipes declare fp8='auto' whatever machine builds them (no TE or GPU probe); it resolves to
    off here (no TE, no GPU), and the plan counts FP8 weight copies on Hopper kinds only."""
    cfg = resolve("qwen3_8b_self_tp2_pp1_8g", [])
    assert (cfg.model.fp8, cfg.model.linear_impl, cfg.teacher.fp8) == ("auto", "auto", "auto")
    assert cfg.model.resolved_fp8() is None
    shape, _ = check_layout(cfg, H100x8)
    assert "student FP8 weight copies" in estimate_stage(cfg, shape, 0, GPUS["h100-80g"]).static
    assert "student FP8 weight copies" not in estimate_stage(cfg, shape, 0, GPUS["a100-80g"]).static
    off = resolve("qwen3_8b_self_tp2_pp1_8g", ["model.fp8=null"])
    assert "student FP8 weight copies" not in estimate_stage(off, shape, 0, GPUS["h100-80g"]).static


def test_memory_closed_forms_qwen3_8b_tp2():
    """Qwen3-8B at TP=2, DP=4, 32 rollouts per rank, rows of 1024 + 2 x 4000, top-16, bf16."""
    cfg = resolve("qwen3_8b_self_tp2_pp1_8g", [])
    shape, _ = check_layout(cfg, H100x8)
    assert (shape.dp, shape.rows_per_rank, shape.student_row, shape.teacher_row) == (4, 32, (1024 + 2 * L), (1024 + L))
    est = estimate_stage(cfg, shape, 0, GPU3)
    # 8,190,735,360 parameters, of which 308,224 are norms (replicated); the rest is split in two
    per_rank = (8_190_735_360 - 308_224) // 2 + 308_224
    assert est.static["student weights"] == 2 * per_rank
    assert est.static["student grads (fp32)"] == 4 * per_rank
    assert est.static["optimizer (fp32 master + Adam m, v) / 4"] == pytest.approx(12 * per_rank / 4)
    assert est.static["teacher weights"] == 2 * per_rank
    # KV cache: 32 rows x 5024 columns x 36 layers x (k, v) x 4 KV heads x 128 x 2 bytes
    assert est.phases["rollout"]["rollout KV cache"] == 32 * (1024 + L) * 36 * 2 * 4 * 128 * 2
    # top-16 targets of one micro-batch: its rows x 4000 positions x 16 x (fp32 value + int64 id)
    assert est.phases["train"]["teacher targets, top-16 (one micro-batch)"] == shape.micro_batch * L * 16 * 12
    # the student's logits of L + 1 columns in fp32 (Float16Module upcasts the last stage's output), at
    # the (at most L) loss positions a gathered fp32 copy and its gradient (+ the teacher's log-probs
    # gathered, full vocabulary), and one 256-position chunk of fp32 over its vocabulary shard
    # (151936 / 2): never the whole [L, V/tp] fp32 log-softmax (measured: ``plan/measure.py``)
    last = estimate_stage(cfg, shape, shape.pp - 1, GPU3)
    cols, xt = shape.micro_batch * (L + 1), shape.micro_batch * L
    assert last.phases["train"]["student logits + loss"] == (cols + 2 * xt + 256) * 75968 * 4
    full_vocab = estimate_stage(resolve("qwen3_8b_self_tp2_pp1_8g", ["distill.top_k=null"]), shape, 0, GPU3)
    assert full_vocab.phases["train"]["student logits + loss"] == (cols + 3 * xt + 256) * 75968 * 4
    # full recompute: each of the 36 layers keeps its bf16 input [9024, 4096] + one layer rebuilt
    full = est.activations["full"]
    assert 36 * (1024 + 2 * L) * 4096 * 2 < full < 36 * (1024 + 2 * L) * 4096 * 2 + (1024 + 2 * L) * 4096 * 2 * 20
    assert est.activations["none"] > 5 * full


def test_full_vocabulary_targets_and_attention_backends():
    """Qwen3-0.6B: full-vocab targets are a micro-batch's rows x 4000 x 151936 x 4 bytes (not the
    step's 16 rows: one micro-batch of targets lives at a time); 'local' materialises scores."""
    cfg = resolve("qwen3_0_6b_self_tp1_pp1_8g", [])
    shape, _ = check_layout(cfg, H100x8)
    est = estimate_stage(cfg, shape, 0, GPU3)
    assert shape.micro_batch < shape.rows_per_rank == 16
    assert est.phases["train"]["teacher targets, full vocabulary (fp32) (one micro-batch)"] == (
        shape.micro_batch * L * 151936 * 4)
    local = estimate_stage(resolve("qwen3_0_6b_self_tp1_pp1_8g", ["model.attention_backend=local"]), shape, 0, GPU3)
    # no recompute: 28 layers x 9024 queries x 16 heads x 9024 keys x (fp32 + bf16 probabilities) more
    extra = local.activations["none"] - est.activations["none"]
    assert extra == pytest.approx(28 * (1024 + 2 * L) * (16 * (1024 + 2 * L) * 6 + (1024 + 2 * L) - 16 * 4), rel=1e-9)
    assert local.activations["selective"] < 0.1 * local.activations["none"]  # selective drops the scores


SHARED_70B_PP2 = ["parallel.tp=8", "parallel.pp=2", "parallel.teacher=null"]
"""The 70B -> 8B recipe on 32 GPUs as it was before the teacher had its own layout: both at TP=8, PP=2."""


def test_pipeline_stages_and_offload():
    cfg = resolve("llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g", SHARED_70B_PP2)
    cluster = Cluster(4, 8, "h100-80g")
    shape, _ = check_layout(cfg, cluster)
    first, last = estimate_stage(cfg, shape, 0, GPU3), estimate_stage(cfg, shape, 1, GPU3)
    assert "student logits + loss" in last.phases["train"] and "student logits + loss" not in first.phases["train"]
    # 1F1B: the first stage holds 2 micro-batches of layer inputs, the last one
    assert first.activations["full"] > last.activations["full"]
    offloaded = estimate_stage(resolve("llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g",
                                       SHARED_70B_PP2 + ["distill.teacher_offload=true"]), shape, 1, GPU3)
    assert "teacher weights" not in offloaded.static
    assert offloaded.phase_total("rollout") == pytest.approx(last.phase_total("rollout") - last.static["teacher weights"])
    assert offloaded.phase_total("teacher") == pytest.approx(last.phase_total("teacher"))


# --- the teacher at its own layout (parallel.teacher) --------------------------------------------

H100x16 = Cluster(2, 8, "h100-80g")
LLAMA_16G = "llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g"


def test_own_teacher_layout_closed_forms_llama_70b_to_8b():
    """Llama-3.1-70B teacher at TP=8 (DP=2) beside the 8B student at TP=2 (DP=8) on 16 GPUs."""
    cfg = resolve(LLAMA_16G, [])
    shape, _ = check_layout(cfg, H100x16)
    assert (shape.tp, shape.dp, shape.teacher_tp, shape.teacher_pp, shape.teacher_dp) == (2, 8, 8, 1, 2)
    assert shape.served == 4  # student replicas per teacher replica
    est = estimate_stage(cfg, shape, 0, GPU3)
    # 70B: 70,553,706,496 parameters, 80 x 2 x 8192 + 8192 of them norms (replicated); all the rest, the
    # untied 128256-row embedding and output layer included (128256 is a multiple of 128 and 8), split in 8
    norms_t = 80 * 2 * 8192 + 8192
    teacher = (70_553_706_496 - norms_t) // 8 + norms_t
    assert est.static["teacher weights"] == 2 * teacher
    assert est.static["teacher weights"] / GIB == pytest.approx(16.43, abs=0.01)
    # 8B: 8,030,261,248 parameters, 32 x 2 x 4096 + 4096 of them norms; the rest split in 2
    norms_s = 32 * 2 * 4096 + 4096
    student = (8_030_261_248 - norms_s) // 2 + norms_s
    assert est.static["student weights"] == 2 * student
    # the teacher's logits of its last L + 1 columns at its own vocabulary shard (128256 / 8), on every
    # rank (teacher PP=1), and one 256-position chunk of the fp32 normaliser
    assert est.phases["teacher"]["teacher logits (transient)"] == (L + 1) * 16032 * 2 + 256 * 16032 * 4
    # one student stage, padded rows: the targets are exchanged one micro-batch (1 row) at a time
    assert shape.micro_batch == 1 and shape.num_microbatches == 16
    assert est.phases["train"]["teacher targets, top-16 (one micro-batch)"] == L * 16 * 12
    # the teacher side serves its 4 student replicas one per round: one micro-batch's targets and a copy to send
    served = est.phases["teacher"]["teacher targets of one served micro-batch (+ send copy)"]
    assert served == 2 * L * 16 * 12


def _held_targets(spec, overrides, cluster):
    cfg = resolve(spec, overrides)
    shape, _ = check_layout(cfg, cluster)
    train = estimate_stage(cfg, shape, shape.pp - 1, GPU3).phases["train"]
    return {k: v for k, v in train.items() if k.startswith("teacher targets")}


def test_targets_scale_with_the_micro_batches_only_when_exchanged_before_the_pass():
    """An own teacher layout exchanges targets per micro-batch at student PP=1 (the recipe), and a
    whole step's before the pass at PP=2 (student DP 4: 32 or 64 rows per rank); the shared layout
    streams them."""
    one = {"teacher targets, top-16 (one micro-batch)": L * 16 * 12}
    per_mb = [_held_targets(LLAMA_16G, [f"train.prompts_per_step={n}"], H100x16) for n in (128, 256)]
    assert per_mb == [one, one]
    first = [_held_targets(LLAMA_16G, ["parallel.pp=2", f"train.prompts_per_step={n}"], H100x16) for n in (128, 256)]
    assert first == [{"teacher targets, top-16 (all 32 micro-batches)": 32 * L * 16 * 12},
                     {"teacher targets, top-16 (all 64 micro-batches)": 64 * L * 16 * 12}]
    shared = [_held_targets(LLAMA_16G, ["parallel.teacher=null", f"train.prompts_per_step={n}"], H100x16)
              for n in (128, 256)]
    assert shared == [one, one]


def test_own_teacher_full_vocabulary_targets_are_cut_to_the_student_shard():
    """Qwen3-4B -> 0.6B (full vocabulary) with the teacher at TP=2: the student (TP=1) holds one row's
    log-probs over all 151936 ids (one micro-batch; with packed rows all 16 rows'); each teacher rank
    keeps its half for one student micro-batch (packed: replica) at a time."""
    cfg = resolve("qwen3_4b_to_0_6b_tp1_pp1_8g", ["parallel.teacher.tp=2"])
    shape, _ = check_layout(cfg, H100x8)
    assert (shape.dp, shape.teacher_dp, shape.served, shape.micro_batch) == (8, 4, 2, 1)
    est = estimate_stage(cfg, shape, 0, GPU3)
    held = est.phases["train"]["teacher targets, full vocabulary (fp32) (one micro-batch)"]
    assert held == L * 151936 * 4
    assert est.phases["teacher"]["teacher targets of one served micro-batch (+ send copy)"] == (
        2 * L * (151936 // 2) * 4)
    packed = resolve("qwen3_4b_to_0_6b_tp1_pp1_8g", ["parallel.teacher.tp=2", "train.pack_tokens=16384"])
    est = estimate_stage(packed, shape, 0, GPU3)
    assert est.phases["train"]["teacher targets, full vocabulary (fp32) (all 16 micro-batches)"] == (
        16 * L * 151936 * 4)
    assert est.phases["teacher"]["teacher targets of one served student replica (+ send copy)"] == (
        2 * 16 * L * (151936 // 2) * 4)


def test_own_teacher_layout_in_the_report(capsys):
    assert plan_main([LLAMA_16G]) == 0
    out = capsys.readouterr().out
    assert "layout  tp=2 pp=1 dp=8 (teacher: tp=8 pp=1 dp=2, parallel.teacher); 16 rollouts per DP rank" in out
    assert "ok    layout tp=2 pp=1 dp=8 (teacher: tp=8 pp=1 dp=2, parallel.teacher) on 16 GPUs" in out


def test_own_teacher_layout_errors_and_notes(capsys):
    # the teacher's TP x PP must divide the world, and its TP the teacher's heads
    assert plan_main(["qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g", "--gpus-per-node", "4"]) == 2
    assert "world size 4 is not divisible by the teacher's tp*pp = 8*1 (parallel.teacher)" in capsys.readouterr().err
    assert plan_main([LLAMA_16G, "parallel.teacher.tp=3"]) == 2
    assert "teacher_model.num_attention_heads=64 is not divisible by parallel.teacher.tp=3" in capsys.readouterr().err
    # 24 GPUs: student TP=2 x PP=3 (DP=4), teacher TP=8 (DP=3): replicas serve 1 or 2 student replicas
    assert plan_main(["qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g", "parallel.pp=3", "--nodes", "3"]) == 0
    assert "note  teacher DP=3 does not divide student DP=4: teacher replicas serve 1 or 2" in capsys.readouterr().out
    # nodes of 4 GPUs: the teacher's TP=8 spans two
    plan_main([LLAMA_16G, "--gpus-per-node", "4"])
    out = capsys.readouterr().out
    assert "note  parallel.teacher.tp=8 spans nodes (4 GPUs per node)" in out and "note  parallel.tp=" not in out


def test_big_shared_teacher_suggests_its_own_tp(capsys):
    """The 70B teacher sharing the student's TP=2 does not fit; the plan offers the teacher alone at
    TP=8 (the recipe), and that suggestion fits when applied."""
    assert plan_main([LLAMA_16G, "parallel.teacher=null"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "teacher at its own TP" in ln)
    assert "parallel.teacher.tp=8 parallel.teacher.pp=1" in line and line.endswith("fits")
    assert make_plan(resolve(LLAMA_16G, ["parallel.teacher=null", "parallel.teacher.tp=8"]), H100x16).fits
    # a self-distilled teacher is no large share: not offered
    plan_main(["qwen3_8b_self_tp2_pp1_8g", "model.recompute=none", "--gpu", "a100-40g"])
    assert "teacher at its own TP" not in capsys.readouterr().out


# --- checks against files on disk ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """config.json + tokenizer of the tiny shape (teacher), a 4-layer one, and a foreign tokenizer."""
    from nemo_opdlm.eval.synthetic import build_tokenizer
    from tests.convert_models import save_tokenizer

    root = tmp_path_factory.mktemp("plan_ckpt")
    dirs = {}
    for name, shape in (("t2", tiny_shape()), ("t4", tiny_shape(4))):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf_config(shape)))
        build_tokenizer().save_pretrained(str(d))
        dirs[name] = str(d)
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps(hf_config(tiny_shape())))
    save_tokenizer(str(foreign), vocab=25)  # w0..w24: same size, different tokens
    dirs["foreign"] = str(foreign)
    data = root / "train.jsonl"
    data.write_text('{"prompt": "Q: 1+1=? A:"}\n')
    dirs["data"] = str(data)
    return dirs


def _plan(spec, overrides, require=True):
    return make_plan(resolve(spec, overrides), Cluster(1, 2, "cpu"), require_paths=require)


def _errors(rep):
    return [f.text for f in rep.findings if f.level == "error"]


def test_matching_checkpoint_passes(tiny_dirs):
    rep = _plan("tiny:tiny_self_tp1_pp1_2g", [f"init.teacher_hf={tiny_dirs['t2']}", f"data.path={tiny_dirs['data']}"])
    assert rep.ok, _errors(rep)
    assert any("[MASK] id 2 is the special token '[MASK]'" in f.text for f in rep.findings)


def test_checkpoint_with_other_architecture_is_refused(tiny_dirs):
    rep = _plan("tiny:tiny_self_tp1_pp1_2g", [f"init.teacher_hf={tiny_dirs['t4']}", f"data.path={tiny_dirs['data']}"])
    assert not rep.ok
    assert "num_layers=2 vs num_hidden_layers=4" in _errors(rep)[0]


def test_mask_id_that_is_a_real_token_is_refused(tiny_dirs):
    rep = _plan("tiny:tiny_self_tp1_pp1_2g", [f"init.teacher_hf={tiny_dirs['t2']}", f"data.path={tiny_dirs['data']}",
                                              "diffusion.mask_token_id=10"])
    assert any("diffusion.mask_token_id=10 is the ordinary token" in e for e in _errors(rep))


def test_teacher_and_student_tokenizers_must_agree(tiny_dirs):
    base = [f"init.teacher_hf={tiny_dirs['t4']}", f"data.path={tiny_dirs['data']}"]
    good = _plan("tiny:tiny_4l_to_2l_tp1_pp1_2g", base + [f"init.student_hf={tiny_dirs['t2']}"])
    assert good.ok, _errors(good)
    bad = _plan("tiny:tiny_4l_to_2l_tp1_pp1_2g", base + [f"init.student_hf={tiny_dirs['foreign']}"])
    assert any("teacher and student tokenizers differ at 25 ids" in e for e in _errors(bad))


def test_missing_paths_are_notes_unless_required(tiny_dirs, capsys):
    spec = ["tiny:tiny_self_tp1_pp1_2g", "init.teacher_hf=/nonexistent/hf", "data.path=/nonexistent/p.jsonl"]
    assert _plan(spec[0], spec[1:], require=False).ok
    assert plan_main(spec + ["--require-paths"]) == 1
    out = capsys.readouterr().out
    assert "error teacher checkpoint /nonexistent/hf not found here" in out
    assert "refused: 2 check(s) failed" in out


def test_get_prints_resolved_values(capsys):
    assert plan_main(["qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g", "--get", "parallel.tp", "--get", "init.student_hf",
                      "--get", "teacher.num_layers", "--get", "init.teacher_checkpoint",
                      "--get", "parallel.teacher.tp"]) == 0
    assert capsys.readouterr().out.splitlines() == ["2", "hf/Qwen3-8B", "64", "", "4"]
    # a key under an unset section is unset (slurm/opdlm_job.sh then imports the teacher at the student's TP)
    assert plan_main(["qwen3_8b_self_tp2_pp1_8g", "--get", "parallel.teacher.tp", "--get", "parallel.tp"]) == 0
    assert capsys.readouterr().out.splitlines() == ["", "2"]


def test_usable_memory_and_json(capsys):
    assert usable_bytes(H100x8) == pytest.approx(79.6 * 0.95 * GIB)
    assert plan_main(["qwen3_1_7b_self_tp1_pp1_8g", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["shape"]["dp"] == 8 and data["peak_bytes"] < data["usable_bytes"]
    assert os.path.basename(data["recipe"]) == "qwen3_1_7b_self_tp1_pp1_8g"
