"""tools/import_hf.py and tools/export_hf.py end to end, and every refusal they promise: each
refusal exits with status 2, names the problem, and leaves nothing on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from tests.convert_models import assert_same_tensors, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli") / "llama")
    save_hf("llama", d, seed=5)
    return d


def _refused(capsys, main, argv, match: str, must_not_exist: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not os.path.exists(must_not_exist)
    parent = os.path.dirname(must_not_exist)
    assert not [n for n in os.listdir(parent) if ".tmp-" in n], os.listdir(parent)  # no staging left


def test_import_then_export_round_trip_and_student(hf_dir, tmp_path, capsys):
    import_hf, export_hf = tool("import_hf"), tool("export_hf")
    ckpt, out, student = str(tmp_path / "ckpt"), str(tmp_path / "out"), str(tmp_path / "student")
    assert import_hf(["--hf-dir", hf_dir, "--out", ckpt]) == 0
    assert os.path.isfile(os.path.join(ckpt, "metadata.json"))
    _refused(capsys, import_hf, ["--hf-dir", hf_dir, "--out", ckpt], "already exists", str(tmp_path / "never"))
    assert export_hf(["--ckpt", ckpt, "--out", out, "--max-shard-size", "30KB"]) == 0
    assert_same_tensors(hf_dir, out)
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))
    _refused(capsys, export_hf, ["--ckpt", ckpt, "--out", out], "already exists", str(tmp_path / "never"))
    assert export_hf(["--ckpt", ckpt, "--out", out, "--overwrite"]) == 0  # replaced in one rename
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["ckpt", "out"]  # before the students
    _refused(capsys, export_hf, ["--ckpt", ckpt, "--out", student, "--mask-token-id", "100"],
             "outside the model's vocabulary",
             student)
    assert export_hf(["--ckpt", ckpt, "--out", student, "--mask-token-id", "99", "--block-size", "4"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, trust_remote_code=True)
    assert model.config.mask_token_id == 99 and model.config.block_size == 4 and model.config.shift_logits is False
    shifted = str(tmp_path / "shifted")
    assert export_hf(["--ckpt", ckpt, "--out", shifted, "--mask-token-id", "99", "--shift-logits"]) == 0
    assert AutoModelForCausalLM.from_pretrained(shifted, trust_remote_code=True).config.shift_logits is True
    prompt = torch.tensor([[3, 4, 5], [0, 7, 8]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    greedy = model.generate(prompt, attention_mask=mask, max_new_tokens=8, threshold=0.9)
    assert greedy.shape == (2, 11) and bool((greedy[:, 3:] != 99).all())
    # Sampling that can only pick the argmax reproduces greedy decoding.
    g = torch.Generator().manual_seed(0)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = model.generate(prompt, attention_mask=mask, max_new_tokens=8, threshold=0.9, do_sample=True,
                                 temperature=0.7, generator=g, **kw)
        assert torch.equal(sampled, greedy), kw
    free = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=True, generator=g)
    assert free.shape == (2, 11) and bool((free[:, 3:] != 99).all())


def test_refusals_leave_nothing(hf_dir, tmp_path, capsys):
    import_hf, export_hf = tool("import_hf"), tool("export_hf")
    out = str(tmp_path / "ckpt")
    # A layout that does not divide the model (4 heads, 2 groups, 2 layers).
    _refused(capsys, import_hf, ["--hf-dir", hf_dir, "--out", out, "--tp", "3"], "not divisible by tp", out)
    _refused(capsys, import_hf, ["--hf-dir", hf_dir, "--out", out, "--pp", "4"], "num_layers=2", out)
    # Unsupported architecture: the error lists the supported ones.
    bad = str(tmp_path / "mistral")
    shutil.copytree(hf_dir, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    json.dump(dict(cfg, architectures=["MistralForCausalLM"], model_type="mistral"), open(os.path.join(bad, "config.json"), "w"))
    _refused(capsys, import_hf, ["--hf-dir", bad, "--out", out], "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM", out)
    # Missing shard.
    missing = str(tmp_path / "missing")
    shutil.copytree(hf_dir, missing)
    os.remove(os.path.join(missing, "model-00003-of-00012.safetensors"))
    _refused(capsys, import_hf, ["--hf-dir", missing, "--out", out], "model-00003-of-00012.safetensors", out)
    # Corrupt (truncated) shard.
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(hf_dir, corrupt)
    path = os.path.join(corrupt, "model-00005-of-00012.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _refused(capsys, import_hf, ["--hf-dir", corrupt, "--out", out], "truncated", out)
    # Tokenizer / vocabulary mismatch: a tokenizer with more ids than the embedding has rows.
    from tests.convert_models import save_tokenizer

    vocab = str(tmp_path / "vocab")
    shutil.copytree(hf_dir, vocab)
    save_tokenizer(vocab, 150)
    _refused(capsys, import_hf, ["--hf-dir", vocab, "--out", out], "vocab_size is 100", out)
    # Export: no model description, and a mask token outside the vocabulary.
    os.makedirs(str(tmp_path / "empty"))
    _refused(capsys, export_hf, ["--ckpt", str(tmp_path / "empty"), "--out", out], "--hf-source", out)
