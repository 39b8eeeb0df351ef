"""``tools/export_hf.py --format sdar``: the layout SGLang, lmdeploy and JetEngine serve.

What is checked: every refusal (a family without q/k norms, another [MASK] id, shifted logits, a
response-grid student without ``--allow-grid-mismatch``, a teacher, a ``--block-grid`` against the
checkpoint's record), the files of an export (config.json fields the engines read, Qwen3 tensor
names, ``<|MASK|>`` at 151669, generation_config.json, the card's serve commands), and that the
export loads in a fresh process where neither ``nemo_opdlm`` nor ``megatron`` can be imported, with
plain transformers and ``trust_remote_code``, where its logits on absolute-grid block states equal
the project's student's and its ``generate`` equals ``rollout.sampler.BlockSampler`` on the absolute
grid in tokens and rounds (static and threshold; prompts of every length mod the block size).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks.serve_check import save_tokenizer
from tests.convert_models import hf_model, save_hf
from tests.e2e.test_convert_cli import tool

VOCAB = 151936
"""Qwen3's embedding rows, so that the engines' [MASK] id 151669 exists."""
MASK = 151669
BLOCK = 4
NEW = 12
FINAL_NORM_SCALE = 6.0
"""Random weights decode near uniform over 151,936 tokens, where no threshold fires; a sharper final
norm makes some positions confident (the test asserts that threshold decoding did unmask several
tokens in one round)."""
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    """A tiny random Qwen3 (hidden 64, 2 layers, tied embeddings) with Qwen3's vocabulary size."""
    directory = str(tmp_path_factory.mktemp("sdar") / "qwen3")
    model = hf_model("qwen3", seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        model.get_input_embeddings().weight[MASK:].zero_()  # rows no token maps to, as in Qwen3
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(qwen_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sdar_ckpt") / "ckpt")
    assert tool("import_hf")(["--hf-dir", qwen_dir, "--out", out]) == 0
    return out


def _with_recorded_diffusion(ckpt: str, directory: str, diffusion: dict) -> str:
    """A copy of ``ckpt`` whose opdlm_convert.json records ``diffusion`` (as a trainer's does)."""
    from nemo_opdlm.checkpoint.format import META_FILE
    from nemo_opdlm.checkpoint.manifest import write_manifest

    shutil.copytree(ckpt, directory)
    path = os.path.join(directory, META_FILE)
    meta = json.load(open(path))
    meta["diffusion"] = diffusion
    json.dump(meta, open(path, "w"))
    write_manifest(directory)
    return directory


def _refused(capsys, argv: list[str], *needles: str) -> str:
    out = argv[argv.index("--out") + 1]
    assert tool("export_hf")(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]
    return err


# --- refusals ---------------------------------------------------------------------------------


def test_refuses_a_family_without_qk_norms(tmp_path, capsys):
    hf, ckpt = str(tmp_path / "llama"), str(tmp_path / "llama_ckpt")
    save_hf("llama", hf, seed=1)
    assert tool("import_hf")(["--hf-dir", hf, "--out", ckpt]) == 0
    capsys.readouterr()
    _refused(capsys, ["--ckpt", ckpt, "--out", str(tmp_path / "out"), "--format", "sdar", "--mask-token-id", "99",
                      "--block-grid", "absolute"], "LlamaForCausalLM", "q/k norms", "--format opdlm")


@pytest.mark.parametrize("argv,needles", [
    (["--mask-token-id", "151670", "--block-grid", "absolute"], ("[MASK] id is 151670", "hard-code 151669",
                                                                 "diffusion.mask_token_id=151669")),
    (["--mask-token-id", "151669", "--block-grid", "absolute", "--shift-logits"], ("shift_logits=true",
                                                                                   "diffusion.shift_logits=false")),
    (["--mask-token-id", "151669"], ("'response' block grid", "diffusion.block_grid=absolute",
                                     "--allow-grid-mismatch")),
    (["--teacher"], ("AR teacher", "--format opdlm")),
])
def test_refusals_name_the_reason_and_the_remedy(ckpt, tmp_path, capsys, argv, needles):
    _refused(capsys, ["--ckpt", ckpt, "--out", str(tmp_path / "out"), "--format", "sdar", *argv], *needles)


def test_a_trainer_checkpoint_exports_on_its_recorded_grid(ckpt, tmp_path, capsys):
    """A checkpoint that records ``diffusion`` (``dataclasses.asdict(DiffusionConfig)``, as the trainer
    writes it) exports in the SDAR format with no diffusion flags; a ``--block-grid`` naming another
    grid is refused in one line naming both."""
    import dataclasses

    from nemo_opdlm.models.config import DiffusionConfig

    recorded = _with_recorded_diffusion(ckpt, str(tmp_path / "trained"), dataclasses.asdict(
        DiffusionConfig(block_size=BLOCK, mask_token_id=MASK, block_grid="absolute")))
    _refused(capsys, ["--ckpt", recorded, "--out", str(tmp_path / "out"), "--block-grid", "response"],
             "--block-grid response", "diffusion.block_grid=absolute")
    assert tool("export_hf")(["--ckpt", recorded, "--out", str(tmp_path / "out"), "--format", "sdar"]) == 0
    assert json.load(open(tmp_path / "out" / "config.json"))["block_grid"] == "absolute"


def test_grid_mismatch_allowed_is_written_into_the_card(ckpt, tmp_path):
    out = str(tmp_path / "out")
    assert tool("export_hf")(["--ckpt", ckpt, "--out", out, "--format", "sdar", "--mask-token-id", str(MASK),
                              "--allow-grid-mismatch"]) == 0
    card = open(os.path.join(out, "README.md")).read()
    assert "Warning: block-grid mismatch" in card and "trained on the `response` block grid" in card
    assert json.load(open(os.path.join(out, "config.json")))["block_grid"] == "response"


def test_a_checkpoint_without_a_recorded_grid_reads_as_response(ckpt, tmp_path, capsys):
    """Diffusion settings saved before ``diffusion.block_grid`` existed: the student was trained on the
    response grid (the only one then), the tool says so, and ``--block-grid absolute`` is refused."""
    old = _with_recorded_diffusion(ckpt, str(tmp_path / "old"), {"block_size": BLOCK, "mask_token_id": MASK,
                                                                 "shift_logits": False})
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert tool("export_hf")(["--ckpt", old, "--out", out]) == 0
    assert "records no diffusion.block_grid" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "config.json")))["block_grid"] == "response"
    _refused(capsys, ["--ckpt", old, "--out", str(tmp_path / "sdar"), "--format", "sdar", "--block-grid", "absolute"],
             "--block-grid absolute", "diffusion.block_grid=response")


