"""Converter pieces against independent references: fusing rules, safetensors I/O, HF configs, the
exported modeling file's mask rule. No megatron runtime."""

from __future__ import annotations

import ast
import json
import os
import struct

import pytest
import torch

from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert import key_maps as km
from nemo_opdlm.checkpoint.errors import CheckpointFileError, VocabMismatchError
from nemo_opdlm.convert.errors import UnsupportedArchitectureError
from nemo_opdlm.convert.hf_to_mcore import HFCheckpoint
from nemo_opdlm.convert.mcore_to_hf import MODELING_FILE
from nemo_opdlm.convert.safetensors_io import SafetensorsFile, write_safetensors
from nemo_opdlm.models import masks
from tests.convert_models import hf_config, save_hf, save_tokenizer
from tests.tiny import tiny_model


# --- fusing -----------------------------------------------------------------------------------

def reference_fused_qkv(q, k, v, heads, groups, d):
    """megatron's layout written out head by head: for each group, its query heads, then k, v."""
    rows = []
    hpg = heads // groups
    for g in range(groups):
        for h in range(g * hpg, (g + 1) * hpg):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize("heads,groups,tp", [(4, 2, 1), (4, 2, 2), (8, 2, 2), (4, 4, 4), (6, 1, 1)])
def test_qkv_fuse_matches_reference_and_tp_shards(heads, groups, tp):
    d, h = 3, 5
    cfg = tiny_model(num_attention_heads=heads, num_query_groups=groups, head_dim=d * 2, hidden_size=h * 4)
    d = cfg.kv_channels
    q = torch.randn(heads * d, h)
    k = torch.randn(groups * d, h)
    v = torch.randn(groups * d, h)
    full = km.fuse_qkv(q, k, v, groups)
    assert torch.equal(full, reference_fused_qkv(q, k, v, heads, groups, d))
    rule = km.LAYER_RULES[1]
    shards = []
    for r in range(tp):
        parts = [t[slice(*km.shard_rows(rule, cfg, j, r, tp))] for j, t in enumerate((q, k, v))]
        shards.append(km.fuse_qkv(*parts, groups // tp))
    # Megatron's TP shard r of the fused weight is rows r of the full fused tensor split in tp.
    assert torch.equal(torch.cat(shards), full)
    back = km.to_hf(rule, cfg, shards)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_gate_up_per_shard_layout_round_trip():
    cfg = tiny_model(ffn_hidden_size=8)
    gate, up = torch.randn(8, 64), torch.randn(8, 64)
    rule = km.LAYER_RULES[7]
    shards = [km.fuse_gate_up(gate[r * 4:(r + 1) * 4], up[r * 4:(r + 1) * 4]) for r in range(2)]
    assert torch.equal(shards[1][:4], gate[4:]) and torch.equal(shards[1][4:], up[4:])
    back = km.to_hf(rule, cfg, shards)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_vocab_rows_clip_to_real_vocab_and_export_strips_padding():
    cfg = tiny_model(vocab_size=100, make_vocab_size_divisible_by=64)  # padded 128: 64 rows per TP rank
    assert km.shard_rows(km.EMBEDDING, cfg, 0, 0, 2) == (0, 64)
    assert km.shard_rows(km.EMBEDDING, cfg, 0, 1, 2) == (64, 100)
    shards = [torch.randn(64, 3), torch.randn(64, 3)]
    (full,) = km.to_hf(km.EMBEDDING, cfg, shards)
    assert full.shape == (100, 3) and torch.equal(full[64:], shards[1][:36])


def test_every_hf_tensor_has_exactly_one_rule():
    for family, extra in (("qwen3", dict(qk_layernorm=True, tie_word_embeddings=True)),
                          ("qwen2", dict(qk_layernorm=False, add_qkv_bias=True)),
                          ("llama", dict(qk_layernorm=False))):
        cfg = tiny_model(family=family, **extra)
        expected = set(km.expected_hf_shapes(cfg))
        rules = [r for r in km.LAYER_RULES if r.applies(cfg)]
        produced = [n.format(i=i) for i in range(cfg.num_layers) for r in rules for n in r.hf]
        produced += ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_word_embeddings:
            produced.append("lm_head.weight")
        assert sorted(produced) == sorted(expected)


# --- safetensors I/O --------------------------------------------------------------------------

def test_reader_equals_safetensors_library_including_row_ranges(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(7, 5), "b": torch.randn(3, 4).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64),
               "e": torch.zeros(0, 3)}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    f = SafetensorsFile(path)
    ref = load_file(path)
    for name in tensors:
        assert torch.equal(f.read(name), ref[name])
    assert torch.equal(f.read("a", (2, 5)), ref["a"][2:5])
    assert torch.equal(f.read("b", (1, 3)), ref["b"][1:3])


def test_writer_is_read_by_safetensors_library(tmp_path):
    from safetensors import safe_open

    tensors = [("x", torch.randn(4, 3)), ("y", torch.randn(5).to(torch.bfloat16)), ("z", torch.randn(6, 4)[:, 1])]
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, tensors)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors:
            assert torch.equal(f.get_tensor(name), t)


