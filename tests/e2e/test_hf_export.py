"""The exported student as transformers' users meet it: AutoModelForCausalLM / AutoTokenizer from the
export directory, ``generate`` with transformers' standard arguments (honoured or refused by name),
either padding side, generation_config.json, the registered [MASK], the dtype in config.json and the
model card."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.convert_models import save_hf
from tests.e2e.test_convert_cli import tool

MASK = 99


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, student directory): a llama import exported with neither --hf-source nor a tokenizer
    flag, bf16, with an opdlm eval result for its card."""
    root = tmp_path_factory.mktemp("hfx")
    hf, ckpt, out = str(root / "llama"), str(root / "ckpt"), str(root / "student")
    save_hf("llama", hf, seed=5)
    results = root / "eval.json"
    results.write_text(json.dumps({"model": ckpt, "results": [
        {"task": "gsm8k", "num_examples": 50, "accuracy": 0.62, "tokens_per_round": 2.31,
         "settings": {"mode": "dynamic", "threshold": 0.9, "block_size": 4, "max_new_tokens": 256}, "samples": []}]}))
    assert tool("import_hf")(["--hf-dir", hf, "--out", ckpt]) == 0
    assert tool("export_hf")(["--ckpt", ckpt, "--out", out, "--mask-token-id", str(MASK), "--dtype", "bfloat16",
                              "--eval-results", str(results)]) == 0
    return ckpt, out


@pytest.fixture(scope="module")
def model(exported):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exported[1], trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(exported):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(exported[1], trust_remote_code=True)
    t.pad_token = t.unk_token
    return t


TEXTS = ["w3 w4 w5 w6 w7 w8", "w8 w9"]


def _batch(tok, side: str):
    tok.padding_side = side
    return tok(TEXTS, padding=True, return_tensors="pt")


def test_export_files_dtype_tokenizer_and_card(exported):
    _, out = exported
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["dtype"] == "bfloat16" and config["eos_token_id"] == 2
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen == {"do_sample": False, "max_new_tokens": 256, "block_size": 4, "steps_per_block": 4,
                   "threshold": None, "mask_token_id": MASK, "block_grid": "response", "eos_token_id": 2,
                   "bos_token_id": 1}
    assert config["block_grid"] == "response"
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["tokenizer_class"]
    card = open(os.path.join(out, "README.md")).read()
    assert "LlamaForCausalLM" in card and "| block size | 4 |" in card and "none (static)" in card
    assert "| block grid | response (blocks start at the response's first token; as trained) |" in card
    assert "| gsm8k | 50 | 0.6200 | 2.31 | dynamic thr=0.9, block 4, gen 256 |" in card
    assert "the tokenizer's own mask token 'w99'" in card


def test_either_padding_side_decodes_alike(model, tok):
    """Right padding (the source tokenizer's default) gives each row what it gets alone."""
    right = model.generate(**_batch(tok, "right"), max_new_tokens=8, eos_token_id=[])
    left = model.generate(**_batch(tok, "left"), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(right[:, 6:], left[:, 6:])
    tok.padding_side = "right"
    alone = model.generate(**tok(TEXTS[1:], return_tensors="pt"), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(alone[0, 2:], right[1, 6:])
    assert torch.equal(right[:, :6], _batch(tok, "right")["input_ids"])  # the prompts as given
    with_segments = dict(_batch(tok, "left"), token_type_ids=torch.zeros(2, 6, dtype=torch.long))  # transformers 4.x
    assert torch.equal(model.generate(**with_segments, max_new_tokens=8, eos_token_id=[]), left)


def test_standard_generate_arguments_are_honoured(model, tok):
    from transformers import GenerationConfig

    batch = _batch(tok, "left")
    assert model.generate(**batch, max_length=9, eos_token_id=[]).shape == (2, 9)  # counts the prompt
    assert model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=[])).shape == (2, 9)
    assert model.generate(**batch, max_new_tokens=5, max_length=100, eos_token_id=[]).shape == (2, 11)
    greedy = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    # the config's greedy default: explicit do_sample=False and a temperature it does not use agree
    assert torch.equal(model.generate(**batch, max_new_tokens=8, eos_token_id=[], do_sample=False), greedy)
    g = torch.Generator().manual_seed(0)
    out = model.generate(**batch, max_new_tokens=5, do_sample=True, temperature=1.0, num_return_sequences=3,
                         return_dict_in_generate=True, output_scores=True, output_logits=True, generator=g,
                         eos_token_id=[])
    assert out.sequences.shape == (6, 11) and torch.equal(out.sequences[:3, :6], batch["input_ids"][:1].expand(3, -1))
    assert len(out.scores) == len(out.logits) == 5 and out.scores[0].shape == (6, 100)
    assert out["step_map"].shape == (6, 5) and bool((out["step_map"] >= 0).all())
    chosen = torch.stack([s.argmax(-1) for s in out.logits], 1)  # sampled tokens have finite scores
    picked = torch.stack([s.gather(1, out.sequences[:, 6 + j, None])[:, 0] for j, s in enumerate(out.scores)], 1)
    assert chosen.shape == (6, 5) and bool(torch.isfinite(picked).all())
    assert not torch.equal(out.sequences[0], out.sequences[1]) or not torch.equal(out.sequences[1], out.sequences[2])
    # top_k=1 sampling is greedy decoding
    topk = model.generate(**batch, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=1, generator=g)
    assert torch.equal(topk, greedy)


