"""Packed rows against padded micro-batches: padding fraction and useful tokens/s of the student's
forward + backward (CPU, one rank, fp32).

One job: time the trainer's student pass (``run_schedule`` with ``step.make_loss_fn``'s KL loss on
top-k targets) over the same rows built two ways, and write ``benchmarks/results/packing.json``:

- padded: ``train.micro_batch_size`` rows per micro-batch, every row ``[prompt width | L | L]`` with
  L the step's rollout length (rollouts come back ``max_new_tokens`` wide, as the trainer gets them);
- packed: ``train.pack_tokens`` budgets of 1x and ``micro_batch_size``x the longest possible row
  (the latter holds as many token slots per micro-batch as a padded one at full length).

"Useful" tokens are the real ones (not ``PAD``: prompt tokens, x0 and xt up to each row's valid
length); both layouts hold the same useful tokens, so useful tokens/s is the throughput that counts.
Two length distributions:

- ``demo``: the demo's arithmetic task (``opdlm demo``): real prompts and worked answers of the
  training split through its tokenizer; a rollout is valid up to and including its EOS, within the
  demo's 32 new tokens (the demo's teacher is exact, so its student's answers have these lengths).
- ``lognormal``: long-tailed rollouts (median 64, sigma 1, capped at 512: the curriculum's 4,000
  tokens scaled down for two CPU cores), prompts of 16..64 tokens.

The model (4 layers x 256, vocabulary 4096, random weights) and the teacher targets (random top-8)
do not change what is timed: the student's layers, attention and output projection over the rows.
On CPU attention runs the dense/SDPA path, whose tile plan skips key spans no query of a tile may
see; on a GPU FlexAttention skips the other documents' blocks the same way.

The repeats of the three layouts are interleaved, and the JSON records the machine's load average
before and after: on a shared machine the absolute tokens/s move with the load, the ratios less.

Run: ``OMP_NUM_THREADS=1 python benchmarks/packing_bench.py [--repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nemo_opdlm.distill import loss as losses  # noqa: E402
from nemo_opdlm.distill import packing, states  # noqa: E402
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig  # noqa: E402
from nemo_opdlm.models.student import build_student  # noqa: E402
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime  # noqa: E402
from nemo_opdlm.runtime.pipeline import run_schedule  # noqa: E402
from nemo_opdlm.training.step import make_loss_fn  # noqa: E402

MODEL = ModelConfig(
    num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4, num_query_groups=2,
    vocab_size=4096, make_vocab_size_divisible_by=128, qk_layernorm=True, max_position_embeddings=2048,
    rotary_base=1_000_000.0, init_method_std=0.02,
)
MASK_ID, EOS_ID, PAD_ID, BLOCK, TOP_K = MODEL.vocab_size - 1, 1, 0, 4, 8


def demo_lengths(rows: int, seed: int) -> tuple[list[int], list[int], int]:
    """Prompt and valid response lengths of the demo's arithmetic task, and its rollout width (32)."""
    from nemo_opdlm.recipes.tiny import MAX_NEW_TOKENS
    from nemo_opdlm.eval import synthetic

    tok = synthetic.build_tokenizer("arithmetic")
    probs = synthetic.make_split(synthetic.task_config("arithmetic"), "train", rows * (seed + 1), 0)[-rows:]
    prompt = [len(tok(p.prompt)["input_ids"]) for p in probs]
    response = [min(MAX_NEW_TOKENS, len(tok(p.response)["input_ids"]) + 1) for p in probs]  # + EOS
    return prompt, response, MAX_NEW_TOKENS


def lognormal_lengths(rows: int, seed: int, cap: int = 512) -> tuple[list[int], list[int], int]:
    """Long-tailed response lengths (median 64, sigma 1, <= cap), prompts of 16..64 tokens."""
    g = torch.Generator().manual_seed(seed)
    response = torch.exp(math.log(64) + torch.randn(rows, generator=g)).round().clamp(1, cap).long()
    prompt = torch.randint(16, 65, (rows,), generator=g)
    return prompt.tolist(), response.tolist(), cap


def make_rows(prompt_lens: list[int], valid_lens: list[int], width: int, seed: int) -> dict[str, torch.Tensor]:
    """Padded student rows ``[prompt | x0 | xt]`` (block 4, random masks), with random top-k targets."""
    g = torch.Generator().manual_seed(seed)
    batch, p_width = len(prompt_lens), max(prompt_lens)
    prompt_ids = torch.randint(4, MASK_ID, (batch, p_width), generator=g)
    response = torch.randint(4, MASK_ID, (batch, width), generator=g)
    valid = torch.arange(width)[None, :] < torch.tensor(valid_lens)[:, None]  # [B, L]
    masked = states.random_mask(valid, BLOCK, g)
    rows = states.assemble(prompt_ids, torch.tensor(prompt_lens), response, valid, masked, block_size=BLOCK,
                           mask_token_id=MASK_ID, eos_ids=[EOS_ID])
    rows["t_logprobs"] = torch.randn(batch, width, TOP_K, generator=g).log_softmax(-1)  # [B, L, k]
    rows["t_ids"] = torch.randint(0, MASK_ID, (batch, width, TOP_K), generator=g)  # [B, L, k]
    return rows