def test_corrupt_and_truncated_files_are_named(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.randn(10, 10)}, path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-8])
    with pytest.raises(CheckpointFileError, match="truncated"):
        SafetensorsFile(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointFileError, match="corrupt"):
        SafetensorsFile(path)
    with open(path, "wb") as f:
        f.write(b"abc")
    with pytest.raises(CheckpointFileError, match="corrupt"):
        SafetensorsFile(path)


def test_hf_checkpoint_refuses_missing_shard_and_index_mismatch(tmp_path):
    d = str(tmp_path / "q2")
    save_hf("qwen2", d)
    HFCheckpoint(d)  # valid
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[2]
    os.rename(os.path.join(d, victim), os.path.join(d, "moved"))
    with pytest.raises(CheckpointFileError, match=victim):
        HFCheckpoint(d)
    os.rename(os.path.join(d, "moved"), os.path.join(d, victim))
    name = next(n for n, s in index["weight_map"].items() if s == victim)
    index["weight_map"][name] = sorted(set(index["weight_map"].values()))[0]
    json.dump(index, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointFileError, match="does not contain"):
        HFCheckpoint(d)


def test_hf_checkpoint_refuses_vocab_and_shape_mismatch(tmp_path):
    """A model config that differs from the directory's config.json names every differing field (a
    run with model.num_layers=1 on a 2-layer teacher used to hear of 'an architecture feature that
    is not supported'); without a config.json, the tensors themselves are checked."""
    from nemo_opdlm.checkpoint.errors import ArchitectureMismatchError

    d = str(tmp_path / "ll")
    save_hf("llama", d)
    cfg = hfc.model_config_from_hf(hfc.read_hf_config(d))
    HFCheckpoint(d).check_matches(cfg)
    with pytest.raises(ArchitectureMismatchError, match=r"config.json describes another model.*: "
                                                        r"model.vocab_size=120 vs vocab_size=100 .*set model.\*"):
        HFCheckpoint(d).check_matches(cfg.replace(vocab_size=120), "model.")
    with pytest.raises(ArchitectureMismatchError, match=r"num_layers=1 vs num_hidden_layers=2; "
                                                        r"rotary_base=1\.0 vs rope_theta=500000\.0"):
        HFCheckpoint(d).check_matches(cfg.replace(num_layers=1, rotary_base=1.0))
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(VocabMismatchError, match="embed_tokens"):
        HFCheckpoint(d).check_matches(cfg.replace(vocab_size=120))
    with pytest.raises(CheckpointFileError, match="lacks"):
        HFCheckpoint(d).check_matches(cfg.replace(num_layers=3))
    with pytest.raises(CheckpointFileError, match="has layers up to 1 but the model being loaded has "
                                                  "model.num_layers=1"):
        HFCheckpoint(d).check_matches(cfg.replace(num_layers=1), "model.")


