"""A new user's model and data through ``opdlm train``: a random 4-layer Qwen3 saved with
``save_pretrained``, a word-level tokenizer with a mask token, chat records, and a YAML file that
names only the weights and the data (no ``model`` keys, no [MASK] id)."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.convert_models import save_hf

pytest.importorskip("transformers")


def test_train_reads_the_model_and_mask_from_the_users_files(tmp_path, capsys):
    import yaml

    from nemo_opdlm.cli import main

    hf = str(tmp_path / "my-qwen3")
    save_hf("qwen3", hf, shard="10MB", num_hidden_layers=4, intermediate_size=128, tie_word_embeddings=False)
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"messages": conv(f"w{10 + i} w{20 + i}", f"w{30 + i} w{40 + i}")}) + "\n")
    run = {"init": {"teacher_hf": hf}, "diffusion": {"block_size": 4},
           "data": {"path": str(tmp_path / "chat.jsonl"), "prompt_field": "messages", "response_field": "messages",
                    "chat_template": "never", "max_prompt_tokens": 16},
           "distill": {"method": "sft"},
           "rollout": {"min_length": 8, "max_length": 8}, "optim": {"warmup_steps": 0},
           "train": {"steps": 1, "prompts_per_step": 2, "save_dir": str(tmp_path / "run")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    # chat records need a chat template: the word-level tokenizer has none, so the run says so
    assert main(["train", "--recipe", str(tmp_path / "run.yaml")]) == 2
    assert "chat template" in capsys.readouterr().err
    tok_cfg = os.path.join(hf, "tokenizer_config.json")
    cfg = json.load(open(tok_cfg))
    cfg["chat_template"] = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}w3{% endif %}")
    json.dump(cfg, open(tok_cfg, "w"))
    run["data"]["chat_template"] = "auto"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", "--recipe", str(tmp_path / "run.yaml")]) == 0
    meta = json.load(open(os.path.join(tmp_path, "run", "step_0000001", "opdlm_convert.json")))
    assert meta["model_config"]["num_layers"] == 4 and meta["model_config"]["ffn_hidden_size"] == 128
    assert meta["model_config"]["tie_word_embeddings"] is False
    assert meta["diffusion"]["mask_token_id"] == 99  # the tokenizer's mask token
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
