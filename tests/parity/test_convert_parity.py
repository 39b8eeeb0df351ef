"""Imported HF models against transformers (TP=1), HF -> Megatron -> HF bit-identity, and exported
students against the Megatron student (logits and greedy generation). One process; the TP=2 and
PP=2 versions are in test_convert_dist.py."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert.hf_to_mcore import teacher_from_hf
from nemo_opdlm.convert.mcore_to_hf import export_chunks
from nemo_opdlm.models import masks
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
from tests.convert_models import FAMILIES, VOCAB, assert_same_tensors, save_hf, student_from_hf
from tests.tiny import sampler_config

TOL = 1e-4


@pytest.fixture(scope="module")
def rt():
    with runtime(ParallelLayout()) as r:
        yield r


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory, transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    return {f: (str(root / f), save_hf(f, str(root / f), seed=i)) for i, f in enumerate(FAMILIES)}


def teacher_layout(prompt_lens: torch.Tensor, width: int, response: int) -> masks.RowLayout:
    """Block size 1, no xt: the causal AR teacher's rows (left-padded prompts + response)."""
    valid = torch.ones(prompt_lens.shape[0], response, dtype=torch.bool)
    return masks.build_layout(prompt_lens, width, valid, block_size=1, with_xt=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_logits_match_transformers(rt, hf_dirs, family):
    directory, ref_model = hf_dirs[family]
    cfg, chunks = teacher_from_hf(directory, rt.ctx, attention_backend="sdpa")
    torch.manual_seed(1)
    width, response = 6, 5
    lens = torch.tensor([6, 3])
    lay = teacher_layout(lens, width, response)
    ids = torch.randint(0, VOCAB, (2, width + response))
    with torch.no_grad():
        ours = chunks[0](ids, lay.position_ids, lay.meta)  # [B, S, V_pad]
    real = lay.meta[:, 1] != masks.PAD  # [B, S]
    hf_mask = real.long()
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=hf_mask, position_ids=lay.position_ids).logits  # [B, S, V]
    diff = (ours[..., :VOCAB] - ref).abs().amax(-1)  # [B, S]
    assert float(diff[real].max()) <= TOL, diff
    assert bool((ours[..., VOCAB:] == torch.finfo(ours.dtype).min).all())  # vocab padding masked
    assert not chunks[0].embedding.word_embeddings.weight[VOCAB:].any()  # and zero in the weights


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_export_round_trip_is_bit_identical(rt, hf_dirs, tmp_path, family):
    directory, _ = hf_dirs[family]
    cfg, chunks = teacher_from_hf(directory, rt.ctx)
    out = str(tmp_path / "out")
    export_chunks(chunks, cfg, out, source_config=hfc.read_hf_config(directory), assets_dir=directory,
                  max_shard_bytes=30_000)
    assert_same_tensors(directory, out)
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(directory, "config.json")))
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(directory, name)).read()
    assert not os.path.exists(os.path.join(out, "modeling_opdlm.py"))


def test_bf16_checkpoint_round_trips_bit_identically_in_bf16(rt, tmp_path):
    directory = str(tmp_path / "bf16")
    save_hf("qwen3", directory, dtype=torch.bfloat16)
    cfg, chunks = teacher_from_hf(directory, rt.ctx)
    assert cfg.params_dtype == "bfloat16"
    assert chunks[0].decoder.layers[0].self_attention.linear_qkv.weight.dtype == torch.bfloat16
    export_chunks(chunks, cfg, str(tmp_path / "out"), source_config=hfc.read_hf_config(directory))
    assert_same_tensors(directory, str(tmp_path / "out"))


def test_student_and_teacher_must_share_a_vocabulary(rt, hf_dirs):
    from nemo_opdlm.checkpoint.errors import VocabMismatchError

    directory, _ = hf_dirs["qwen2"]
    teacher = hfc.model_config_from_hf(hfc.read_hf_config(directory)).replace(vocab_size=VOCAB + 28)
    with pytest.raises(VocabMismatchError, match="share a tokenizer"):
        student_from_hf(directory, DiffusionConfig(block_size=4, mask_token_id=VOCAB - 1), rt.ctx, teacher=teacher)