# --- HF configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_model_config_from_transformers_config(family):
    hf = hf_config(family).to_dict()
    cfg = hfc.model_config_from_hf(hf)
    assert cfg.family == family
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 96)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (4, 2, 100)
    assert cfg.qk_layernorm == (family == "qwen3")
    assert cfg.add_qkv_bias == (family == "qwen2")
    assert cfg.tie_word_embeddings == (family == "qwen3")
    assert cfg.kv_channels == (24 if family == "qwen3" else 16)
    assert cfg.norm_eps == hf["rms_norm_eps"]
    if family == "llama":
        assert cfg.rotary_base == 500000.0
        assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 32
    else:
        assert cfg.rope_scaling is None
    again = hfc.model_config_from_hf(hfc.hf_config_from_model(cfg))
    assert again == cfg


def test_transformers4_rope_spelling_is_read():
    hf = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, "torch_dtype": "bfloat16"}
    cfg = hfc.model_config_from_hf(hf)
    assert cfg.rotary_base == 500000.0 and cfg.rope_scaling.factor == 32.0 and cfg.params_dtype == "bfloat16"


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "Qwen3ForCausalLM"),
    ({"use_sliding_window": True}, "sliding"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
])
def test_unsupported_architectures_are_named(change, match):
    hf = dict(hf_config("qwen2").to_dict(), **change)
    with pytest.raises(UnsupportedArchitectureError, match=match) as info:
        hfc.model_config_from_hf(hf)
    if "architectures" in change:
        assert "LlamaForCausalLM" in str(info.value) and "Qwen2ForCausalLM" in str(info.value)


def test_llama_o_proj_bias_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="attention_bias"):
        hfc.model_config_from_hf(dict(hf_config("llama").to_dict(), attention_bias=True))


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    save_tokenizer(str(tmp_path), 120)
    assert hfc.tokenizer_vocab_size(str(tmp_path)) == 120
    hfc.check_tokenizer_fits(str(tmp_path), 128)
    with pytest.raises(VocabMismatchError, match="119"):
        hfc.check_tokenizer_fits(str(tmp_path), 100)
    with pytest.raises(VocabMismatchError, match="teacher vocab_size=100"):
        hfc.check_same_vocab(tiny_model(vocab_size=100), tiny_model(vocab_size=101))


# --- the exported modeling file ---------------------------------------------------------------

def _modeling_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("opdlm_modeling_under_test", MODELING_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["modeling_opdlm.py", "configuration_sdar.py", "modeling_sdar.py"])
def test_modeling_files_import_only_torch_transformers_and_each_other(name):
    """The shipped files run where nemo_opdlm is absent: beside the standard library, torch and
    transformers they import only files shipped with them (relative imports)."""
    from nemo_opdlm.convert.sdar import HF_MODELING_DIR, SDAR_FILES

    tree = ast.parse(open(os.path.join(HF_MODELING_DIR, name)).read())
    roots, siblings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            siblings.add(f"{node.module}.py")
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "copy", "math", "typing", "torch", "transformers"}, roots
    assert siblings <= set(SDAR_FILES), siblings


def test_modeling_frame_equals_the_grid_module():
    """The exported decoder's restatement of the block grids (heads, the frame of left-padded
    prompts) equals ``models/grid.py``, the rule the sampler and the training states follow."""
    from nemo_opdlm.models import grid

    mod = _modeling_module()
    g = torch.Generator().manual_seed(2)
    lens = torch.tensor([0, 1, 3, 4, 5, 7, 8])
    width = int(lens.max())
    ids = torch.randint(1, 50, (len(lens), width), generator=g)
    mask = (torch.arange(width)[None, :] >= (width - lens)[:, None]).long()
    ids = ids * mask
    for block_size, name in ((4, "absolute"), (3, "absolute"), (1, "absolute"), (4, "response")):
        head = mod.head_lengths(lens, block_size, name)
        assert torch.equal(head, grid.head_lengths(lens, block_size, name))
        prefix, prefix_mask, head_ids = mod.frame_prompts(ids, mask, head, 0)
        ref = grid.frame_prompts(ids, lens, block_size, name, pad_id=0)
        assert torch.equal(prefix, ref.prefix_ids) and torch.equal(prefix_mask.sum(1), ref.prefix_lens)
        assert torch.equal(head_ids, ref.head_ids)
        room = torch.cat([ids, torch.zeros_like(ids[:, :block_size])], dim=1)  # columns to roll into
        assert torch.equal(mod.roll_left(mod.roll_right(room, head, 0), head, 0), room)


