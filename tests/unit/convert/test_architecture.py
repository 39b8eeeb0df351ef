"""Bring your own model: the run's architecture and [MASK] id read from the user's files.

A random 4-layer Qwen3 saved with ``save_pretrained`` and a word-level tokenizer built here (as a
new user's model and tokenizer would be): a run that leaves ``model`` out gets the checkpoint's
shape, RoPE base, norm epsilon, RoPE scaling and tying; one that states a different shape is
refused with every differing field named, before any model is built; ``diffusion.mask_token_id``
defaults to the tokenizer's mask token and refuses ids that text uses.
"""

from __future__ import annotations

import json
import os

import pytest

from nemo_opdlm.checkpoint.errors import ArchitectureMismatchError
from nemo_opdlm.config import RunConfig, from_dict, to_dict
from nemo_opdlm.recipes.lookup import resolve
from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert.architecture import model_config_of_weights
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.describe import model_config_to_dict
from tests.convert_models import save_hf, save_tokenizer

pytest.importorskip("transformers")

SHAPE = dict(num_hidden_layers=4, intermediate_size=256, rope_theta=50000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False, max_position_embeddings=512)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A random 4-layer Qwen3 (untied, rope_theta 5e4, eps 1e-5), its tokenizer ([MASK] = id 99) and
    a prompt file."""
    d = str(tmp_path_factory.mktemp("byo") / "qwen3")
    save_hf("qwen3", d, shard="10MB", **SHAPE)
    with open(os.path.join(os.path.dirname(d), "train.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "w5 w6 w7"}) + "\n")
    return d


def _run(hf_dir: str, **sections) -> dict:
    data = {"diffusion": {"block_size": 4}, "init": {"teacher_hf": hf_dir},
            "data": {"path": os.path.join(os.path.dirname(hf_dir), "train.jsonl"), "max_prompt_tokens": 16,
                     "chat_template": "never"},
            "rollout": {"min_length": 8, "max_length": 16}, "train": {"prompts_per_step": 2}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.update({key: value})
    return data


def test_model_and_mask_come_from_the_checkpoint_and_tokenizer(user_model, tmp_path):
    written = from_dict(RunConfig, _run(user_model))
    assert written.model is None and written.diffusion.mask_token_id is None  # as written: nothing read yet
    cfg = written.complete()
    m = cfg.model
    assert (m.family, m.num_layers, m.hidden_size, m.ffn_hidden_size) == ("qwen3", 4, 64, 256)
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels, m.vocab_size) == (4, 2, 24, 100)
    assert (m.rotary_base, m.norm_eps, m.tie_word_embeddings, m.rope_scaling) == (50000.0, 1e-5, False, None)
    assert m.qk_layernorm and m.max_position_embeddings == 512
    assert cfg.diffusion.mask_token_id == 99  # the tokenizer's mask token
    assert cfg.complete() is cfg  # idempotent, reads nothing more
    # the CLI path (a YAML file through resolve) gives the same config, and its dict states the model
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_run(user_model)))
    assert to_dict(resolve(str(path), [])) == to_dict(cfg)
    # a config that names a path overridden later is not read at load time (only the final one is)
    missing = dict(_run(user_model), init={"teacher_hf": str(tmp_path / "not_there")})
    path.write_text(yaml.safe_dump(missing))
    assert resolve(str(path), [f"init.teacher_hf={user_model}"]).model == m


def test_a_stated_model_must_agree_field_by_field(user_model):
    """Each of the settings that trained silently before (measured logit differences: rotary base
    1.51, norm eps 0.107, missing RoPE scaling 0.008, tying 4.45) and the shape ones that gave
    misleading converter errors is named, with the config.json key, before any model is built."""
    from nemo_opdlm.models.config import RopeScaling
    from nemo_opdlm.training.setup import check_weights

    derived = from_dict(RunConfig, _run(user_model)).complete()
    check_weights(derived)  # agrees with itself
    wrong = derived.model.replace(num_layers=2, ffn_hidden_size=128, rotary_base=1e6, norm_eps=1e-6,
                                  tie_word_embeddings=True, rope_scaling=RopeScaling())
    stated = RunConfig(**{**{f: getattr(derived, f) for f in derived.__dataclass_fields__}, "model": wrong})
    with pytest.raises(ArchitectureMismatchError) as err:
        check_weights(stated)
    msg = str(err.value)
    for part in ("model.num_layers=2 vs num_hidden_layers=4", "model.ffn_hidden_size=128 vs intermediate_size=256",
                 "model.rotary_base=1000000.0 vs rope_theta=50000.0", "model.norm_eps=1e-06 vs rms_norm_eps=1e-05",
                 "model.tie_word_embeddings=True vs tie_word_embeddings=False", "model.rope_scaling=RopeScaling("):
        assert part in msg, part
    assert "set model.* to the checkpoint's values" in msg


def test_model_sources_and_their_errors(user_model, tmp_path):
    # a trainer / import checkpoint without config.json: its recorded model config
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    recorded = hfc.model_config_from_hf(hfc.read_hf_config(user_model)).replace(num_layers=3)
    (ckpt / "opdlm_convert.json").write_text(json.dumps({"model_config": model_config_to_dict(recorded)}))
    assert model_config_of_weights(str(ckpt), "init.teacher_checkpoint") == recorded
    with pytest.raises(ConfigError, match="init.teacher_hf: .* is not a directory.*set the model"):
        from_dict(RunConfig, _run(str(tmp_path / "nowhere"), diffusion={"mask_token_id": 99})).complete()
    with pytest.raises(ConfigError, match="neither a config.json nor a recorded model config"):
        model_config_of_weights(str(tmp_path), "init.teacher_hf")
    with pytest.raises(ConfigError, match=r"model is not set .*set init.teacher_hf"):
        from_dict(RunConfig, _run(user_model, init={"teacher_hf": None, "tokenizer": user_model})).complete()
    # a different teacher: the student's shape is init.student_hf's
    with pytest.raises(ConfigError, match=r"set init.student_hf \(teacher_model is set\)"):
        from_dict(RunConfig, _run(user_model, teacher_model=to_dict(recorded))).complete()


def test_mask_token_id_is_checked_against_the_tokenizer(user_model, tmp_path):
    from transformers import AutoTokenizer

    from nemo_opdlm.data.prompts import check_mask_token

    tok = AutoTokenizer.from_pretrained(user_model)
    check_mask_token(99, tok, user_model)  # its mask token
    check_mask_token(130, tok, user_model)  # an embedding row no token maps to
    with pytest.raises(ConfigError, match=r"mask_token_id=7 is the ordinary token 'w7'.*use its mask token \(99\)"):
        check_mask_token(7, tok, user_model)
    with pytest.raises(ConfigError, match=r"mask_token_id=2 is 'w2', the tokenizer's eos_token"):
        check_mask_token(2, tok, user_model)
    # a tokenizer without a mask token: the id must be set
    bare = str(tmp_path / "bare")
    save_tokenizer(bare)
    cfg = json.load(open(os.path.join(bare, "tokenizer_config.json")))
    cfg.pop("mask_token")
    json.dump(cfg, open(os.path.join(bare, "tokenizer_config.json"), "w"))
    assert AutoTokenizer.from_pretrained(bare).mask_token_id is None
    with pytest.raises(ConfigError, match=r"mask_token_id is not set and the tokenizer in .*bare has no mask token"):
        from_dict(RunConfig, _run(user_model, init={"tokenizer": bare})).complete()
    stated = from_dict(RunConfig, _run(user_model, init={"tokenizer": bare}, diffusion={"mask_token_id": 98}))
    assert stated.complete().diffusion.mask_token_id == 98  # a stated id: the tokenizer check is the run's


def test_method_requirements_are_refused_at_config_time(user_model):
    """distill.method=ar / sft without data.response_field failed at step 1 with a traceback."""
    for method in ("ar", "sft"):
        with pytest.raises(ConfigError, match=f"distill.method={method} needs data.response_field"):
            from_dict(RunConfig, _run(user_model, distill={"method": method}))
