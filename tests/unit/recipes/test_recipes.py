"""Recipes: names match layouts, the paper's defaults, and model shapes against published parameter counts."""

from __future__ import annotations

import re

import pytest

from nemo_opdlm import recipes
from nemo_opdlm.config import ConfigError
from nemo_opdlm.recipes.lookup import load_recipe, resolve
from nemo_opdlm.plan.layout import Cluster, check_layout
from nemo_opdlm.plan.memory import stage_params
from nemo_opdlm.plan.report import make_plan
from nemo_opdlm.recipes import models as m
from nemo_opdlm.runtime.distributed import TeacherLayout

NAME = re.compile(r"_tp(\d+)_pp(\d+)_(\d+)g$")
TEACHER_NAME = re.compile(r"_tp(\d+)_pp(\d+)_to_")
"""A teacher with its own layout has it spelt after its size: ``llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g``."""


@pytest.mark.parametrize("name", sorted(recipes.ALL_RECIPES))
def test_name_spells_the_layout_and_cluster(name):
    cfg = load_recipe(name)
    tp, pp, gpus = map(int, NAME.search(name).groups())
    assert (cfg.parallel.tp, cfg.parallel.pp) == (tp, pp)
    own = TEACHER_NAME.search(name)
    assert cfg.parallel.teacher == (own and TeacherLayout(tp=int(own[1]), pp=int(own[2])))
    assert recipes.CLUSTERS[name].world_size == gpus
    assert cfg.name == name
    # the module:function spelling resolves to the same config
    module = recipes.ALL_RECIPES[name].__module__.split(".")[-1]
    assert load_recipe(f"{module}:{name}") == cfg


@pytest.mark.parametrize("name", sorted(recipes.GPU_RECIPES))
def test_paper_hyperparameters(name):
    cfg = load_recipe(name)
    o, r = cfg.optim, cfg.rollout
    assert (o.lr, o.min_lr, o.warmup_steps, o.clip_grad) == (1e-5, 1e-6, 5, 1.0)
    assert o.distributed_optimizer
    # block 4, one token per round statically; the larger-block continuations keep that rule
    assert cfg.diffusion.block_size == 4 or "_b8_" in name or "_b16_" in name
    assert (r.steps_per_block or cfg.diffusion.block_size) == cfg.diffusion.block_size
    assert (r.mode, r.threshold, r.temperature, r.top_p, r.top_k) == ("dynamic", 0.9, 1.0, 1.0, 0)
    assert (r.min_length, r.max_length, r.curriculum_steps) == (100, 4000, 100)
    assert cfg.train.prompts_per_step == 128 and cfg.train.micro_batch_size == 1
    assert cfg.model.params_dtype == "bfloat16" and cfg.model.recompute == "full"
    # full-vocabulary KL at 0.6B / 1.7B students, top-16 from 4B up
    small = cfg.model.hidden_size <= 2048
    assert cfg.distill.top_k == (None if small else 16)
    assert cfg.distill.method == "opdlm"
    # the [MASK] id is a row of the embedding that is not an end-of-turn token
    assert cfg.diffusion.mask_token_id < cfg.model.vocab_size
    assert cfg.diffusion.mask_token_id not in m.QWEN3_EOS_IDS + m.LLAMA31_EOS_IDS
    # larger teachers need the student's own weights
    assert (cfg.teacher_model is None) == (cfg.init.student_hf is None)


OWN_TEACHER = {  # recipe -> (student TP, teacher TP, teacher PP, teacher DP, student DP)
    "llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g": (2, 8, 1, 2, 8),
    "llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g": (2, 8, 1, 4, 16),
    "qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g": (2, 8, 1, 1, 4),
    "qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g": (2, 4, 1, 4, 8),
    "qwen25_32b_tp4_pp1_to_7b_tp2_pp1_8g": (2, 4, 1, 2, 4),
}
"""The recipes whose big teacher has its own layout, so that the student trains at TP=2."""


@pytest.mark.parametrize("name", sorted(OWN_TEACHER))
def test_own_teacher_layout_fits_where_a_shared_one_does_not(name):
    """Each fits its cluster (``opdlm plan``), every teacher replica serving as many student replicas;
    the teacher sharing the student's TP=2 would not fit: the own layout is what keeps the student at TP=2."""
    cfg = load_recipe(name)
    shape = recipes.CLUSTERS[name]
    cluster = Cluster(shape.nodes, shape.gpus_per_node, shape.gpu)
    layout, _ = check_layout(cfg, cluster)
    assert (layout.tp, layout.teacher_tp, layout.teacher_pp, layout.teacher_dp, layout.dp) == OWN_TEACHER[name]
    assert layout.dp % layout.teacher_dp == 0
    assert make_plan(cfg, cluster).ok
    assert not make_plan(resolve(name, ["parallel.teacher=null"]), cluster).fits


# Published counts: non-embedding parameters from the Qwen3 model cards (0.44B, 1.4B, 3.6B, 6.95B, 31.2B);
# exact totals of Llama-3.1-8B / 70B and Qwen2.5-7B (safetensors metadata) and Qwen2.5-32B.
NON_EMBEDDING = {m.qwen3_0_6b: (0.44e9, 0.005e9), m.qwen3_1_7b: (1.4e9, 0.05e9), m.qwen3_4b: (3.6e9, 0.05e9),
                 m.qwen3_8b: (6.95e9, 0.005e9), m.qwen3_32b: (31.2e9, 0.05e9)}