def test_modeling_mask_rule_equals_training_rule():
    mod = _modeling_module()
    g = torch.Generator().manual_seed(0)
    for block_size, with_xt in ((1, False), (4, True), (3, True), (4, False)):
        lens = torch.randint(0, 7, (3,), generator=g)
        valid = torch.rand(3, 9, generator=g) > 0.2
        lay = masks.build_layout(lens, 6, valid, block_size, with_xt)
        assert torch.equal(mod.allowed(lay.meta, lay.meta), masks.allowed(lay.meta, lay.meta))
        # Cached form: the queries are the last Sq keys.
        sq = 5
        assert torch.equal(mod.allowed(lay.meta[..., -sq:], lay.meta), masks.allowed(lay.meta[..., -sq:], lay.meta))
    # The prompt layout of `generate` is the training layout's prompt part.
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    meta, pos = mod.prompt_layout(am, 4)
    ref = masks.build_layout(am.sum(1), 5, torch.ones(3, 0, dtype=torch.bool), 4, with_xt=False)
    assert torch.equal(meta, ref.meta) and torch.equal(pos, ref.position_ids)


def test_modeling_select_rule():
    mod = _modeling_module()
    conf = torch.tensor([[0.5, 0.95, 0.2, 0.91], [0.3, 0.3, 0.1, 0.3]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    static = mod._select(conf, masked, 1, None)
    assert static.tolist() == [[False, True, False, False], [True, False, False, False]]  # ties: leftmost
    dyn = mod._select(conf, masked, 1, 0.9)
    assert dyn.tolist() == [[False, True, False, False], [True, False, False, False]]
    dyn = mod._select(conf, masked, 1, 0.25)
    assert dyn.tolist() == [[True, True, False, False], [True, True, False, True]]
    assert mod._schedule(4, 3) == [2, 1, 1]


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_exported_student_config_reads_back_as_its_source(family):
    """An exported student's config.json gives the same architecture and its diffusion settings, so
    ``opdlm eval --hf`` and the lm-eval adapter load an export directory as they load the source."""
    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.models.config import DiffusionConfig
    from tests.convert_models import hf_config

    source = hf_config(family).to_dict()
    cfg = hfc.model_config_from_hf(source)
    diffusion = DiffusionConfig(block_size=8, mask_token_id=97, shift_logits=True, block_grid="absolute")
    student = json.loads(json.dumps(hfc.student_hf_config(cfg, diffusion, source)))
    assert hfc.is_student_config(student) and not hfc.is_student_config(source)
    assert hfc.model_config_from_hf(student) == cfg
    assert hfc.student_diffusion(student) == diffusion
    del student["block_grid"]  # an export written before the setting existed: trained on the response grid
    assert hfc.student_diffusion(student).block_grid == "response"


def test_sdar_config_reads_back_as_its_source():
    """An SDAR-format export's config.json (Qwen3's fields) gives the Qwen3 architecture and the
    student's diffusion settings back, so the project's own readers load it as they load the source."""
    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.convert.sdar import sdar_hf_config
    from nemo_opdlm.models.config import DiffusionConfig
    from tests.convert_models import hf_config

    source = hf_config("qwen3").to_dict()
    cfg = hfc.model_config_from_hf(source)
    diffusion = DiffusionConfig(block_size=4, mask_token_id=99, block_grid="absolute")
    sdar = json.loads(json.dumps(sdar_hf_config(cfg, diffusion, source, "float32")))
    assert hfc.is_student_config(sdar)
    assert hfc.model_config_from_hf(sdar) == cfg
    assert hfc.student_diffusion(sdar) == diffusion
