"""TP=2 and PP=2 rollouts decode exactly what the same weights decode at TP=1 (torchrun, gloo)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from nemo_opdlm.models.student import build_chunks
from nemo_opdlm.rollout.sampler import BlockSampler, left_pad
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
from tests.dist import torchrun
from tests.tiny import sampler_config, tiny_model

MASK = 95
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
BASE = dict(mask_token_id=MASK, max_new_tokens=22, seed=11)
SCENARIOS = {
    "greedy_static": dict(mode="static", temperature=0.0),
    "greedy_dynamic": dict(mode="dynamic", threshold=0.6, temperature=0.0),
    "sampled": dict(mode="dynamic", threshold=0.7, temperature=1.0, top_k=30, top_p=0.9),
    "sampled_eos": dict(mode="dynamic", threshold=0.7, temperature=1.0),  # EOS set from the TP=1 run
    # a shifted model (first-token predictions kept across rounds) with two rows decoded statically
    "shifted_mixed": dict(mode="dynamic", threshold=0.6, temperature=1.0, shift_logits=True,
                          static_rows=(True, False, True, False, False)),
}


def _config():
    return tiny_model(vocab_size=96, init_method_std=0.1)  # 96 = padded size at TP 1 and 2


def _shard(name: str, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's piece of a full (TP=1) megatron-core tensor."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return t.chunk(tp, 0)[rank]  # QKV is grouped per query group: whole groups per rank
    if name.endswith("linear_fc1.weight"):  # [gate; up] per TP shard
        gate, up = t.chunk(2, 0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(tp, 1)[rank]
    return t


def _stage_state(full: dict, num_layers: int, ctx) -> dict:
    """The full state dict cut down to this rank's TP shard and PP stage (local layer numbering)."""
    tp, tp_rank = ctx.tp_size, ctx.tp_rank
    pp, pp_rank = ctx.pp_size, ctx.pp_rank
    per_stage = num_layers // pp
    out = {}
    for name, t in full.items():
        layer = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if layer:
            index = int(layer.group(1))
            if index // per_stage != pp_rank:
                continue
            name = f"decoder.layers.{index % per_stage}.{layer.group(2)}"
        elif name.startswith("embedding.") and pp_rank != 0:
            continue
        elif name.startswith(("decoder.final_layernorm", "output_layer")) and pp_rank != pp - 1:
            continue
        out[name] = _shard(name, t, tp_rank, tp)
    return out


def _decode_all(chunks, references: dict) -> dict:
    prompts = left_pad(PROMPTS, pad_id=0)
    out = {}
    for name, settings in SCENARIOS.items():
        settings = dict(settings)
        rows = settings.pop("static_rows", None)
        extra = dict(eos_token_ids=(references["eos"],)) if name == "sampled_eos" else {}
        sampler = BlockSampler(chunks, sampler_config(**BASE, **settings, **extra))
        out[name] = sampler.generate(*prompts, static_rows=None if rows is None else torch.tensor(rows))
    out["ar"] = BlockSampler(chunks, sampler_config(**BASE, temperature=0.0, mode="ar")).generate(*prompts)
    return out


def _check_worker(tmp_dir: str, layout: ParallelLayout, extra_checks) -> None:
    ref = torch.load(os.path.join(tmp_dir, "ref.pt"))
    with runtime(layout) as rt:
        chunks = build_chunks(_config(), rt.ctx)
        for chunk in chunks:
            missing, unexpected = chunk.load_state_dict(_stage_state(ref["state"], _config().num_layers, rt.ctx),
                                                        strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        got = _decode_all(chunks, ref)
        for name, rollout in got.items():
            assert torch.equal(rollout.tokens, ref[name]["tokens"]), (name, rollout.tokens, ref[name]["tokens"])
            assert torch.equal(rollout.step_map, ref[name]["step_map"]), name
            assert torch.equal(rollout.valid, ref[name]["valid"]), name
        extra_checks(chunks, ref)


def _tp2_extra(chunks, ref) -> None:
    prompts = left_pad(PROMPTS, pad_id=0)
    uncached = BlockSampler(chunks, sampler_config(**BASE, **SCENARIOS["sampled"], use_cache=False)).generate(*prompts)
    assert torch.equal(uncached.tokens, ref["sampled"]["tokens"])


def _pp2_extra(chunks, ref) -> None:
    prompts = left_pad(PROMPTS, pad_id=0)
    for settings in (dict(num_microbatches=3), dict(num_microbatches=1), dict(use_cache=False),
                     dict(pad_commit_slots=True)):
        got = BlockSampler(chunks, sampler_config(**BASE, **SCENARIOS["greedy_dynamic"], **settings)).generate(*prompts)
        assert torch.equal(got.tokens, ref["greedy_dynamic"]["tokens"]), settings
        assert torch.equal(got.step_map, ref["greedy_dynamic"]["step_map"]), settings


def tp2_worker(tmp_dir: str) -> None:
    _check_worker(tmp_dir, ParallelLayout(tp=2), _tp2_extra)


def pp2_worker(tmp_dir: str) -> None:
    _check_worker(tmp_dir, ParallelLayout(pp=2), _pp2_extra)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """TP=1 model (confident output layer), its full state dict and its rollouts, saved for the workers."""
    tmp = tmp_path_factory.mktemp("rollout_dist")
    with runtime(ParallelLayout()) as rt:
        chunks = build_chunks(_config(), rt.ctx)
        with torch.no_grad():
            chunks[0].output_layer.weight.mul_(10.0)
        state = {k: v.clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
        prompts = left_pad(PROMPTS, pad_id=0)
        free = BlockSampler(chunks, sampler_config(**BASE, **SCENARIOS["sampled_eos"])).generate(*prompts)
        ref: dict = {"state": state, "eos": int(free.tokens[1, 6])}
        for name, rollout in _decode_all(chunks, ref).items():
            ref[name] = dict(tokens=rollout.tokens, step_map=rollout.step_map, valid=rollout.valid)
    assert ref["sampled_eos"]["valid"].sum() < free.valid.sum()  # some row did stop at EOS
    torch.save(ref, tmp / "ref.pt")
    return tmp


@pytest.mark.distributed
def test_tp2_decodes_like_tp1(references):
    torchrun("tests.parity.test_rollout_dist:tp2_worker", 2, str(references))


@pytest.mark.distributed
def test_pp2_decodes_like_tp1(references):
    torchrun("tests.parity.test_rollout_dist:pp2_worker", 2, str(references))