"""Shape -> (model card's non-embedding count, half its last printed digit)."""
TOTAL = {m.llama31_8b: 8_030_261_248, m.llama31_70b: 70_553_706_496, m.qwen25_7b: 7_615_616_512,
         m.qwen25_32b: 32_763_876_352}


@pytest.mark.parametrize("shape,published", list(NON_EMBEDDING.items()), ids=lambda x: getattr(x, "__name__", ""))
def test_qwen3_shapes_match_published_non_embedding_counts(shape, published):
    cfg = shape()
    count, rounding = published
    embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert cfg.padded_vocab_size(1) == cfg.vocab_size  # 151936 is a multiple of 128: no padding rows
    assert stage_params(cfg, 1, 1, 0) - embedding == pytest.approx(count, abs=rounding)


@pytest.mark.parametrize("shape,published", list(TOTAL.items()), ids=lambda x: getattr(x, "__name__", ""))
def test_llama_and_qwen25_shapes_match_published_totals(shape, published):
    assert stage_params(shape(), 1, 1, 0) == published


def test_shape_facts():
    q06, q8, l8 = m.qwen3_0_6b(), m.qwen3_8b(), m.llama31_8b()
    assert q06.tie_word_embeddings and not q8.tie_word_embeddings and q06.qk_layernorm
    assert q06.kv_channels == 128 and q06.hidden_size == 1024  # head_dim * heads (2048) != hidden
    assert l8.rope_scaling is not None and l8.rope_scaling.factor == 8.0 and l8.rotary_base == 500_000.0
    assert m.qwen25_7b().add_qkv_bias and not m.qwen25_7b().qk_layernorm
    assert (m.qwen3_32b().num_attention_heads, m.qwen25_32b().num_attention_heads) == (64, 40)


def test_overrides_apply_and_typos_are_refused():
    cfg = resolve("qwen3_8b_self_tp2_pp1_8g", ["train.steps=10", "rollout.threshold=0.8"])
    assert cfg.train.steps == 10 and cfg.rollout.threshold == 0.8
    with pytest.raises(ConfigError, match="did you mean 'rollout.threshold'"):
        resolve("qwen3_8b_self_tp2_pp1_8g", ["rollout.treshold=0.8"])
    with pytest.raises(ConfigError, match="did you mean 'qwen3_8b_self_tp2_pp1_8g'"):
        load_recipe("qwen3:qwen3_8b_self_tp2_pp1_8")


def test_teacher_with_fewer_rows_than_its_student_is_refused():
    """A Qwen3 teacher (151,936 rows) cannot teach a Qwen2.5-7B student (152,064): the student's last rows
    would have no teacher probability. (A larger teacher of another family passes this check; the
    tokenizers' comparison at start-up, ``training.setup.load_tokenizer``, refuses that pair.)"""
    with pytest.raises(ConfigError, match="teacher_model.vocab_size=151936 is below model.vocab_size=152064"):
        resolve("qwen25_32b_tp4_pp1_to_7b_tp2_pp1_8g",
                [f"teacher_model.{k}={v}" for k, v in dict(vocab_size=151936, num_layers=36, hidden_size=4096,
                                                           ffn_hidden_size=12288, num_attention_heads=32,
                                                           num_query_groups=8).items()])


@pytest.mark.parametrize("base, continued", [
    ("qwen3_0_6b_self_tp1_pp1_8g", "qwen3_0_6b_self_b8_tp1_pp1_8g"),
    ("qwen3_0_6b_self_b8_tp1_pp1_8g", "qwen3_0_6b_self_b16_tp1_pp1_8g"),
    ("tiny_convert_4l_tp1_pp1_1g", "tiny_convert_4l_b8_tp1_pp1_1g"),
    ("tiny_convert_4l_b8_tp1_pp1_1g", "tiny_convert_4l_b16_tp1_pp1_1g"),
])
def test_a_larger_block_stage_changes_only_the_block_its_schedule_and_the_steps(base, continued):
    """A continuation resumes its base's run directory: nothing but the name, the block size, the
    rounds per block (unset: the block size) and the steps may differ, or the resume would refuse it
    or train something else."""
    from nemo_opdlm.config import to_dict
    from nemo_opdlm.training.run_config import changes

    a, b = resolve(base), resolve(continued)
    assert b.train.save_dir == a.train.save_dir and b.diffusion.block_size == 2 * a.diffusion.block_size
    assert b.train.steps > a.train.steps and b.rollout.max_length % b.diffusion.block_size == 0
    changed = {line.split(":")[0] for line in changes(to_dict(a), b)}
    assert changed <= {"name", "diffusion.block_size", "rollout.steps_per_block", "train.steps"}, changed


def test_qwen25_7b_teacher_is_read_with_the_1_5b_students_rows():
    """Qwen2.5-7B (152,064 rows) into Qwen2.5-1.5B (151,936): one tokenizer, the teacher's extra rows
    are padding and are dropped when it is built (``RunConfig.teacher_built``)."""
    cfg = load_recipe("qwen25_7b_to_1_5b_tp1_pp1_8g")
    assert (cfg.teacher.vocab_size, cfg.teacher_built.vocab_size, cfg.model.vocab_size) == (152064, 151936, 151936)
    assert cfg.teacher_built.num_layers == cfg.teacher.num_layers == 28 and cfg.model.hidden_size == 1536
    assert cfg.diffusion.mask_token_id == m.QWEN25_MASK_ID < cfg.model.vocab_size