def test_generation_config_json_and_eos_stop(model, tok, exported):
    """generation_config.json is read (its threshold switches to dynamic decoding); EOS from it ends rows."""
    batch = _batch(tok, "left")
    ref = model.generate(**batch, max_new_tokens=8, threshold=0.3, eos_token_id=[], return_dict_in_generate=True)
    saved = model.generation_config.threshold
    model.generation_config.threshold = 0.3
    try:
        via_config = model.generate(**batch, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True)
    finally:
        model.generation_config.threshold = saved
    assert torch.equal(ref.sequences, via_config.sequences) and torch.equal(ref["step_map"], via_config["step_map"])
    # an EOS the model really emits: the row is padded after it, and generation stops for finished rows
    free = model.generate(**batch, max_new_tokens=8, eos_token_id=[])[:, 6:]
    eos = int(free[0, 2])
    stopped = model.generate(**batch, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)[:, 6:]
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1]) and bool((stopped[0, first + 1:] == 0).all())


def test_stopping_criteria_end_rows(model, tok):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterN(StoppingCriteria):
        def __init__(self, width: int, n: int) -> None:
            self.width, self.n, self.calls = width, n, 0

        def __call__(self, input_ids, scores, **kw):
            self.calls += 1
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.width >= self.n)

    batch = _batch(tok, "left")
    crit = AfterN(6, 3)
    out = model.generate(**batch, max_new_tokens=12, eos_token_id=[], pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([crit]))
    free = model.generate(**batch, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out[:, :9], free[:, :9]) and bool((out[:, 9:] == 0).all())
    assert crit.calls == 3  # stopped inside the first block: the later blocks were never decoded


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_beams": 2}, TypeError, "num_beams"),
    ({"foo": 1}, TypeError, "foo"),
    ({"num_return_sequences": 2}, ValueError, "do_sample=True"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature > 0"),
    ({"max_length": 3}, ValueError, "max_new_tokens"),
    ({"block_grid": "absolute"}, ValueError, "block_grid='absolute' was asked of generate, but this model was "
                                             "trained on the 'response' block grid"),
])
def test_unsupported_generate_arguments_are_refused_by_name(model, tok, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(**_batch(tok, "left"), **kwargs)


def test_unsupported_generation_config_fields_and_likelihood_are_refused(model, tok):
    from transformers import GenerationConfig

    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(**_batch(tok, "left"), generation_config=GenerationConfig(repetition_penalty=1.3))
    with pytest.raises(ValueError, match="no left-to-right log-likelihood"):
        model(_batch(tok, "left")["input_ids"])  # what lm-eval's hf model does for multiple choice
    with pytest.raises(TypeError, match="labels"):
        model(_batch(tok, "left")["input_ids"], labels=_batch(tok, "left")["input_ids"])


def test_mask_token_registration(exported, tmp_path, capsys):
    """An ordinary word (or EOS: the trainer's rule) as [MASK] is refused before anything is written;
    an id past the tokenizer's last token becomes its <|mask|> token, at that exact id."""
    from transformers import AutoTokenizer

    from nemo_opdlm.convert.export_assets import register_mask_token
    from nemo_opdlm.errors import ConvertError

    ckpt, student = exported
    export_hf = tool("export_hf")
    out = str(tmp_path / "word")
    assert export_hf(["--ckpt", ckpt, "--out", out, "--mask-token-id", "50"]) == 2
    assert "ordinary token 'w50'" in capsys.readouterr().err and not os.path.exists(out)
    tok = AutoTokenizer.from_pretrained(student, trust_remote_code=True)
    size = len(tok)
    assert "new special token '<|mask|>' at id 102" in register_mask_token(tok, size + 2)
    assert tok.mask_token_id == size + 2 and tok.convert_tokens_to_ids("<|mask|>") == size + 2
    assert tok("w3 <|mask|>")["input_ids"][-1] == size + 2
    with pytest.raises(ConvertError, match="ordinary token"):
        register_mask_token(AutoTokenizer.from_pretrained(student, trust_remote_code=True), 7)
    fresh = AutoTokenizer.from_pretrained(student, trust_remote_code=True)
    with pytest.raises(ConvertError, match="eos_token .*a token that text contains"):  # the trainer's rule
        register_mask_token(fresh, fresh.eos_token_id)


def test_an_export_older_than_block_grids_reads_as_response_and_says_so(exported, tmp_path):
    """``opdlm eval --hf`` on an export written before ``block_grid`` existed: the response grid,
    with a line saying why; asking for the absolute grid is refused, naming both."""
    import shutil

    from nemo_opdlm.errors import ConfigError
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    old = tmp_path / "old_export"
    shutil.copytree(exported[1], old)
    config = json.loads((old / "config.json").read_text())
    del config["block_grid"]
    (old / "config.json").write_text(json.dumps(config))
    with runtime(ParallelLayout()) as rt:
        loaded = load_model(rt.ctx, hf=str(old))
        assert loaded.block_grid == "response" and "records no diffusion.block_grid" in loaded.note
        assert load_model(rt.ctx, hf=exported[1]).note is None  # a current export records its grid
        with pytest.raises(ConfigError, match="trained on the 'response' block grid, not 'absolute'"):
            load_model(rt.ctx, hf=str(old), block_grid="absolute")
