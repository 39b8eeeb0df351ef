"""The trainer end to end on a tiny Qwen3, one process: every method, the shifted student, the
absolute grid, curricula, micro-batch and packing invariance, and a falling KL."""

import json
import math
import os

import pytest

from nemo_opdlm.config import ConfigError
from nemo_opdlm.training import step as train_step
from nemo_opdlm.training.loop import train
from tests.train_fixtures import losses, make_run


@pytest.mark.parametrize("method", ["opdlm", "random_mask", "off_policy", "sft", "ar"])
def test_every_method_trains(tmp_path, method):
    cfg = make_run(str(tmp_path), f"distill.method={method}", "train.save_dir=null", "train.steps=2")
    result = train(cfg)
    assert result["status"] == "completed" and len(result["history"]) == 2
    # the logged lr is the one the step trained at: 0 at step 1 (warm-up from 0), the peak at step 2
    assert [h["lr"] for h in result["history"]] == [0.0, cfg.optim.lr]
    for h in result["history"]:
        assert math.isfinite(h["loss"]) and h["loss"] > 0 and h["train/loss_tokens"] > 0
        assert math.isfinite(h["grad_norm"])
    if method in ("opdlm", "random_mask"):
        assert result["history"][0]["rollout/tokens_generated"] > 0


def test_shifted_student_trains_and_its_checkpoint_says_so(tmp_path):
    """``diffusion.shift_logits`` trains (rollouts and loss on the shifted columns), is recorded in the
    checkpoint's diffusion metadata, and evaluation's loader reads it back. The checkpoint carries the
    teacher's HF config and the tokenizer, so evaluation needs no tokenizer argument."""
    from nemo_opdlm.convert.hf_config import read_hf_config
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    cfg = make_run(str(tmp_path), "diffusion.shift_logits=true", "train.steps=2", "train.save_every=2")
    result = train(cfg)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
    ckpt = os.path.join(cfg.train.save_dir, "step_0000002")
    meta = json.load(open(os.path.join(ckpt, "opdlm_convert.json")))
    assert meta["diffusion"] == {"block_size": 4, "mask_token_id": 99, "shift_logits": True,
                                 "block_grid": cfg.diffusion.block_grid}
    assert meta["step"] == 2 and meta["hf_config"] == read_hf_config(cfg.init.teacher_hf)
    assert os.path.isfile(os.path.join(ckpt, "hf_assets", "tokenizer.json"))
    with runtime(ParallelLayout()) as rt:
        loaded = load_model(rt.ctx, ckpt=ckpt)  # the tokenizer from the checkpoint's own hf_assets
        assert loaded.shift_logits is True and loaded.block_size == 4 and loaded.mask_token_id == 99
        assert loaded.tokenizer.get_vocab() == load_model(rt.ctx, ckpt=ckpt, tokenizer=cfg.init.teacher_hf).tokenizer.get_vocab()
        assert load_model(rt.ctx, ckpt=ckpt, tokenizer=cfg.init.teacher_hf, shift_logits=False).shift_logits is False
        from nemo_opdlm.convert.mcore_to_hf import export_checkpoint

        out = str(tmp_path / "exported")  # no hf_source: the checkpoint's own config and tokenizer
        export_checkpoint(ckpt, out, rt.ctx)
        exported = json.load(open(os.path.join(out, "config.json")))
        assert exported["mask_token_id"] == 99 and exported["shift_logits"] is True
        assert os.path.isfile(os.path.join(out, "tokenizer.json"))
        generation = json.load(open(os.path.join(out, "generation_config.json")))  # EOS ids: generate stops
        assert generation["eos_token_id"] is not None and generation["block_size"] == 4
        assert os.path.isfile(os.path.join(out, "README.md"))


def test_absolute_grid_trains_is_recorded_and_other_grids_are_refused(tmp_path, capsys):
    """``diffusion.block_grid=absolute`` trains (its rows framed: some prompts here leave 1-3 tokens
    in the first block), is recorded in the checkpoint, and is what evaluation decodes on; decoding
    on the other grid is refused unless asked for, and so is a resume at the other grid, naming both.
    A checkpoint saved before the setting existed reads as 'response', and says so."""
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    framed = []
    real = train_step.on_grid

    def spy(*args):
        out = real(*args)
        framed.append(out.given)
        return out

    import unittest.mock as mock
    cfg = make_run(str(tmp_path), "diffusion.block_grid=absolute", "diffusion.shift_logits=true", "train.steps=2",
                   "train.save_every=2")
    with mock.patch.object(train_step, "on_grid", spy):
        result = train(cfg)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])
    assert any(g is not None and g.any() for g in framed)  # heads were framed and trained around
    ckpt = os.path.join(cfg.train.save_dir, "step_0000002")
    meta_path = os.path.join(ckpt, "opdlm_convert.json")
    assert json.load(open(meta_path))["diffusion"]["block_grid"] == "absolute"
    with runtime(ParallelLayout()) as rt:
        loaded = load_model(rt.ctx, ckpt=ckpt)
        assert loaded.block_grid == "absolute" and loaded.diffusion.block_grid == "absolute" and loaded.note is None
        with pytest.raises(ConfigError, match=r"trained on the 'absolute' block grid, not 'response' \(--block-grid\)"):
            load_model(rt.ctx, ckpt=ckpt, block_grid="response")
        assert load_model(rt.ctx, ckpt=ckpt, block_grid="response", allow_grid_mismatch=True).block_grid == "response"
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_0000002: it was trained on the 'absolute' "
                                          r"block grid and the config asks for 'response' \(diffusion.block_grid\)"):
        train(make_run(str(tmp_path), "diffusion.block_grid=response", "diffusion.shift_logits=true",
                       "train.steps=3"))
    # saved before the setting existed: no block_grid in the metadata (its manifest rewritten to match)
    from nemo_opdlm.checkpoint.manifest import write_manifest

    meta = json.load(open(meta_path))
    del meta["diffusion"]["block_grid"]
    json.dump(meta, open(meta_path, "w"))
    write_manifest(ckpt)
    with runtime(ParallelLayout()) as rt:
        legacy = load_model(rt.ctx, ckpt=ckpt)
    assert legacy.block_grid == "response" and "records no diffusion.block_grid" in legacy.note