# --- what an export holds ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_export(ckpt, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sdar_cli") / "student")
    assert tool("export_hf")(["--ckpt", ckpt, "--out", out, "--format", "sdar", "--mask-token-id", str(MASK),
                              "--block-grid", "absolute", "--threshold", "0.9", "--dtype", "bfloat16"]) == 0
    return out


def test_export_files_are_what_the_engines_read(cli_export, qwen_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.load(open(os.path.join(cli_export, "config.json")))
    assert config["architectures"] == ["SDARForCausalLM"] and config["model_type"] == "sdar"
    assert config["auto_map"] == {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                                  "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}
    source = json.load(open(os.path.join(qwen_dir, "config.json")))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert config[key] == source[key], key
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert (config["hidden_act"], config["attention_bias"], config["use_sliding_window"]) == ("silu", False, False)
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert (config["mask_token_id"], config["block_size"], config["block_grid"], config["shift_logits"]) == (
        MASK, BLOCK, "absolute", False)
    for name in ("configuration_sdar.py", "modeling_sdar.py", "modeling_opdlm.py"):
        assert os.path.isfile(os.path.join(cli_export, name)), name
    assert not os.path.exists(os.path.join(cli_export, "modeling_opdlm_block_diffusion.py"))
    with safe_open(os.path.join(cli_export, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(os.path.join(qwen_dir, "model.safetensors"), "pt") as f:
        assert names == set(f.keys())  # Qwen3's tensor names (q_norm / k_norm included; embedding tied)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight",
            "model.embed_tokens.weight", "model.norm.weight"} <= names
    tok = AutoTokenizer.from_pretrained(cli_export, trust_remote_code=True)
    assert tok.mask_token == "<|MASK|>" and tok.mask_token_id == MASK
    gen = json.load(open(os.path.join(cli_export, "generation_config.json")))
    assert (gen["block_size"], gen["steps_per_block"], gen["threshold"], gen["block_grid"]) == (BLOCK, BLOCK, 0.9,
                                                                                                 "absolute")
    card = open(os.path.join(cli_export, "README.md")).read()
    assert "python -m sglang.launch_server --model-path PATH --trust-remote-code" in card
    assert "--dllm-algorithm LowConfidence --dllm-algorithm-config sdar_decoding.yaml" in card
    assert "block_size: 4\nthreshold: 0.9" in card
    assert "dllm_block_length=4" in card and "dllm_unmasking_strategy='low_confidence_dynamic'" in card
    assert "LLM('PATH', mask_token_id=151669, block_length=4)" in card
    assert "| block grid (`diffusion.block_grid`) | absolute |" in card and "Warning" not in card


# --- the export against the project, in a process that cannot import the project --------------


CHILD = r'''
import importlib.abc, json, shutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    """What a user's process has: no nemo_opdlm, no megatron (this venv has them installed)."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nemo_opdlm", "megatron"):
            raise ImportError(f"{name} is not importable here")
        return None

sys.meta_path.insert(0, Refuse())
for name in ("nemo_opdlm", "megatron"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was importable")

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

export, fresh, inputs, outputs = sys.argv[1:5]
shutil.copytree(export, fresh)  # a directory transformers has never seen
torch.set_num_threads(1)
job = torch.load(inputs)
config = AutoConfig.from_pretrained(fresh, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(fresh, trust_remote_code=True, dtype=torch.float32).eval()
base = AutoModel.from_pretrained(fresh, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(fresh, trust_remote_code=True)
with torch.no_grad():
    logits = model(job["ids"], position_ids=job["position_ids"], token_meta=job["meta"]).logits
    hidden, _ = base(job["ids"], job["position_ids"], job["meta"])
out = {"classes": [type(config).__name__, config.model_type, type(model).__name__, type(base).__name__],
       "mask": [tok.mask_token, tok.mask_token_id], "logits": logits,
       "hidden_finite": bool(torch.isfinite(hidden).all()),
       "generate": {}, "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("nemo_opdlm", "megatron"))}
for name, threshold in job["modes"]:
    res = model.generate(job["prompt"], attention_mask=job["attention_mask"], max_new_tokens=job["new"],
                         threshold=threshold, eos_token_id=job["eos"], return_dict_in_generate=True)
    out["generate"][name] = {"sequences": res.sequences, "step_map": res["step_map"]}
try:
    model.generate(job["prompt"], attention_mask=job["attention_mask"], max_new_tokens=4, block_grid="response")
except ValueError as err:
    out["grid_refusal"] = str(err)
torch.save(out, outputs)
'''


def _framed_states(prompt: torch.Tensor, lens: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor):
    """``[prefix | x0 | xt]`` rows of the absolute grid (the frame: the aligned prefix as the prompt,
    the head given in block 0 of x0 and of xt, about half the rest masked in xt) -> ids and layout."""
    from nemo_opdlm.models import grid, masks

    framed = grid.frame_rows(prompt, lens, tokens, valid, None, BLOCK, "absolute", pad_id=0)
    lay = masks.build_layout(framed.prompt_lens, framed.prompt_ids.shape[1], framed.valid, BLOCK, with_xt=True)
    xt = framed.tokens.clone()
    noised = (torch.rand(xt.shape, generator=torch.Generator().manual_seed(11)) < 0.5) & ~framed.given
    xt[noised] = MASK
    return torch.cat([framed.prompt_ids, framed.tokens, xt], dim=1), lay, framed


@pytest.fixture(scope="module")
def against_project(qwen_dir, tmp_path_factory):
    """Export a perturbed absolute-grid student (library path), compute the project's logits and
    sampler decodings, then run the export in a child that cannot import the project."""
    import dataclasses

    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.convert.mcore_to_hf import export_chunks
    from nemo_opdlm.models.config import DiffusionConfig
    from nemo_opdlm.rollout.sampler import BlockSampler
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from tests.convert_models import student_from_hf
    from tests.tiny import sampler_config

    root = tmp_path_factory.mktemp("sdar_parity")
    export = str(root / "export")
    diffusion = DiffusionConfig(block_size=BLOCK, mask_token_id=MASK, block_grid="absolute")
    # prompt lengths 7, 5, 2, 4, 9: heads 3, 1, 2, 0, 1 (every P mod 4; one prompt shorter than a block)
    lens = torch.tensor([7, 5, 2, 4, 9])
    width = int(lens.max())
    prompt = torch.randint(3, 5000, (len(lens), width), generator=torch.Generator().manual_seed(4))
    attention_mask = (torch.arange(width)[None, :] >= (width - lens)[:, None]).long()
    prompt = prompt * attention_mask
    with runtime(ParallelLayout()) as rt:
        cfg, chunks = student_from_hf(qwen_dir, diffusion, rt.ctx, attention_backend="sdpa")
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            chunks[0].embedding.word_embeddings.weight[MASK:].zero_()
            chunks[0].decoder.final_layernorm.weight.mul_(FINAL_NORM_SCALE)
        export_chunks(chunks, cfg, export, source_config=hfc.read_hf_config(qwen_dir), diffusion=diffusion,
                      assets_dir=qwen_dir, export_format="sdar")

        def decode(mode: str, threshold: float, eos: tuple[int, ...]):
            conf = sampler_config(mask_token_id=MASK, block_size=BLOCK, steps_per_block=BLOCK, mode=mode,
                                  threshold=threshold, temperature=0.0, max_new_tokens=NEW, eos_token_ids=eos,
                                  block_grid="absolute")
            return BlockSampler(chunks, conf).generate(prompt, lens)

        # An EOS the model emits mid-way in row 0, so that rows stop at different blocks; row 4's
        # head (its last prompt token) is that id too: a head is never a response token, so it
        # must not end the row.
        eos = int(decode("static", 0.9, ()).tokens[0, 5])
        prompt[4, -1] = eos
        ours = {"static": decode("static", 0.9, (eos,)), "threshold": decode("dynamic", THRESHOLD, (eos,))}
        free = decode("static", 0.9, ())
        ids, lay, framed = _framed_states(prompt, lens, free.tokens[:, :8], free.valid[:, :8])
        with torch.no_grad():
            our_logits = chunks[0](ids, lay.position_ids, lay.meta)[..., :VOCAB]  # [B, S, V]
        real = lay.meta[:, 1] != 0  # [B, S] not padding
    job = {"ids": ids, "position_ids": lay.position_ids, "meta": lay.meta, "prompt": prompt,
           "attention_mask": attention_mask, "new": NEW, "eos": eos,
           "modes": [("static", None), ("threshold", THRESHOLD)]}
    torch.save(job, root / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, export, str(root / "fresh"), str(root / "inputs.pt"),
                           str(root / "outputs.pt")], cwd=str(root), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = torch.load(root / "outputs.pt")
    return dict(ours=ours, theirs=theirs, our_logits=our_logits, real=real, eos=eos, width=width,
                framed=framed, prompt=prompt, modules=os.listdir(root / "hf_modules"))


def test_export_loads_without_the_project(against_project):
    theirs = against_project["theirs"]
    assert theirs["classes"] == ["SDARConfig", "sdar", "SDARForCausalLM", "SDARModel"]
    assert theirs["mask"] == ["<|MASK|>", MASK]
    assert theirs["imported"] == [] and theirs["hidden_finite"]
    assert "trained on the 'absolute' block grid" in theirs["grid_refusal"]
    assert against_project["modules"]  # transformers' dynamic modules went to the temporary cache


def test_logits_on_absolute_grid_block_states_equal_the_projects(against_project):
    ours, theirs, real = against_project["our_logits"], against_project["theirs"]["logits"], against_project["real"]
    assert bool(against_project["framed"].given.any())  # states with heads in block 0
    diff = (ours - theirs).abs().amax(-1)  # [B, S]
    assert float(diff[real].max()) <= 1e-3, float(diff[real].max())


@pytest.mark.parametrize("mode", ["static", "threshold"])
def test_generate_equals_the_projects_sampler_on_the_absolute_grid(against_project, mode):
    ours, theirs = against_project["ours"][mode], against_project["theirs"]["generate"][mode]
    width, eos = against_project["width"], against_project["eos"]
    expected = torch.where(ours.valid[:, :NEW], ours.tokens[:, :NEW], eos)  # transformers pads with the EOS id
    assert torch.equal(theirs["sequences"][:, :width], against_project["prompt"])
    assert torch.equal(theirs["sequences"][:, width:], expected), (theirs["sequences"][:, width:], expected)
    assert torch.equal(theirs["step_map"], ours.step_map[:, :NEW]), (theirs["step_map"], ours.step_map)
    stopped = ~ours.valid[:, :NEW].all(1)
    assert bool(stopped[:4].any()) and not bool(stopped.all())  # some rows ended at the EOS, not all
    assert int(ours.valid[4].sum()) >= BLOCK - 1  # row 4's head holds the EOS id: it decoded its first block anyway
    if mode == "threshold":
        rounds = [(ours.step_map[:, b:b + BLOCK] == r).sum(1) for b in range(0, NEW, BLOCK) for r in range(BLOCK)]
        assert any(bool((n > 1).any()) for n in rounds), "the threshold never unmasked two tokens in a round"
