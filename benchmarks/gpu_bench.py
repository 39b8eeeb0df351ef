"""The OPDLM engine against a Hugging Face stack of the same shape, measured side by side in one run.

One job: on one device, for each model shape (Qwen3-0.6B and -1.7B by default, random weights,
the real 151,936-token vocabulary), time

- ``hf_train``: Hugging Face ``Qwen3ForCausalLM`` (SDPA, causal) forward + backward of
  ``batch x seq`` tokens with its own cross-entropy: the reference for the student step;
- ``student_step``: the student's training step on ``[prompt | x0 | xt]`` rows of the same
  ``batch x seq`` tokens (on-policy states, top-16 KL against precomputed teacher targets):
  forward + backward through ``get_forward_backward_func`` and the Megatron optimizer step,
  each timed apart, with model FLOPs utilisation;
- ``teacher``: the frozen teacher's forward over ``[prompt | x0]`` with top-16 log-probs out;
- ``hf_generate``: Hugging Face ``generate`` (greedy, KV cache) of ``rollout_tokens`` new tokens
  for ``rollout_batch`` prompts: the reference for the rollout;
- ``rollout_t0.9`` / ``rollout_static``: the student's block-diffusion rollout (block 4, threshold
  0.9 / one token per round) of the same prompts and length;
- ``opdlm_step``: one whole OPDLM step through the trainer's own functions, broken down into
  rollout / teacher / student forward+backward / optimizer seconds;

with peak device memory per section and the number of graphs compiled after warm-up (the targets
say: none). Ratios (ours / Hugging Face's tokens/s) are printed and written next to the targets.
The JSON file is rewritten after every section, so a run cut short keeps what it measured.

Random weights decode at near-uniform confidence, where a threshold never fires; before the
rollout sections the student's final norm is scaled (``--calibrate``) so that threshold 0.9 gives
about ``--tokens-per-round`` tokens per round (the paper's trained students give ~2 at block 4).
The scale changes what is decoded, not what a round costs.

Run on one GPU (an estimate, not yet measured: 3 to 5 minutes per shape)::

    python benchmarks/gpu_bench.py                  # -> benchmarks/results/gpu_bench_<gpu>.json

and on CPU at a tiny shape (what CI runs; every section, seconds)::

    python benchmarks/gpu_bench.py --tiny --out /tmp/gpu_bench_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|full scope is deprecated).*")

from nemo_opdlm.config import DistillConfig, OptimConfig, RolloutConfig, RunConfig, TrainConfig  # noqa: E402
from nemo_opdlm.convert.hf_config import hf_config_from_model  # noqa: E402
from nemo_opdlm.data.sampler import PromptBatch  # noqa: E402
from nemo_opdlm.distill.states import build_states  # noqa: E402
from nemo_opdlm.models.masks import logits_needed  # noqa: E402
from nemo_opdlm.teacher.targets import compute_targets, teacher_batch  # noqa: E402
from nemo_opdlm.models import masks  # noqa: E402
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig  # noqa: E402
from nemo_opdlm.models.student import build_student, from_teacher, parallel_of, unwrap  # noqa: E402
from nemo_opdlm.models.teacher import build_teacher  # noqa: E402
from nemo_opdlm.runtime.context import ParallelContext  # noqa: E402
from nemo_opdlm.rollout.sampler import BlockSampler, SamplerConfig  # noqa: E402
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime  # noqa: E402
from nemo_opdlm.runtime.pipeline import run_schedule  # noqa: E402
from nemo_opdlm.training.optim import optimizer_step, wrap_for_training, zero_grads  # noqa: E402
from nemo_opdlm.training.step import forward_backward, make_loss_fn  # noqa: E402
from nemo_opdlm.recipes.models import QWEN3_MASK_ID, qwen3_0_6b, qwen3_1_7b  # noqa: E402

TARGETS = {"student_step_vs_hf_fwd_bwd": 1.0, "paired_student_step_vs_hf_fwd_bwd": 1.0,
           "rollout_t0.9_vs_hf_generate": 3.0}
"""Issue 8's targets: ours / Hugging Face's tokens/s, same GPU, same run."""

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "B200": 2250.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts) for model FLOPs utilisation."""


