"""The converter at TP=2 and PP=2 (2 gloo ranks, one torchrun launch): imported teachers give
transformers' logits; a checkpoint imported at TP=2 exports at PP=2 (and from TP=2 chunks) to
bit-identical HF tensors, including a vocabulary whose padding differs between the two layouts;
an exported TP=2 student gives the Megatron student's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.convert_models import FAMILIES, assert_same_tensors, save_hf
from tests.dist import torchrun

TOL = 1e-4
ODD_VOCAB = 101  # with make_vocab_size_divisible_by=1: 101 rows at TP=1, 102 at TP=2


def _reference(directory: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _rows(vocab: int):
    from nemo_opdlm.models import masks

    torch.manual_seed(11)
    lens = torch.tensor([6, 4])
    lay = masks.build_layout(lens, 6, torch.ones(2, 5, dtype=torch.bool), block_size=1, with_xt=False)
    return lay, torch.randint(0, vocab, (2, 11))


def _check_teacher_logits(logits: torch.Tensor, directory: str, lay, ids, vocab: int) -> float:
    from nemo_opdlm.models import masks

    real = lay.meta[:, 1] != masks.PAD
    with torch.no_grad():
        ref = _reference(directory)(ids, attention_mask=real.long(), position_ids=lay.position_ids).logits
    diff = float((logits[..., :vocab] - ref).abs().amax(-1)[real].max())
    assert diff <= TOL, (directory, diff)
    return diff


def _overrides(family: str) -> dict:
    return {"make_vocab_size_divisible_by": 1} if family == "qwen2" else {}


def _vocab(family: str) -> int:
    return ODD_VOCAB if family == "qwen2" else 100


def worker(tmp: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.convert.hf_to_mcore import import_hf, teacher_from_hf
    from tests.convert_models import student_from_hf
    from nemo_opdlm.convert.mcore_to_hf import export_checkpoint, export_chunks
    from nemo_opdlm.models import masks
    from nemo_opdlm.models.config import DiffusionConfig
    from nemo_opdlm.runtime import vocab_parallel
    from nemo_opdlm.runtime.distributed import ParallelLayout, init_runtime, shutdown_runtime
    from nemo_opdlm.runtime.pipeline import forward_collect

    report: dict = {}
    # --- TP=2 ---------------------------------------------------------------------------------
    ctx = init_runtime(ParallelLayout(tp=2)).ctx
    rank = dist.get_rank()
    for family in FAMILIES:
        hf_dir, vocab = os.path.join(tmp, family), _vocab(family)
        cfg, chunks = teacher_from_hf(hf_dir, ctx, attention_backend="sdpa", **_overrides(family))
        lay, ids = _rows(vocab)
        with torch.no_grad():
            local = chunks[0](ids, lay.position_ids, lay.meta)  # [B, S, V_pad/2]
        full = vocab_parallel.all_gather_last(local, ctx.tp_group)  # [B, S, V_pad]
        report[f"tp2_logits_{family}"] = _check_teacher_logits(full, hf_dir, lay, ids, vocab)
        out = os.path.join(tmp, f"out_tp2_{family}")
        export_chunks(chunks, cfg, out, source_config=hfc.read_hf_config(hf_dir), assets_dir=hf_dir,
                      max_shard_bytes=30_000)
        if rank == 0:
            assert_same_tensors(hf_dir, out)
        import_hf(hf_dir, os.path.join(tmp, f"ckpt_tp2_{family}"), ctx, **_overrides(family))
    # An exported TP=2 student equals the Megatron student (gathered logits).
    hf_dir = os.path.join(tmp, "qwen3")
    diffusion = DiffusionConfig(block_size=4, mask_token_id=99)
    cfg, chunks = student_from_hf(hf_dir, diffusion, ctx, attention_backend="sdpa")
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))  # same on TP peers
    lay = masks.build_layout(torch.tensor([5, 2]), 5, torch.ones(2, 8, dtype=torch.bool), 4, with_xt=True)
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vocab_parallel.all_gather_last(chunks[0](ids, lay.position_ids, lay.meta), ctx.tp_group)[..., :100]
    out = os.path.join(tmp, "student_tp2")
    export_chunks(chunks, cfg, out, source_config=hfc.read_hf_config(hf_dir), diffusion=diffusion)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            theirs = model(ids, position_ids=lay.position_ids, token_meta=lay.meta).logits
        report["student_tp2_logits"] = float((ours - theirs).abs().max())
        assert report["student_tp2_logits"] <= TOL, report
    parallel_state.destroy_model_parallel()

    # --- PP=2 ---------------------------------------------------------------------------------
    ctx = init_runtime(ParallelLayout(pp=2)).ctx
    last = ctx.is_last_stage
    for family in FAMILIES:
        hf_dir, vocab = os.path.join(tmp, family), _vocab(family)
        cfg, chunks = teacher_from_hf(hf_dir, ctx, attention_backend="sdpa", **_overrides(family))
        assert [l.layer_number for l in chunks[0].decoder.layers] == [ctx.pp_rank + 1]
        lay, ids = _rows(vocab)
        batch = {"input_ids": ids, "position_ids": lay.position_ids, "meta": lay.meta}
        got = forward_collect(chunks, [batch], lambda out, b: out.clone())
        if last:
            report[f"pp2_logits_{family}"] = _check_teacher_logits(got[0], hf_dir, lay, ids, vocab)
        if family == "qwen2":  # the padding differs: saved 102 rows at TP=2, this layout has 101
            from megatron.core import dist_checkpointing

            saved = dist_checkpointing.load_tensors_metadata(os.path.join(tmp, "ckpt_tp2_qwen2"))
            assert saved["embedding.word_embeddings.weight"].global_shape[0] == 102
            assert cfg.padded_vocab_size(1) == 101
        out = os.path.join(tmp, f"out_pp2_{family}")
        export_checkpoint(os.path.join(tmp, f"ckpt_tp2_{family}"), out, ctx, max_shard_bytes=30_000)
        if rank == 0:
            assert_same_tensors(hf_dir, out)
            assert json.load(open(os.path.join(out, "config.json"))) == hfc.read_hf_config(hf_dir)
            assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    shutdown_runtime()
    if last:
        with open(os.path.join(tmp, f"report_{rank}.json"), "w") as f:
            json.dump(report, f)


@pytest.mark.distributed
def test_tp2_and_pp2_parity_and_round_trips(tmp_path):
    for family in FAMILIES:
        extra = {"vocab_size": ODD_VOCAB} if family == "qwen2" else {}
        save_hf(family, str(tmp_path / family), seed=3, **extra)
    torchrun("tests.parity.test_convert_dist:worker", 2, str(tmp_path), timeout=600)
    reports = [json.load(open(tmp_path / f)) for f in os.listdir(tmp_path) if f.startswith("report_")]
    assert reports and all(v <= TOL for r in reports for v in r.values())