def timed_pass(student: list, microbatches: list[dict], num_seq: int, **logits_args) -> float:
    """Seconds of one forward + backward over ``microbatches`` (the trainer's schedule and loss)."""
    loss_fn = make_loss_fn("opdlm", num_seq, len(microbatches), None)
    student[0].zero_grad()
    start = time.perf_counter()
    run_schedule(student, microbatches, loss_fn, forward_only=False, **logits_args)
    return time.perf_counter() - start


def bench_layouts(student: list, rows: dict, micro_batch: int, repeats: int) -> dict:
    """Padded vs packed (1x and micro_batch x the longest row) on the same rows."""
    length = rows["loss_mask"].shape[1]
    width = rows["input_ids"].shape[1]
    num_seq = losses.count_sequences([rows["loss_mask"]])
    useful = packing.real_tokens(rows["meta"])
    padded = states.split_microbatches(rows, rows["input_ids"].shape[0] // micro_batch)
    layouts: dict[str, tuple[list[dict], dict]] = {"padded": (padded, {"logits_last": length})}
    for factor in (1, micro_batch):
        start = time.perf_counter()
        packed, groups = packing.pack_rows(rows, factor * width, block_size=BLOCK, shift=False, pad_id=PAD_ID)
        for mb, index in zip(packed, groups):
            mb.update(t_logprobs=rows["t_logprobs"][index], t_ids=rows["t_ids"][index])
        layouts[f"packed_{factor}x"] = (packed, {"pack_s": time.perf_counter() - start})
    args = {name: {k: v for k, v in extra.items() if k != "pack_s"} for name, (_, extra) in layouts.items()}
    for name, (mbs, _) in layouts.items():
        timed_pass(student, mbs[:1], num_seq, **args[name])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):  # interleaved, so that a shared machine's load drifts over every layout alike
        for name, (mbs, _) in layouts.items():
            seconds[name].append(timed_pass(student, mbs, num_seq, **args[name]))
    out = {}
    for name, (mbs, extra) in layouts.items():
        best, median = min(seconds[name]), statistics.median(seconds[name])
        out[name] = dict(
            micro_batches=len(mbs), tokens_per_micro_batch=int(mbs[0]["input_ids"].numel()),
            padding_fraction=round(packing.padding_fraction(mbs), 4), fwd_bwd_s=[round(t, 4) for t in seconds[name]],
            useful_tokens_per_s_median=round(useful / median, 1), useful_tokens_per_s_best=round(useful / best, 1),
            **({"pack_s": round(extra["pack_s"], 4)} if "pack_s" in extra else {}),
        )
        print(f"  {name:10s} {len(mbs):3d} mb x {out[name]['tokens_per_micro_batch']:5d} tok  "
              f"padding {out[name]['padding_fraction']:.3f}  {out[name]['useful_tokens_per_s_median']:9.1f} "
              f"useful tok/s (median of {repeats})", flush=True)
    out["useful_tokens"] = useful
    out["speedup_median"] = {k: round(out[k]["useful_tokens_per_s_median"] / out["padded"]["useful_tokens_per_s_median"], 3)
                             for k in layouts if k != "padded"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer rows, 1 repeat (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/packing.json)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    repeats = 1 if args.quick else args.repeats
    cases = {"demo": (demo_lengths, 32, 8), "lognormal": (lognormal_lengths, 32, 4)}  # rows per step, micro-batch
    load_before = os.getloadavg()
    results = {}
    with runtime(ParallelLayout(), seed=0, environ={}) as rt:
        torch.manual_seed(0)
        student = build_student(MODEL, DiffusionConfig(block_size=BLOCK, mask_token_id=MASK_ID), rt.ctx)
        for name, (lengths, n_rows, micro_batch) in cases.items():
            n_rows = n_rows // 4 if args.quick else n_rows
            prompt, response, width = lengths(n_rows, seed=0)
            print(f"{name}: {n_rows} rows, response lengths median {statistics.median(response)} max "
                  f"{max(response)} (width {width}), micro_batch_size {micro_batch}", flush=True)
            rows = make_rows(prompt, response, width, seed=0)
            results[name] = dict(rows=n_rows, micro_batch_size=micro_batch, rollout_width=width,
                                 response_lengths=response, prompt_lengths=prompt,
                                 **bench_layouts(student, rows, micro_batch, repeats))
    out = dict(
        benchmark="packing_bench", threads=torch.get_num_threads(), repeats=repeats, torch=torch.__version__,
        load_average_1_5_15_before=[round(x, 2) for x in load_before],
        load_average_1_5_15_after=[round(x, 2) for x in os.getloadavg()],
        machine=platform.machine(), processor=platform.processor(), cpu_count=os.cpu_count(),
        model={k: getattr(MODEL, k) for k in ("num_layers", "hidden_size", "vocab_size")},
        attention_backend=MODEL.attention_backend, block_size=BLOCK, top_k=TOP_K, results=results,
    )
    path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                    "packing_quick.json" if args.quick else "packing.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