@dataclass(kw_only=True)
class Settings:
    """What each section runs; defaults are the issue's GPU sizes."""

    train_batch: int = 4
    """Rows per training forward+backward (one micro-batch, as Hugging Face's one batch)."""
    train_seq: int = 2048
    """Tokens per training row: [prompt | x0 | xt] for the student, causal tokens for HF."""
    train_prompt: int = 256
    """Prompt tokens of a student row; x0 and xt take (train_seq - train_prompt) / 2 each."""
    top_k: int = 16
    """Teacher log-probs kept per position."""
    rollout_batch: int = 128
    rollout_prompt: int = 128
    """Longest prompt of the rollout batch (lengths spread over [prompt/2, prompt], left-padded)."""
    rollout_tokens: int = 1024
    block_size: int = 4
    steps_per_block: int = 4
    threshold: float = 0.9
    tokens_per_round: float = 2.0
    """Calibration target for threshold decoding of random weights (see the module docstring)."""
    step_prompts: int = 32
    """Prompts per OPDLM step (one data-parallel rank)."""
    step_tokens: int = 512
    """Rollout length of the OPDLM step."""
    step_micro_batch: int = 4
    warmup: int = 2
    """Untimed iterations of each training section (compilation, allocator, autotuning)."""
    iters: int = 5
    """Timed iterations of each training section (the rollout sections run once after a short warm-up)."""

    def __post_init__(self) -> None:
        response = self.train_seq - self.train_prompt
        if response <= 0 or response % (2 * self.block_size):
            raise ValueError(f"train_seq - train_prompt = {response} must be a positive multiple of "
                             f"2 x block_size = {2 * self.block_size} (x0 and xt of whole blocks)")
        if self.step_prompts % self.step_micro_batch:
            raise ValueError(f"step_prompts={self.step_prompts} must be a multiple of step_micro_batch="
                             f"{self.step_micro_batch}")
        if min(self.train_batch, self.rollout_batch, self.rollout_prompt, self.rollout_tokens, self.iters) < 1:
            raise ValueError("batch sizes, lengths and iters must be >= 1")
        if self.rollout_prompt < 2:
            raise ValueError("rollout_prompt must be >= 2 (prompt lengths spread over [prompt/2, prompt])")

    @property
    def train_response(self) -> int:
        return (self.train_seq - self.train_prompt) // 2


TINY = Settings(train_batch=2, train_seq=48, train_prompt=16, top_k=8, rollout_batch=4, rollout_prompt=8,
                rollout_tokens=16, step_prompts=4, step_tokens=16, step_micro_batch=2, warmup=1, iters=2)


def tiny_shape() -> ModelConfig:
    """Qwen3 in miniature (2 layers x 64, tied, qk-norm), fp32, for the CPU run."""
    return ModelConfig(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
                       rotary_base=1_000_000.0, qk_layernorm=True, tie_word_embeddings=True,
                       params_dtype="float32")


def qwen3_30m() -> ModelConfig:
    """Qwen3 at 30M parameters (6 x 512, FFN 1536, 8 query heads / 4 KV groups of 64, qk-norm, vocab
    8192, untied), fp32: the CPU comparison (``--shapes qwen3-30m --train-batch 2 --train-seq 1024``)."""
    return ModelConfig(family="qwen3", num_layers=6, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                       num_query_groups=4, head_dim=64, vocab_size=8192, max_position_embeddings=2048,
                       rotary_base=1_000_000.0, qk_layernorm=True, tie_word_embeddings=False,
                       params_dtype="float32")


SHAPES: dict[str, Callable[[], ModelConfig]] = {"qwen3-0.6b": qwen3_0_6b, "qwen3-1.7b": qwen3_1_7b,
                                                "qwen3-30m": qwen3_30m, "tiny": tiny_shape}