def test_loading_a_checkpoint_into_another_architecture_is_refused(rt, hf_dirs, tmp_path):
    from nemo_opdlm.checkpoint.errors import CheckpointFileError
    from nemo_opdlm.checkpoint.format import load_dist_checkpoint
    from nemo_opdlm.convert.hf_to_mcore import import_hf
    from nemo_opdlm.models.student import build_chunks

    import_hf(hf_dirs["llama"][0], str(tmp_path / "ckpt"), rt.ctx)
    qwen3 = hfc.model_config_from_hf(hfc.read_hf_config(hf_dirs["qwen3"][0]))
    with pytest.raises(CheckpointFileError, match="q_layernorm|shape"):
        load_dist_checkpoint(build_chunks(qwen3, rt.ctx), str(tmp_path / "ckpt"))


def _perturb(chunks, scale_final_norm: float = 1.0) -> None:
    """Stand in for training: the student's weights move away from the teacher's."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        chunks[0].decoder.final_layernorm.weight.mul_(scale_final_norm)


def student_layout() -> tuple[masks.RowLayout, torch.Tensor]:
    """``[left-padded prompt | x0 | xt]`` rows with response padding, block size 4."""
    lens = torch.tensor([5, 3])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 6:] = False
    lay = masks.build_layout(lens, 5, valid, block_size=4, with_xt=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB - 1, (2, 5 + 16), generator=g)
    ids[:, lay.xt_slice][torch.rand(2, 8, generator=g) < 0.5] = VOCAB - 1  # [MASK] where noised
    return lay, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_student_matches_megatron_student(rt, hf_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    directory, _ = hf_dirs[family]
    diffusion = DiffusionConfig(block_size=4, mask_token_id=VOCAB - 1, block_grid="response")
    cfg, chunks = student_from_hf(directory, diffusion, rt.ctx, attention_backend="sdpa")
    _perturb(chunks, scale_final_norm=40.0)
    out = str(tmp_path / "student")
    export_chunks(chunks, cfg, out, source_config=hfc.read_hf_config(directory), diffusion=diffusion,
                  assets_dir=directory, max_shard_bytes=30_000)
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["mask_token_id"], config["block_size"], config["attention_kind"]) == (VOCAB - 1, 4, "block_causal")
    assert config["source_architecture"] == hfc.read_hf_config(directory)["architectures"][0]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "OPDLMBlockDiffusionLM"
    lay, ids = student_layout()
    with torch.no_grad():
        ours = chunks[0](ids, lay.position_ids, lay.meta)[..., :VOCAB]  # [B, S, V]
        theirs = model(ids, position_ids=lay.position_ids, token_meta=lay.meta).logits  # [B, S, V]
    assert float((ours - theirs).abs().max()) <= TOL
    _generation_matches_project_sampler(chunks, model)
    # the same weights trained on the absolute grid: the export records it and generate decodes on it
    absolute = str(tmp_path / "absolute")
    export_chunks(chunks, cfg, absolute, source_config=hfc.read_hf_config(directory),
                  diffusion=dataclasses.replace(diffusion, block_grid="absolute"), assets_dir=directory)
    assert json.load(open(os.path.join(absolute, "config.json")))["block_grid"] == "absolute"
    model = AutoModelForCausalLM.from_pretrained(absolute, trust_remote_code=True).eval()
    assert model.config.block_grid == "absolute"
    _generation_matches_project_sampler(chunks, model, block_grid="absolute")


def test_exported_shifted_student_matches_megatron_student(rt, hf_dirs, tmp_path):
    """A shifted student (``diffusion.shift_logits``) exports the flag, and the exported ``generate``
    reads a block's first token from the token before it exactly as the project's sampler does."""
    from transformers import AutoModelForCausalLM

    directory, _ = hf_dirs["qwen3"]
    diffusion = DiffusionConfig(block_size=4, mask_token_id=VOCAB - 1, shift_logits=True, block_grid="response")
    cfg, chunks = student_from_hf(directory, diffusion, rt.ctx, attention_backend="sdpa")
    _perturb(chunks, scale_final_norm=40.0)
    out = str(tmp_path / "student")
    export_chunks(chunks, cfg, out, source_config=hfc.read_hf_config(directory), diffusion=diffusion,
                  assets_dir=directory, max_shard_bytes=30_000)
    assert json.load(open(os.path.join(out, "config.json")))["shift_logits"] is True
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.shift_logits is True
    _generation_matches_project_sampler(chunks, model, shift_logits=True)
    absolute = str(tmp_path / "absolute")
    export_chunks(chunks, cfg, absolute, source_config=hfc.read_hf_config(directory),
                  diffusion=dataclasses.replace(diffusion, block_grid="absolute"), assets_dir=directory)
    model = AutoModelForCausalLM.from_pretrained(absolute, trust_remote_code=True).eval()
    _generation_matches_project_sampler(chunks, model, shift_logits=True, block_grid="absolute")


def _generation_matches_project_sampler(chunks, model, shift_logits: bool = False,
                                        block_grid: str = "response") -> None:
    """Greedy static and threshold decoding: the exported model and rollout/sampler.py agree token
    for token (and round for round), on the block grid the export records. The prompts' lengths 6, 4,
    1 and 3 cover every ``P mod 4`` (and prompts shorter than a block: on the absolute grid nothing is
    prefilled, and the whole prompt shares the first block with the masks)."""
    from nemo_opdlm.rollout import sampler as sampler_mod
    width = 6
    prompt = torch.cat([torch.randint(0, VOCAB - 1, (3, width), generator=torch.Generator().manual_seed(5)),
                        torch.randint(0, VOCAB - 1, (1, width), generator=torch.Generator().manual_seed(6))])
    am = torch.ones_like(prompt)
    am[1, :2] = 0
    am[2, :5] = 0
    am[3, :3] = 0
    lens = am.sum(1)
    # An EOS that the model really emits mid-way, so that rows stop at different blocks.
    probe = model.generate(prompt, attention_mask=am, max_new_tokens=16, eos_token_id=[])[:, width:]
    eos = int(probe[0, 5])
    multi_round = False
    for mode, threshold in (("static", None), ("dynamic", 0.6)):
        cfg = sampler_config(mask_token_id=VOCAB - 1, block_size=4, steps_per_block=4, mode=mode,
                             threshold=threshold or 0.9, temperature=0.0, max_new_tokens=16,
                             eos_token_ids=(eos,), shift_logits=shift_logits, block_grid=block_grid)
        ours = sampler_mod.BlockSampler(chunks, cfg).generate(prompt, lens)
        theirs = model.generate(prompt, attention_mask=am, max_new_tokens=16, threshold=threshold,
                                eos_token_id=eos, return_dict=True)
        # transformers' convention: a finished row holds padding (the EOS id here) after its EOS
        expected = torch.where(ours.valid, ours.tokens, eos)
        assert torch.equal(theirs["sequences"][:, width:], expected), (block_grid, mode, theirs["sequences"], expected)
        assert torch.equal(theirs["step_map"], ours.step_map), (block_grid, mode, theirs["step_map"], ours.step_map)
        if mode == "dynamic":
            per_round = [(ours.step_map[:, b:b + 4] == r).sum(1) for b in range(0, 16, 4) for r in range(4)]
            multi_round = any(bool((n > 1).any()) for n in per_round)
    assert multi_round, "threshold decoding never unmasked two tokens in one round: test is too weak"
    assert bool((ours.tokens == eos).any())
