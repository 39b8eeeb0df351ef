"""Evaluation on 2 data-parallel ranks: shards are scored separately and gathered into the one-rank result."""

from __future__ import annotations

import pytest

from tests.dist import torchrun


def dp2_worker(tmp_dir: str) -> None:
    import torch

    from nemo_opdlm.eval import evaluate as E
    from nemo_opdlm.eval import synthetic as S
    import dataclasses

    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.models.config import DiffusionConfig
    from nemo_opdlm.models.student import build_chunks
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from tests.tiny import tiny_model

    tok = S.build_tokenizer()
    fmt = T.task_format("synthetic")
    rows = [p.record() for p in S.make_split(S.ArithmeticConfig(), "test", 5, seed=0)]
    task = T.Task(fmt, T.records_to_examples(rows, fmt))
    with runtime(ParallelLayout(), seed=7) as rt:
        assert rt.dp_size == 2
        chunks = build_chunks(tiny_model(vocab_size=32, init_method_std=0.1), rt.ctx)  # same seed: same weights
        with torch.no_grad():
            chunks[0].output_layer.weight.mul_(8.0)
        for mode in ("ar", "dynamic"):
            settings = E.DecodeSettings(mode=mode, max_new_tokens=12, batch_size=2, threshold=0.5)
            gathered = E.evaluate(chunks, tok, task, settings, diffusion=DiffusionConfig(mask_token_id=2))
            chunks[0].parallel = dataclasses.replace(rt.ctx, dp_rank=0, dp_size=1)  # this rank alone: the whole task
            try:
                alone = E.evaluate(chunks, tok, task, settings, diffusion=DiffusionConfig(mask_token_id=2))
            finally:
                chunks[0].parallel = rt.ctx
            assert [s["index"] for s in gathered.samples] == list(range(5))
            assert gathered.samples == alone.samples, (gathered.samples, alone.samples)
            assert (gathered.num_correct, gathered.tokens_generated, gathered.row_rounds) == (
                alone.num_correct, alone.tokens_generated, alone.row_rounds)


@pytest.mark.distributed
def test_evaluate_data_parallel_equals_one_rank(tmp_path):
    torchrun("tests.parity.test_eval_dist:dp2_worker", 2, str(tmp_path))