SECTIONS = ("hf_train", "hf_generate", "student_step", "teacher", "rollout", "opdlm_step", "paired_train")
DEFAULT_SECTIONS = SECTIONS[:-1]
"""``paired_train`` (``bench_paired_train``) holds both models at once: asked for by name."""


# --- measuring ------------------------------------------------------------------------------------
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far (0 where dynamo never ran)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Memory:
    """Peak device memory of a section (GiB; None on CPU, where the allocator keeps no peak)."""

    def reset(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> Optional[float]:
        if not torch.cuda.is_available():
            return None
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], dict[str, float]], s: Settings) -> dict[str, float]:
    """Run ``fn`` (which returns named seconds) ``warmup`` times untimed, then ``iters`` times;
    the median of each named time, and the graphs compiled during the timed iterations."""
    for _ in range(s.warmup):
        fn()
    before = compiled_graphs()
    runs = [fn() for _ in range(s.iters)]
    out = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    out["graphs_compiled_after_warmup"] = compiled_graphs() - before
    return out


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def peak_flops(override_tflops: Optional[float]) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    name = gpu_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def matmul_params(cfg: ModelConfig) -> int:
    """Weights every token multiplies (all layers' projections and the output layer)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_query_groups)
    mlp = 3 * h * cfg.ffn_hidden_size
    return cfg.num_layers * (attn + mlp) + h * cfg.vocab_size


def train_flops(cfg: ModelConfig, tokens: int, attended_pairs: int, output_tokens: int) -> float:
    """Model FLOPs of forward+backward (3x forward): 2 per weight per token for the layers, the
    output layer at the ``output_tokens`` that need logits, and 4 per head dim per attended
    (query, key) pair per layer for QK^T and PV."""
    h = cfg.hidden_size
    layers = matmul_params(cfg) - h * cfg.vocab_size
    forward = (2 * layers * tokens + 2 * h * cfg.vocab_size * output_tokens
               + 4 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * attended_pairs)
    return 3.0 * forward


# --- inputs ---------------------------------------------------------------------------------------
def random_prompts(batch: int, width: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts with lengths spread over [width/2, width] (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, width // 2), width + 1, (batch,), generator=gen)
    ids = torch.randint(1, vocab, (batch, width), generator=gen)
    ids[torch.arange(width)[None, :] < (width - lens)[:, None]] = 0
    return ids, lens


def student_rows(cfg: ModelConfig, s: Settings, mask_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """On-policy training rows ``[prompt | x0 | xt]`` from a random "rollout" (full prompts, no EOS)."""
    gen = torch.Generator().manual_seed(seed)
    b, p, L = s.train_batch, s.train_prompt, s.train_response
    prompt_ids = torch.randint(1, mask_id, (b, p), generator=gen)
    response = torch.randint(1, mask_id, (b, L), generator=gen)
    step_map = torch.randint(0, s.steps_per_block, (b, L), generator=gen)
    valid = torch.ones(b, L, dtype=torch.bool)
    return build_states(prompt_ids, torch.full((b,), p), response, step_map, valid, block_size=s.block_size,
                        steps_per_block=s.steps_per_block, mask_token_id=mask_id, eos_ids=(), generator=gen)


def attended_pairs(meta: torch.Tensor) -> int:
    """(query, key) pairs the block mask allows, over all rows (row by row: [S, S] at a time)."""
    return sum(int(masks.allowed(meta[i: i + 1], meta[i: i + 1]).sum()) for i in range(meta.shape[0]))


def random_targets(b: int, length: int, k: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher targets of the right shapes: normalised log-probs and random ids (repeats do
    not change what the loss costs)."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = torch.randn(b, length, k, generator=gen).log_softmax(-1)
    ids = torch.randint(0, vocab, (b, length, k), generator=gen)
    return logprobs, ids


# --- Hugging Face reference -----------------------------------------------------------------------
def hf_model(cfg: ModelConfig):
    """``AutoModelForCausalLM`` of the same shape (random weights, SDPA), on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = hf_config_from_model(cfg)
    config = AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items() if k != "dtype"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=cfg.dtype)
    return model.to(device())