def test_static_rows_cosine_curriculum_and_domain_caps(tmp_path):
    """rollout.static_fraction, the cosine curriculum and per-domain caps reach the rollouts: capped
    rows never produce more tokens than their domain's cap, the others follow the curriculum."""
    prompts = tmp_path / "domains.jsonl"
    rows = [{"prompt": f"w{10 + i} w{20 + i}", "domain": "short" if i % 2 else "long"} for i in range(8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_run(str(tmp_path), f"data.path={prompts}", "data.response_field=null", "data.domain_field=domain",
                   "rollout.max_length_by_domain={short: 4}", "rollout.static_fraction=0.5",
                   "rollout.curriculum=cosine", "train.save_dir=null", "train.steps=2")
    seen = []
    real = train_step.get_responses

    def spy(cfg_, batch, *args):
        resp = real(cfg_, batch, *args)
        seen.append((list(batch.domains), resp.valid.sum(-1).tolist(), resp.tokens.shape[1]))
        return resp

    import unittest.mock as mock
    with mock.patch.object(train_step, "get_responses", spy):
        history = train(cfg)["history"]
    assert len(seen) == 2 and all(math.isfinite(h["loss"]) for h in history)
    for domains, lengths, width in seen:
        assert all(n <= 4 for d, n in zip(domains, lengths) if d == "short")
        assert any(n > 4 for d, n in zip(domains, lengths) if d == "long") or width <= 8
    # the cosine ramp from 8 to 16 over 2 steps, in whole blocks of 4: 8 at step 0, 12 at step 1
    assert [h["rollout/length_limit"] for h in history] == [8.0, 12.0]


def test_off_policy_teacher_rollouts_and_topk(tmp_path):
    cfg = make_run(str(tmp_path), "distill.method=off_policy", "data.response_field=null", "distill.top_k=8",
                   "train.save_dir=null", "train.steps=1", "optim.warmup_steps=0")
    h = train(cfg)["history"][0]
    assert h["rollout/tokens_generated"] > 0 and math.isfinite(h["loss"])
    # 4 rows [prompt | x0 | xt] padded to the longest: the real tokens are fewer, and at least x0 and xt
    ratio = h["throughput/useful_tokens_per_s"] / h["throughput/tokens_per_s"]
    assert 2 * h["rollout/tokens_generated"] / (4 * (16 + 2 * 8)) <= ratio < 1, ratio


def test_microbatch_count_does_not_change_the_step(tmp_path):
    a = train(make_run(str(tmp_path), "train.micro_batch_size=1", "train.save_dir=null"))
    b = train(make_run(str(tmp_path), "train.micro_batch_size=4", "train.save_dir=null"))
    for x, y in zip(losses(a["history"]), losses(b["history"])):
        assert abs(x - y) <= 1e-6 * max(1.0, abs(x)), (losses(a["history"]), losses(b["history"]))


@pytest.mark.parametrize("overrides", [("distill.method=opdlm",), ("diffusion.shift_logits=true",),
                                       ("distill.method=sft", "distill.top_k=8"),
                                       ("diffusion.shift_logits=true", "diffusion.block_grid=response")])
def test_packed_rows_do_not_change_the_step(tmp_path, overrides):
    """``train.pack_tokens`` (rows of up to 16 + 2 x 16 tokens, and 3 more on the absolute grid, packed
    into 51-token sequences) trains the same losses as padded micro-batches of two rows, step after
    step, on both block grids."""
    a = train(make_run(str(tmp_path), *overrides, "train.save_dir=null"))
    b = train(make_run(str(tmp_path), *overrides, "train.pack_tokens=51", "train.save_dir=null"))
    for x, y in zip(losses(a["history"]), losses(b["history"])):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (losses(a["history"]), losses(b["history"]))
    assert [h["train/loss_tokens"] for h in a["history"]] == [h["train/loss_tokens"] for h in b["history"]]


def test_kl_falls_over_50_steps(tmp_path):
    cfg = make_run(str(tmp_path), "train.steps=50", "train.save_dir=null", "train.log_every=10",
                   "optim.lr=3e-3", "optim.min_lr=1e-3", "rollout.temperature=0", "rollout.mode=static")
    kl = [h["kl"] for h in train(cfg)["history"]]
    first, last = sum(kl[:10]) / 10, sum(kl[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    thirds = [sum(kl[i:i + 16]) / 16 for i in (0, 17, 34)]
    assert thirds[0] > thirds[1] > thirds[2], thirds