def hf_train_step(model, cfg: ModelConfig, s: Settings) -> Callable[[], dict[str, float]]:
    """One timed Hugging Face forward + backward of ``batch x seq`` tokens."""
    ids = torch.randint(1, cfg.vocab_size, (s.train_batch, s.train_seq), device=device())
    model.train()

    def step() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        t, _ = timed(lambda: model(input_ids=ids, labels=ids).loss.backward())
        return {"fwd_bwd_s": t}

    return step


def bench_hf_train(model, cfg: ModelConfig, s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = repeat(hf_train_step(model, cfg, s), s)
    tokens = s.train_batch * s.train_seq
    flops = train_flops(cfg, tokens, s.train_batch * s.train_seq * (s.train_seq + 1) // 2, tokens)
    out.update(tokens=tokens, tokens_per_s=tokens / out["fwd_bwd_s"], model_tflop_per_s=flops / out["fwd_bwd_s"] / 1e12)
    model.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def bench_hf_generate(model, cfg: ModelConfig, s: Settings, prompts: tuple[torch.Tensor, torch.Tensor]) -> dict:
    ids, lens = (t.to(device()) for t in prompts)
    attention = (torch.arange(ids.shape[1], device=ids.device)[None, :] >= (ids.shape[1] - lens)[:, None]).long()
    model.eval()

    def generate(n: int):
        return model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0)

    generate(min(8, s.rollout_tokens))  # warm-up
    before = compiled_graphs()
    seconds, out = timed(lambda: generate(s.rollout_tokens))
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return dict(tokens=tokens, wall_s=seconds, tokens_per_s=tokens / seconds,
                graphs_compiled_after_warmup=compiled_graphs() - before)


# --- ours -----------------------------------------------------------------------------------------
def student_train_step(state, cfg: ModelConfig, s: Settings, mask_id: int,
                       rows: dict[str, torch.Tensor]) -> Callable[[], dict[str, float]]:
    """One timed student step on ``rows``: forward + backward, then the optimizer, timed apart."""
    t_logprobs, t_ids = random_targets(s.train_batch, s.train_response, s.top_k, cfg.vocab_size)
    batch = dict(rows, t_logprobs=t_logprobs, t_ids=t_ids)
    batch = {k: v.to(device()) for k, v in batch.items()}
    loss_fn = make_loss_fn("opdlm", num_sequences=s.train_batch, scale=1.0, tp_group=parallel_of(state.chunks).tp_group)
    last = logits_needed(s.train_response)

    def step() -> dict[str, float]:
        zero_grads(state)
        t_fb, _ = timed(lambda: run_schedule(state.chunks, [batch], loss_fn, forward_only=False, logits_last=last))
        t_opt, _ = timed(lambda: optimizer_step(state))
        return {"fwd_bwd_s": t_fb, "optimizer_s": t_opt, "step_s": t_fb + t_opt}

    return step


def bench_student_step(state, cfg: ModelConfig, s: Settings, mask_id: int) -> dict[str, Any]:
    rows = student_rows(cfg, s, mask_id)
    out: dict[str, Any] = repeat(student_train_step(state, cfg, s, mask_id, rows), s)
    tokens = rows["input_ids"].numel()
    flops = train_flops(cfg, tokens, attended_pairs(rows["meta"]), s.train_batch * logits_needed(s.train_response))
    out.update(tokens=tokens, tokens_per_s=tokens / out["step_s"], fwd_bwd_tokens_per_s=tokens / out["fwd_bwd_s"],
               model_tflop_per_s=flops / out["step_s"] / 1e12,
               fwd_bwd_model_tflop_per_s=flops / out["fwd_bwd_s"] / 1e12)
    return out


def bench_paired_train(hf, state, cfg: ModelConfig, s: Settings, mask_id: int) -> dict[str, Any]:
    """``hf_train`` and ``student_step`` alternated iteration by iteration (ABAB...), both models
    resident: on a shared or noisy machine (this 2-core CPU: single sections swing by 30%) a drift
    hits both sides of a pair alike. The ratio is the median of the per-pair ratios, with its
    spread. Opt-in (``--paired``): it needs both models in memory at once."""
    hf_step = hf_train_step(hf, cfg, s)
    our_step = student_train_step(state, cfg, s, mask_id, student_rows(cfg, s, mask_id))
    for _ in range(s.warmup):
        hf_step()
        our_step()
    pairs = [(hf_step()["fwd_bwd_s"], our_step()) for _ in range(s.iters)]

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    step_ratios = [theirs / ours["step_s"] for theirs, ours in pairs]
    fwd_bwd_ratios = [theirs / ours["fwd_bwd_s"] for theirs, ours in pairs]
    return {"hf_fwd_bwd_s": median([t for t, _ in pairs]), "student_step_s": median([o["step_s"] for _, o in pairs]),
            "student_fwd_bwd_s": median([o["fwd_bwd_s"] for _, o in pairs]),
            "step_ratio_median": median(step_ratios), "step_ratio_min": min(step_ratios),
            "step_ratio_max": max(step_ratios), "fwd_bwd_ratio_median": median(fwd_bwd_ratios),
            "pairs": len(pairs)}


def bench_teacher(teacher, cfg: ModelConfig, s: Settings, mask_id: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    b, p, L = s.train_batch, s.train_prompt, s.train_response
    prompt_ids = torch.randint(1, mask_id, (b, p), generator=gen)
    x0 = torch.randint(1, mask_id, (b, L), generator=gen)
    batch = teacher_batch(prompt_ids, torch.full((b,), p), x0, torch.ones(b, L, dtype=torch.bool))
    batch = {k: v.to(device()) for k, v in batch.items()}

    def step() -> dict[str, float]:
        t, _ = timed(lambda: compute_targets(teacher, [batch], p, L, top_k=s.top_k))
        return {"forward_s": t}

    out: dict[str, Any] = repeat(step, s)
    tokens = b * (p + L)
    out.update(tokens=tokens, tokens_per_s=tokens / out["forward_s"])
    return out


def sampler_settings(s: Settings, mask_id: int, mode: str, tokens: int) -> SamplerConfig:
    """The rollouts' decoding (``RolloutConfig``: sampling at temperature 1) in ``mode``."""
    decode = RolloutConfig(mode=mode, threshold=s.threshold, steps_per_block=s.steps_per_block)
    return SamplerConfig(decode=decode, diffusion=DiffusionConfig(block_size=s.block_size, mask_token_id=mask_id),
                         max_new_tokens=tokens, seed=0)


def final_norm(chunks) -> torch.nn.Module:
    return unwrap(chunks[-1]).decoder.final_layernorm


@torch.no_grad()
def calibrate(chunks, s: Settings, mask_id: int, prompts: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Scale the final norm so that threshold decoding of random weights gives about
    ``s.tokens_per_round`` tokens per round (bisection on the log scale, short rollouts).

    The [MASK] embedding row is zeroed first, as in a real Qwen3 checkpoint (row 151669 is one no
    token maps to, never trained): a random row would make a [MASK] input, through the tied
    output layer, predict [MASK] with all the mass, and no candidate would ever be confident.
    """
    unwrap(chunks[0]).embedding.word_embeddings.weight[mask_id].zero_()
    ids, lens = prompts[0][:32], prompts[1][:32]
    probe = min(64, s.rollout_tokens)
    settings = sampler_settings(s, mask_id, "dynamic", probe)
    return bisect_norm_scale(final_norm(chunks),
                             lambda: BlockSampler(chunks, settings).generate(ids, lens).metrics.tokens_per_round,
                             s.tokens_per_round, steps=8)


def bisect_norm_scale(norm, parallelism: Callable[[], float], target: float, steps: int) -> dict[str, float]:
    """Scale ``norm``'s weight (a final norm) until ``parallelism()``, the tokens per round of a
    short threshold rollout, reaches about ``target``: bisection on the log scale over [1, 1e4]
    (random weights are otherwise too unsure for a threshold to fire). Leaves the scale applied."""
    base = norm.weight.detach().clone()

    def at(scale: float) -> float:
        norm.weight.copy_(base * scale)
        return parallelism()

    lo, hi = 0.0, math.log(1e4)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if at(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    scale = math.exp(hi)
    return {"final_norm_scale": round(scale, 3), "probe_tokens_per_round": round(at(scale), 3)}


def bench_rollout(chunks, s: Settings, mask_id: int, mode: str, prompts) -> dict[str, Any]:
    ids, lens = prompts
    BlockSampler(chunks, sampler_settings(s, mask_id, mode, 2 * s.block_size)).generate(ids[:8], lens[:8])  # warm-up
    before = compiled_graphs()
    sampler = BlockSampler(chunks, sampler_settings(s, mask_id, mode, s.rollout_tokens))
    seconds, rollout = timed(lambda: sampler.generate(ids, lens))
    m = rollout.metrics
    return dict(tokens=m.tokens_generated, wall_s=seconds, tokens_per_s=m.tokens_generated / seconds,
                rounds=m.rounds, tokens_per_round=m.tokens_per_round, ms_per_round=1e3 * seconds / m.rounds,
                graphs_compiled_after_warmup=compiled_graphs() - before)


def step_config(cfg: ModelConfig, s: Settings, mask_id: int) -> RunConfig:
    return RunConfig(
        model=cfg, diffusion=DiffusionConfig(block_size=s.block_size, mask_token_id=mask_id),
        rollout=RolloutConfig(threshold=s.threshold, steps_per_block=s.steps_per_block, min_length=s.step_tokens,
                              max_length=s.step_tokens, curriculum_steps=0),
        distill=DistillConfig(method="opdlm", top_k=s.top_k),
        train=TrainConfig(prompts_per_step=s.step_prompts, micro_batch_size=s.step_micro_batch),
    )


def bench_opdlm_step(state, teacher, cfg: ModelConfig, s: Settings, mask_id: int, prompts) -> dict[str, Any]:
    """One trainer step, phase by phase, through the trainer's own ``forward_backward`` (teacher
    targets computed up front, as under pipeline parallelism, so that the teacher's time stands
    apart) and optimizer step."""
    run = step_config(cfg, s, mask_id)
    ids, lens = prompts[0][: s.step_prompts], prompts[1][: s.step_prompts]
    batch = PromptBatch(indices=list(range(ids.shape[0])), prompt_ids=ids, prompt_lens=lens)

    def step(seed: int) -> dict[str, float]:
        out = forward_backward(run, batch, state, teacher, (), 0, seed=seed, length=s.step_tokens, route="before_pass")
        t_opt, _ = timed(lambda: optimizer_step(state))
        return dict(out.seconds, optimizer_s=t_opt, step_s=sum(out.seconds.values()) + t_opt,
                    rollout_tokens=float(out.responses.valid.sum()),
                    trained_tokens=float(out.rows["input_ids"].numel()))

    step(0)  # warm-up (untimed)
    mem = Memory()
    mem.reset()
    before = compiled_graphs()
    out: dict[str, Any] = step(1)
    out["graphs_compiled_after_warmup"] = compiled_graphs() - before
    out["peak_gib"] = mem.peak_gib()
    out["share"] = {k[:-2]: round(out[k] / out["step_s"], 3)
                    for k in ("rollout_s", "teacher_s", "student_fwd_bwd_s", "optimizer_s")}
    return out


# --- the run --------------------------------------------------------------------------------------
class Report:
    """The JSON file, rewritten after every section."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(header, shapes={})
        self.failed: list[str] = []

    def add(self, shape: str, section: str, result: dict[str, Any]) -> None:
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
        self.data["shapes"].setdefault(shape, {})[section] = rounded
        shown = ", ".join(f"{k}={v}" for k, v in rounded.items() if k.endswith(("per_s", "_s", "gib", "round", "error")))
        print(f"  [{shape}] {section}: {shown}", flush=True)
        self.write()

    def ratios(self, shape: str, peak: Optional[float]) -> None:
        r = self.data["shapes"].get(shape, {})
        out: dict[str, Any] = {}

        def ratio(name: str, ours: tuple[str, str], theirs: tuple[str, str]) -> None:
            a, b = r.get(ours[0], {}).get(ours[1]), r.get(theirs[0], {}).get(theirs[1])
            if a is not None and b:
                out[name] = round(a / b, 3)

        ratio("student_step_vs_hf_fwd_bwd", ("student_step", "tokens_per_s"), ("hf_train", "tokens_per_s"))
        ratio("student_fwd_bwd_vs_hf_fwd_bwd", ("student_step", "fwd_bwd_tokens_per_s"), ("hf_train", "tokens_per_s"))
        if "step_ratio_median" in r.get("paired_train", {}):
            out["paired_student_step_vs_hf_fwd_bwd"] = round(r["paired_train"]["step_ratio_median"], 3)
        ratio("rollout_t0.9_vs_hf_generate", ("rollout_t0.9", "tokens_per_s"), ("hf_generate", "tokens_per_s"))
        ratio("rollout_static_vs_hf_generate", ("rollout_static", "tokens_per_s"), ("hf_generate", "tokens_per_s"))
        if peak:
            for section in ("student_step", "hf_train"):
                if "model_tflop_per_s" in r.get(section, {}):
                    out[f"{section}_mfu"] = round(r[section]["model_tflop_per_s"] * 1e12 / peak, 3)
        r["ratios"] = out
        for name, value in out.items():
            target = TARGETS.get(name)
            verdict = "" if target is None else f"  (target >= {target}: {'met' if value >= target else 'NOT met'})"
            print(f"  [{shape}] {name} = {value}{verdict}", flush=True)
        self.write()

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)


def release() -> None:
    """Return what the models of a finished part held to the device (the next part starts clean)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(report: Report, shape: str, section: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one section with its own peak-memory window and record it.

    A section that fails (out of memory, a compile error) is recorded with its error and the run
    goes on: a GPU session has minutes, and the other sections' numbers are worth keeping.
    """
    mem = Memory()
    mem.reset()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 (reported in the JSON and on stderr, and the exit code)
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        report.failed.append(f"{shape}/{section}")
        release()
    result.setdefault("peak_gib", mem.peak_gib())
    report.add(shape, section, result)


def bench_hf(report: Report, name: str, cfg: ModelConfig, s: Settings, wanted: set[str], prompts) -> None:
    hf = hf_model(cfg)
    if "hf_train" in wanted:
        measure(report, name, "hf_train", lambda: bench_hf_train(hf, cfg, s))
    if "hf_generate" in wanted:
        measure(report, name, "hf_generate", lambda: bench_hf_generate(hf, cfg, s, prompts))


def bench_ours(report: Report, name: str, cfg: ModelConfig, s: Settings, wanted: set[str], prompts,
               parallel: ParallelContext) -> None:
    mask_id = mask_token(cfg)
    teacher = build_teacher(cfg, parallel)
    student = build_student(cfg, DiffusionConfig(block_size=s.block_size, mask_token_id=mask_id), parallel)
    from_teacher(student, teacher)
    if wanted & {"rollout", "opdlm_step"}:
        # Before the optimizer exists: its fp32 master weights must start from the scaled norm.
        report.data["shapes"].setdefault(name, {})["calibration"] = calibrate(student, s, mask_id, prompts)
    state = wrap_for_training(student, cfg, OptimConfig(lr=1e-6, min_lr=0.0, warmup_steps=0), total_steps=1000)
    if "student_step" in wanted:
        measure(report, name, "student_step", lambda: bench_student_step(state, cfg, s, mask_id))
    if "teacher" in wanted:
        measure(report, name, "teacher", lambda: bench_teacher(teacher, cfg, s, mask_id))
    if "rollout" in wanted:
        for mode, section in (("dynamic", "rollout_t0.9"), ("static", "rollout_static")):
            measure(report, name, section, lambda: bench_rollout(state.chunks, s, mask_id, mode, prompts))
    if "opdlm_step" in wanted:
        measure(report, name, "opdlm_step", lambda: bench_opdlm_step(state, teacher, cfg, s, mask_id, prompts))
    if "paired_train" in wanted:
        hf = hf_model(cfg)
        measure(report, name, "paired_train", lambda: bench_paired_train(hf, state, cfg, s, mask_id))


def mask_token(cfg: ModelConfig) -> int:
    """Qwen3's [MASK] row at the real vocabulary; the last row at a tiny one."""
    return QWEN3_MASK_ID if cfg.vocab_size > QWEN3_MASK_ID else cfg.vocab_size - 1


def bench_shape(report: Report, name: str, cfg: ModelConfig, s: Settings, wanted: set[str],
                peak: Optional[float], parallel: ParallelContext) -> None:
    """Hugging Face's model first, then ours, each freed before the next (the 1.7B shape's student,
    optimizer, teacher and KV cache would not fit beside a Hugging Face copy on an 80 GB card)."""
    prompts = random_prompts(s.rollout_batch, s.rollout_prompt, mask_token(cfg), seed=0)
    print(f"{name}: {cfg.num_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size}, {cfg.params_dtype}",
          flush=True)
    if wanted & {"hf_train", "hf_generate"}:
        measure_part(report, name, "hf_model", lambda: bench_hf(report, name, cfg, s, wanted, prompts))
    if wanted & {"student_step", "teacher", "rollout", "opdlm_step", "paired_train"}:
        measure_part(report, name, "our_models", lambda: bench_ours(report, name, cfg, s, wanted, prompts, parallel))
    report.ratios(name, peak)


def measure_part(report: Report, shape: str, part: str, fn: Callable[[], None]) -> None:
    """Build one side's models and run its sections; a failure to build is recorded like a section's."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        report.data["shapes"].setdefault(shape, {})[f"{part}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        report.failed.append(f"{shape}/{part}")
        report.write()
    release()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("megatron.core", "transformers", "transformer_engine"):
        try:
            module = __import__(pkg, fromlist=["__version__"])
            out[pkg] = getattr(module, "__version__", "?")
        except ImportError:
            out[pkg] = "absent"
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape and sizes (the CPU run CI does)")
    parser.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} "
                                                       "(default qwen3-0.6b,qwen3-1.7b; tiny with --tiny)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma list of {SECTIONS} (default: all but paired_train)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_bench_<device>.json)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by name)")
    for f in dataclasses.fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(TINY, f.name)), default=None)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = TINY if args.tiny else Settings()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    s = dataclasses.replace(base, **overrides)
    shapes = (args.shapes or ("tiny" if args.tiny else "qwen3-0.6b,qwen3-1.7b")).split(",")
    wanted = set(args.sections.split(","))
    unknown = [x for x in shapes if x not in SHAPES] + [x for x in wanted if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown shape/section {unknown}; shapes: {sorted(SHAPES)}, sections: {SECTIONS}")
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name()).strip("_").lower()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_bench_{tag}.json")
    report = Report(out, {"benchmark": "gpu_bench", "device": gpu_name(), "versions": versions(),
                          "settings": dataclasses.asdict(s), "targets": TARGETS,
                          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    print(f"device {gpu_name()}; writing {out}", flush=True)
    peak = peak_flops(args.peak_tflops)
    with runtime(ParallelLayout(), seed=1234) as rt:
        for name in shapes:
            cfg = SHAPES[name]()
            if not torch.cuda.is_available() and cfg.dtype == torch.bfloat16 and name != "tiny":
                print(f"note: {name} in bf16 on CPU is slow; use --tiny for a smoke run", flush=True)
            bench_shape(report, name, cfg, s, wanted, peak, rt.ctx)
    report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report.data["failed"] = report.failed
    report.write()
    if report.failed:
        raise SystemExit(f"failed: {', '.join(report.failed)} (the other sections are in {out})")
    return report.data


if __name__ == "__main__":
    main()
