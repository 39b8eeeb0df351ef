"""``opdlm plan``: a dry run of a recipe on a CPU, before a job waits hours in a queue.

One job: resolve a recipe with its overrides and refuse it, with the fix named, when it cannot
run on the cluster it is meant for: the TP/PP layout must divide both models and the world, DP
must divide the prompts of a step, the checkpoints on disk (when present here) must have the
architectures and tokenizer the recipe assumes, and the estimated memory per GPU must fit.
Non-goals: building models or touching a GPU; exact memory (the estimate is a model of what
megatron-core and this package allocate, listed in :func:`estimate_memory`).

    opdlm plan qwen3_8b_self_tp2_pp1_8g
    opdlm plan qwen3:qwen3_8b_self_tp2_pp1_8g train.micro_batch_size=2 --gpu h200 --nodes 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from nemo_opdlm.errors import ConfigError, OPDLMError

if TYPE_CHECKING:  # annotations only: models.config imports torch, which `opdlm plan --help` must not wait for
    from nemo_opdlm.models.config import ModelConfig

GIB = 1024**3
OVERHEAD_GIB = 3.0
"""CUDA context, NCCL buffers, cuBLAS/TE workspaces: resident on every GPU besides tensors."""
RESERVE = 0.05
"""Share of the GPU's memory kept free for allocator fragmentation; a plan must fit in the rest."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator kind."""

    name: str
    memory_gib: float
    """Memory as nvidia-smi reports it."""
    overhead_gib: float = OVERHEAD_GIB
    fp8: bool = False
    """FP8 GEMMs (compute capability >= 8.9): where ``model.fp8='auto'`` turns FP8 on."""


GPUS: dict[str, GpuSpec] = {
    "h100-80g": GpuSpec("NVIDIA H100 80GB HBM3", 79.6, fp8=True),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", 140.4, fp8=True),
    "a100-80g": GpuSpec("NVIDIA A100 80GB", 80.0),
    "a100-40g": GpuSpec("NVIDIA A100 40GB", 40.0),
    "cpu": GpuSpec("CPU process (tiny test recipes)", 64.0, overhead_gib=0.0),
}


@dataclass(frozen=True)
class Cluster:
    """Where a plan is checked."""

    nodes: int
    gpus_per_node: int
    gpu: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def spec(self) -> GpuSpec:
        return GPUS[self.gpu]


@dataclass(frozen=True)
class Finding:
    """One result of a check: 'ok', 'note' (skipped or worth knowing) or 'error' (refuses the plan)."""

    level: str
    text: str


# ----------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Shape:
    """The numbers of one run on one cluster that memory depends on."""

    tp: int
    pp: int
    dp: int
    rows_per_rank: int
    """Rollouts (= training rows) per data-parallel rank per step."""
    micro_batch: int
    num_microbatches: int
    prompt: int
    """Prompt width P (the longest prompt kept)."""
    response: int
    """Response length L at the end of the curriculum (whole blocks)."""
    teacher_tp: int
    """The teacher's TP: ``parallel.teacher.tp``, else the student's; its PP likewise."""
    teacher_pp: int
    teacher_dp: int
    """The teacher's replicas: world / (teacher TP x PP)."""
    own_teacher: bool
    """The teacher has its own layout (``parallel.teacher``), even one equal to the student's: its
    targets are exchanged (``teacher/exchange.py``), one micro-batch at a time or a whole
    step's before the student's pass (``RunConfig.teacher_route``)."""

    @property
    def served(self) -> int:
        """The most student replicas one teacher replica serves (replica ``d`` by ``d mod DP_t``)."""
        return -(-self.dp // self.teacher_dp)

    @property
    def student_row(self) -> int:
        return self.prompt + 2 * self.response  # [prompt | x0 | xt]

    @property
    def teacher_row(self) -> int:
        return self.prompt + self.response  # [prompt | x0]


def check_layout(cfg, cluster: Cluster) -> tuple[Shape, list[Finding]]:
    """Divisibility of the world, the prompts of a step and the micro-batches; raise ConfigError if broken.

    ``RunConfig`` already checked that TP divides heads, KV groups and FFN, and PP the layers, for
    both models (the teacher at ``parallel.teacher`` when it has its own layout); ``ParallelLayout.dp``
    checks that the teacher's TP x PP divides the world too.
    """
    from nemo_opdlm.runtime.distributed import LayoutError

    par, train = cfg.parallel, cfg.train
    dp = par.dp(cluster.world_size)
    if train.prompts_per_step % dp:
        raise LayoutError(
            f"train.prompts_per_step={train.prompts_per_step} is not divisible by DP={dp} "
            f"(world {cluster.world_size} / tp*pp*cp {par.model_parallel}): every data-parallel rank needs "
            f"the same number of prompts; use a multiple of {dp}"
        )
    rows = train.prompts_per_step // dp
    if rows % train.micro_batch_size:
        raise LayoutError(
            f"train.micro_batch_size={train.micro_batch_size} does not divide the {rows} rows per data-parallel "
            f"rank (train.prompts_per_step={train.prompts_per_step} / DP={dp})"
        )
    t_par = par.teacher_layout()
    block = cfg.diffusion.block_size
    shape = Shape(tp=par.tp, pp=par.pp, dp=dp, rows_per_rank=rows, micro_batch=train.micro_batch_size,
                  num_microbatches=rows // train.micro_batch_size,
                  prompt=cfg.data.max_prompt_tokens if cfg.data is not None else 64,
                  # the absolute grid's frame adds a block: each prompt's last P mod b tokens (models/grid.py)
                  response=-(-cfg.rollout.max_length // block) * block + (block if cfg.diffusion.block_grid == "absolute"
                                                                           else 0),
                  teacher_tp=t_par.tp, teacher_pp=t_par.pp, teacher_dp=par.teacher_dp(cluster.world_size),
                  own_teacher=par.teacher is not None)
    findings = [Finding("ok", f"layout {_layout(shape)} on {cluster.world_size} GPUs divides both models and "
                              f"{train.prompts_per_step} prompts ({rows} per DP rank)")]
    findings += _layout_notes(cfg, shape, cluster)
    return shape, findings


def _layout(shape: Shape) -> str:
    """``tp=2 pp=1 dp=8``, and the teacher's own layout after it."""
    out = f"tp={shape.tp} pp={shape.pp} dp={shape.dp}"
    if shape.own_teacher:
        out += f" (teacher: tp={shape.teacher_tp} pp={shape.teacher_pp} dp={shape.teacher_dp}, parallel.teacher)"
    return out


def _layout_notes(cfg, shape: Shape, cluster: Cluster) -> list[Finding]:
    """What a valid layout makes slow or leaves unplanned."""
    notes = []
    tps = [("parallel.tp", shape.tp)] + ([("parallel.teacher.tp", shape.teacher_tp)] if shape.own_teacher else [])
    for key, tp in tps:
        if tp > cluster.gpus_per_node:
            notes.append(f"{key}={tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor parallelism "
                         "across nodes is slow; prefer pp for the rest")
    if shape.own_teacher and shape.dp % shape.teacher_dp:
        fewest = shape.dp // shape.teacher_dp
        notes.append(f"teacher DP={shape.teacher_dp} does not divide student DP={shape.dp}: teacher replicas serve "
                     f"{fewest} or {shape.served} student replicas each, and the step waits for the busiest; "
                     "choose parallel.teacher so that world / (teacher tp*pp) divides the student's DP")
    if cfg.train.pack_tokens is not None:
        notes.append(f"train.pack_tokens={cfg.train.pack_tokens}: the memory below is for padded micro-batches of "
                     f"train.micro_batch_size={shape.micro_batch} rows; a packed one holds pack_tokens tokens and "
                     "its rows' teacher targets, which depend on the rollout lengths (not planned yet)")
    if shape.pp > 1 and shape.num_microbatches < shape.pp:
        notes.append(f"{shape.num_microbatches} micro-batches per step for pp={shape.pp}: the pipeline is mostly idle")
    return [Finding("note", text) for text in notes]


# ----------------------------------------------------------------------------------------------
# Checkpoints and tokenizers (only what is on this machine)

def compare_architecture(expected: ModelConfig, found: ModelConfig, what: str, source: str) -> list[Finding]:
    """An error naming every architecture field where the checkpoint and the recipe disagree
    (``hf_config.architecture_differences``: the trainer's own check, the same wording)."""
    from nemo_opdlm.convert import hf_config as hfc

    diffs = hfc.architecture_differences(expected, found)
    if diffs:
        return [Finding("error", f"{what} does not match {source}: " + "; ".join(diffs)
                        + " (wrong checkpoint for this recipe, or fix the recipe's shape)")]
    return [Finding("ok", f"{what} matches {source}")]


def _tokenizer_json(path: Optional[str]) -> Optional[dict[str, Any]]:
    if not path:
        return None
    for candidate in (os.path.join(path, "tokenizer.json"), os.path.join(path, "hf_assets", "tokenizer.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    return None


def _token_table(tok: dict[str, Any]) -> tuple[dict[int, str], set[int]]:
    """id -> token text, and the ids of added tokens (specials and user-added)."""
    vocab = (tok.get("model") or {}).get("vocab")
    table: dict[int, str] = {}
    if isinstance(vocab, dict):
        table = {int(i): t for t, i in vocab.items()}
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        table = {i: piece[0] for i, piece in enumerate(vocab)}
    added = {int(t["id"]) for t in tok.get("added_tokens", [])}
    for t in tok.get("added_tokens", []):
        table[int(t["id"])] = t["content"]
    return table, added


def check_tokenizers(cfg) -> list[Finding]:
    """Tokenizer vs embedding, [MASK] id vs real tokens, and teacher tokenizer == student tokenizer."""
    init = cfg.init
    teacher_dir = init.tokenizer or init.teacher_hf or init.teacher_checkpoint
    teacher_tok = _tokenizer_json(teacher_dir)
    if teacher_tok is None:
        return [Finding("note", f"no tokenizer.json at {teacher_dir}: tokenizer checks skipped")]
    table, added = _token_table(teacher_tok)
    size = max(table) + 1 if table else 0
    findings: list[Finding] = []
    for what, model in (("model", cfg.model), ("teacher_model", cfg.teacher)):
        if size > model.vocab_size:
            findings.append(Finding("error", f"the tokenizer in {teacher_dir} has ids up to {size - 1} but "
                                             f"{what}.vocab_size={model.vocab_size}: tokenizer and model differ"))
    mask = cfg.diffusion.mask_token_id
    if mask in table and mask not in added:
        findings.append(Finding("error", f"diffusion.mask_token_id={mask} is the ordinary token {table[mask]!r}: "
                                         f"pick an id the tokenizer never produces (>= {size} and < "
                                         f"{cfg.model.vocab_size}) or a reserved special token"))
    elif mask in table:
        findings.append(Finding("ok", f"[MASK] id {mask} is the special token {table[mask]!r}"))
    else:
        findings.append(Finding("ok", f"[MASK] id {mask} is an embedding row no token maps to "
                                      f"(tokenizer: {size} ids, embedding: {cfg.model.vocab_size})"))
    student_tok = _tokenizer_json(init.student_hf)
    if student_tok is not None:
        s_table, s_added = _token_table(student_tok)
        differ = sorted(i for i in set(table) | set(s_table) if table.get(i) != s_table.get(i))
        if differ:
            i = differ[0]
            findings.append(Finding("error", f"teacher and student tokenizers differ at {len(differ)} ids (first: "
                                             f"{i}: {table.get(i)!r} vs {s_table.get(i)!r}): the KL needs one "
                                             "vocabulary; use a student from the teacher's family"))
        else:
            findings.append(Finding("ok", "teacher and student tokenizers are identical"))
    return findings


def check_checkpoints(cfg, require_paths: bool = False) -> list[Finding]:
    """Compare the recipe with the checkpoints and data on this machine; skip (or refuse) what is absent."""
    from nemo_opdlm.convert.architecture import model_config_of_weights

    init = cfg.init
    findings: list[Finding] = []
    missing = "error" if require_paths else "note"
    sources = [("teacher", cfg.teacher, init.teacher_checkpoint or init.teacher_hf)]
    if init.student_hf:
        sources.append(("student", cfg.model, init.student_hf))
    for what, model, path in sources:
        if not path:
            findings.append(Finding(missing, f"no {what} checkpoint configured (init.{what}_hf): random weights"))
            continue
        if not os.path.exists(path):
            findings.append(Finding(missing, f"{what} checkpoint {path} not found here: its config checks skipped"))
            continue
        try:  # only the architecture is compared: Transformer Engine may be absent here
            found = model_config_of_weights(path, f"init.{what}", linear_impl="local", fp8=None)
        except ConfigError as err:
            findings.append(Finding("error", str(err)))
            continue
        findings += compare_architecture(model, found, f"the recipe's {what}", path)
    if any(os.path.exists(p) for p in (init.tokenizer, init.teacher_hf, init.teacher_checkpoint) if p):
        findings += check_tokenizers(cfg)
    if cfg.data is not None:
        if os.path.exists(cfg.data.path):
            findings.append(Finding("ok", f"data {cfg.data.path} exists"))
        else:
            findings.append(Finding(missing, f"data.path {cfg.data.path} not found here"))
    return findings


# ----------------------------------------------------------------------------------------------
# Memory


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def layer_params(m: ModelConfig, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (norms are replicated)."""
    hd, h = m.kv_channels, m.hidden_size
    qkv = h * (m.num_attention_heads + 2 * m.num_query_groups) * hd
    if m.add_qkv_bias:
        qkv += (m.num_attention_heads + 2 * m.num_query_groups) * hd
    proj = m.num_attention_heads * hd * h
    mlp = 3 * h * m.ffn_hidden_size  # fc1 = [gate; up], fc2
    norms = 2 * h + (2 * hd if m.qk_layernorm else 0)
    return (qkv + proj + mlp) // tp + norms


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (embedding first, output layer last).

    With tied embeddings and PP > 1 megatron-core keeps a copy of the embedding on the last stage.
    """
    total = (m.num_layers // pp) * layer_params(m, tp)
    vocab_rows = m.padded_vocab_size(tp) // tp * m.hidden_size
    if stage == 0:
        total += vocab_rows
    if stage == pp - 1:
        total += m.hidden_size  # final norm
        if not m.tie_word_embeddings or pp > 1:
            total += vocab_rows
    return total


def attention_bytes_per_token(m: ModelConfig, tp: int, keys: int) -> int:
    """What the core attention keeps per query token beyond q, k, v and its output, for ``keys`` keys.

    flex: the log-sum-exp (fp32 per head). sdpa: the dense boolean mask and its additive float copy,
    ``[B, 1, S, S]``. local (megatron's unfused path): the fp32 softmax output and its bf16 copy per
    head, plus the boolean mask.
    """
    heads = m.num_attention_heads // tp
    backend = m.resolved_attention_backend(on_gpu=True)
    if backend == "flex":
        return 4 * heads
    if backend == "sdpa":
        return 4 * heads + 3 * keys
    return heads * keys * (4 + _bytes(m.params_dtype)) + keys


def layer_activation_bytes(m: ModelConfig, tp: int, keys: int) -> tuple[int, int]:
    """(tensors every layer saves for backward, attention extra) in bytes per token.

    Saved per token (megatron-core without sequence parallelism): the inputs of both RMSNorms and
    of linear_qkv and linear_fc1 (4H), q/k-norm inputs, the roped q, k, v, the attention output
    (kept by the kernel and, reshaped, as linear_proj's input), fc1's [gate; up] output and the
    SwiGLU output (fc2's input).
    """
    b, hd, h = _bytes(m.params_dtype), m.kv_channels, m.hidden_size
    nq, ng = m.num_attention_heads * hd // tp, m.num_query_groups * hd // tp
    elems = 4 * h + (nq + 2 * ng) + 2 * nq + 3 * m.ffn_hidden_size // tp
    if m.qk_layernorm:
        elems += nq + ng
    return b * elems, attention_bytes_per_token(m, tp, keys)


def forward_transient_bytes(m: ModelConfig, tp: int, tokens: int, keys: int) -> int:
    """Peak of a no-grad forward through one layer (teacher, rollout prefill): live tensors only."""
    b, hd, h = _bytes(m.params_dtype), m.kv_channels, m.hidden_size
    nq, ng = m.num_attention_heads * hd // tp, m.num_query_groups * hd // tp
    elems = 3 * h + nq + 2 * ng + nq + 3 * m.ffn_hidden_size // tp
    backend = m.resolved_attention_backend(on_gpu=True)
    attn = 0 if backend == "flex" else (3 * keys if backend == "sdpa" else
                                        m.num_attention_heads // tp * keys * (4 + b) + keys)
    return tokens * (b * elems + attn)


@dataclass
class MemoryEstimate:
    """Bytes per GPU on one pipeline stage, by phase of a training step."""

    stage: int
    static: dict[str, float] = field(default_factory=dict)
    """Resident all step (weights, grads, optimizer, teacher unless offloaded, overhead)."""
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    """Phase -> component -> bytes, on top of ``static``."""
    activations: dict[str, float] = field(default_factory=dict)
    """Student training activations under each recompute mode (the configured one is in 'train')."""

    def phase_total(self, phase: str) -> float:
        return sum(self.static.values()) + sum(self.phases[phase].values())

    @property
    def peak(self) -> float:
        return max(self.phase_total(p) for p in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)


def teacher_weight_bytes(teacher: ModelConfig, shape: Shape, stage: int) -> float:
    """The teacher's weights on a rank of student pipeline stage ``stage``.

    Shared layout: the same stage of the teacher. Own layout (``parallel.teacher``): a rank's teacher
    stage is not its student stage, so the largest teacher stage (the first holds the embedding, the
    last the output layer) at the teacher's TP, which over-counts by a vocabulary shard at most."""
    stages = {0, shape.teacher_pp - 1} if shape.own_teacher else {stage}
    params = max(stage_params(teacher, shape.teacher_tp, shape.teacher_pp, s) for s in stages)
    return params * _bytes(teacher.params_dtype)


def fp32_vocab_bytes(top_k: Optional[int], positions: int, vocab_shard: int, copies: int) -> int:
    """The fp32 ``[positions, V/tp]`` temporaries of a log-softmax over the vocabulary: ``copies`` of the
    whole for full-vocabulary targets (the exact path); one chunk of positions for top-k ones
    (``runtime.vocab_parallel``: the normaliser and the KL's gradient a chunk at a time,
    ``benchmarks/results/targets_memory.json``)."""
    if top_k is None:
        return copies * positions * vocab_shard * 4
    from nemo_opdlm.runtime.vocab_parallel import CHUNK_ROWS

    return min(positions, CHUNK_ROWS) * vocab_shard * 4


def _target_bytes(top_k: Optional[int], rows: int, shape: Shape, vocab_shard: int) -> int:
    """Teacher targets of ``rows`` rows: fp32 log-probs of a vocabulary shard, or top-k fp32 values + int64 ids."""
    return rows * shape.response * (vocab_shard * 4 if top_k is None else top_k * (4 + 8))


def held_targets(cfg, shape: Shape) -> tuple[str, int]:
    """(label, bytes) of the teacher targets alive on the student's last stage during its pass.

    How many: the route's (``RunConfig.teacher_route``, ``teacher.route.HELD``): one micro-batch's,
    or, computed before the pass, all of the rank's micro-batches'. Shared layout: in the teacher's
    vocabulary shard; own layout: re-cut to the student's vocabulary shard."""
    from nemo_opdlm.teacher.route import HELD

    k = cfg.distill.top_k
    model = cfg.model if shape.own_teacher else cfg.teacher
    rows, which = (shape.micro_batch, "one micro-batch")
    if HELD[cfg.teacher_route()] != "one micro-batch":
        rows, which = shape.rows_per_rank, f"all {shape.num_microbatches} micro-batches"
    kind = "full vocabulary (fp32)" if k is None else f"top-{k}"
    vocab = model.padded_vocab_size(shape.tp) // shape.tp
    return f"teacher targets, {kind} ({which})", _target_bytes(k, rows, shape, vocab)


def teacher_phase(cfg, shape: Shape, stage: int) -> dict[str, float]:
    """The teacher forward's memory on a rank of student stage ``stage``, besides the resident weights.

    One micro-batch at a time at the teacher's TP. Shared layout: logits and targets on the student's
    last stage only. Own layout: every rank may be a teacher last stage (exact at teacher PP=1), whose
    ranks keep the targets of one served student replica at a time (one micro-batch of it when they
    are exchanged per micro-batch, else its whole step) and a copy of them to send; the student's
    last stage receives them (:func:`held_targets`)."""
    teacher, t_tp, mb = cfg.teacher, shape.teacher_tp, shape.micro_batch
    t_tokens = mb * shape.teacher_row
    t_vocab = teacher.padded_vocab_size(t_tp) // t_tp
    out: dict[str, float] = {}
    if cfg.distill.teacher_offload:
        out["teacher weights (loaded for its forward)"] = teacher_weight_bytes(teacher, shape, stage)
    out["teacher forward (transient)"] = forward_transient_bytes(teacher, t_tp, t_tokens, shape.teacher_row)
    student_last = stage == shape.pp - 1
    if shape.own_teacher or student_last:
        out["teacher logits (transient)"] = (t_tokens * t_vocab * _bytes(teacher.params_dtype)
                                             + fp32_vocab_bytes(cfg.distill.top_k, mb * shape.response, t_vocab, 2))
    if shape.own_teacher:  # one served replica per round (teacher.exchange.exchange_targets)
        from nemo_opdlm.teacher.route import HELD

        per_mb = HELD[cfg.teacher_route()] == "one micro-batch"
        label = "one served micro-batch" if per_mb else "one served student replica"
        rows = shape.micro_batch if per_mb else shape.rows_per_rank
        out[f"teacher targets of {label} (+ send copy)"] = 2 * _target_bytes(cfg.distill.top_k, rows, shape, t_vocab)
    if student_last:
        label, held = held_targets(cfg, shape)
        out[label] = held
    return out


def estimate_stage(cfg, shape: Shape, stage: int, gpu: GpuSpec) -> MemoryEstimate:
    """Memory of one rank of pipeline stage ``stage`` during rollout, teacher forward and training.

    Assumptions (megatron-core training as ``training/optim.py`` sets it up):
    - student: bf16 weights, fp32 gradient buffer (``grad_reduce_in_fp32``), fp32 master weights +
      Adam m and v (12 bytes per parameter) sharded over DP with the distributed optimizer;
      TE FP8 adds a row- and a column-wise FP8 copy of the weights.
    - teacher: weights in its dtype on the GPU, except between its forwards with teacher_offload;
      at its own TP/PP with ``parallel.teacher`` (:func:`teacher_weight_bytes`).
    - rollout: all rows of the DP rank decode together; the block KV cache holds ``P + L`` columns per
      row for every layer of the stage; the prompt prefill runs in ``pp`` micro-batches.
    - teacher targets, shared layout: one micro-batch's at a time on the last stage: the teacher runs
      inside the loss with one stage and rides the student's pipeline pass with more
      (``teacher/stream.py``), so a micro-batch's targets live from its forward to its
      backward, which 1F1B runs back to back on the last stage (full vocabulary: fp32 log-probs of
      this rank's vocabulary shard; top-k: fp32 values + int64 ids).
    - teacher targets, own layout (``parallel.teacher``): the teacher runs on other groups and is
      exchanged with (``teacher/exchange.py``). With one student stage and padded rows, one
      micro-batch at a time inside the loss; otherwise (it cannot ride the student's pipeline) the
      targets of all of the rank's micro-batches are computed first and live through the whole pass
      on the last stage. The teacher side holds them for one student replica it serves at a time
      (:func:`teacher_phase`).
    - a teacher that runs inside the student's loss does so before the loss's fp32 temporaries and
      its own targets exist: per row its logits, ``(P + L) x V x 2 + L x V x 8`` bytes (the "teacher"
      column), plus the student's bf16 logits ``(P + 2L) x V x 2`` stay under the train column's
      ``4 (P + 2L) V + 12 L V`` when the teacher's vocabulary shard is no wider than the student's;
      only its small forward transient is not counted there.
    - training: rows of ``P + 2L`` tokens; 1F1B keeps ``pp - stage`` micro-batches in flight on a
      stage; full recompute keeps each layer's input and rebuilds one layer at a time; the last stage
      holds bf16 logits (and their gradient) for the whole row and fp32 log-softmax temporaries for xt.
    """
    student = cfg.model
    tp, pp, s = shape.tp, shape.pp, stage
    last = stage == pp - 1
    est = MemoryEstimate(stage=stage)
    # --- static
    p_s = stage_params(student, tp, pp, s)
    b_s = _bytes(student.params_dtype)
    shard = shape.dp if cfg.optim.distributed_optimizer else 1
    opt_bytes = (12 if b_s == 2 else 8) / shard
    est.static["student weights"] = p_s * b_s
    est.static["student grads (fp32)"] = p_s * 4
    est.static[f"optimizer (fp32 master + Adam m, v) / {shard}"] = p_s * opt_bytes
    if student.resolved_fp8(fp8_capable=gpu.fp8) is not None:  # fp8="auto" resolves by the GPU kind
        est.static["student FP8 weight copies"] = p_s * 2
    if not cfg.distill.teacher_offload:
        est.static["teacher weights"] = teacher_weight_bytes(cfg.teacher, shape, stage)
    est.static["CUDA context, NCCL, workspaces"] = gpu.overhead_gib * GIB
    # --- rollout
    n_layers = student.num_layers // pp
    cols = shape.prompt + shape.response
    rows = shape.rows_per_rank
    kv = rows * cols * n_layers * 2 * (student.num_query_groups // tp) * student.kv_channels * b_s
    prefill_rows = -(-rows // pp)
    rollout = {"rollout KV cache": kv,
               "rollout prefill (transient)": forward_transient_bytes(student, tp, prefill_rows * shape.prompt,
                                                                      shape.prompt)}
    vocab_shard = student.padded_vocab_size(tp) // tp
    if last:
        rollout["rollout logits (transient)"] = prefill_rows * cfg.diffusion.block_size * vocab_shard * 4
    est.phases["rollout"] = rollout
    est.phases["teacher"] = teacher_phase(cfg, shape, stage)
    # --- student forward/backward
    keys = shape.student_row
    tokens = shape.micro_batch * keys
    in_flight = pp - stage
    base, attn = layer_activation_bytes(student, tp, keys)
    layer_in = _bytes(student.params_dtype) * student.hidden_size
    est.activations = {
        "none": in_flight * n_layers * tokens * (base + attn),
        "selective": in_flight * n_layers * tokens * base + tokens * attn,
        "full": in_flight * n_layers * tokens * layer_in + tokens * (base + attn),
    }
    train = {f"student activations (recompute={student.recompute})": est.activations[student.recompute]}
    if last:
        xt_tokens = shape.micro_batch * shape.response
        train["student logits + loss"] = (tokens * vocab_shard * b_s * 2
                                          + fp32_vocab_bytes(cfg.distill.top_k, xt_tokens, vocab_shard, 3))
        label, held = held_targets(cfg, shape)
        train[label] = held
    est.phases["train"] = train
    return est


def estimate_memory(cfg, shape: Shape, cluster: Cluster) -> MemoryEstimate:
    """The heaviest pipeline stage's estimate (first stage: embedding + most in-flight micro-batches;
    last stage: output layer, logits and teacher targets)."""
    stages = sorted({0, shape.pp - 1})
    estimates = [estimate_stage(cfg, shape, s, cluster.spec) for s in stages]
    return max(estimates, key=lambda e: e.peak)


def usable_bytes(cluster: Cluster) -> float:
    return cluster.spec.memory_gib * GIB * (1 - RESERVE)


# ----------------------------------------------------------------------------------------------
# Remedies


@dataclass(frozen=True)
class Remedy:
    """One change to try: config overrides and/or a different cluster."""

    label: str
    overrides: tuple[str, ...] = ()
    nodes: Optional[int] = None


def _apply(cfg, remedy: Remedy, cluster: Cluster):
    from nemo_opdlm.config import RunConfig, apply_overrides, from_dict, to_dict

    new_cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), list(remedy.overrides))) if remedy.overrides else cfg
    new_cluster = dataclasses.replace(cluster, nodes=remedy.nodes) if remedy.nodes else cluster
    return new_cfg, new_cluster


TP_SIZES = (2, 4, 8, 16)
PP_SIZES = (2, 4, 8)
TEACHER_SHARE = 0.2
"""Share of a rank's peak the teacher's weights reach before the plan suggests splitting the teacher
alone further (``parallel.teacher.tp``)."""


def _next_size(current: int, sizes: Sequence[int]) -> Optional[int]:
    return next((n for n in sizes if n > current), None)


def candidate_remedies(cfg, cluster: Cluster) -> list[Remedy]:
    """Single changes that lower memory, in the order a user would reach for them."""
    out: list[Remedy] = []
    if cfg.model.recompute != "full":
        out.append(Remedy("activation recompute", ("model.recompute=full",)))
    if cfg.train.micro_batch_size > 1:
        out.append(Remedy("smaller micro-batch", ("train.micro_batch_size=1",)))
    if cfg.distill.top_k is None:
        out.append(Remedy("top-k KL (the paper's choice from 4B up)", ("distill.top_k=16",)))
    if not cfg.distill.teacher_offload:
        out.append(Remedy("teacher offload", ("distill.teacher_offload=true",)))
    if not cfg.optim.distributed_optimizer:
        out.append(Remedy("distributed optimizer", ("optim.distributed_optimizer=true",)))
    if (tp := _next_size(cfg.parallel.tp, TP_SIZES)) is not None:
        out.append(Remedy(f"more TP ({tp})", (f"parallel.tp={tp}",)))
    if (pp := _next_size(cfg.parallel.pp, PP_SIZES)) is not None:
        out.append(Remedy(f"more PP ({pp})", (f"parallel.pp={pp}",)))
    out += teacher_tp_remedy(cfg, cluster)
    out.append(Remedy(f"more nodes ({2 * cluster.nodes}: more DP, fewer rollouts per GPU)", (), 2 * cluster.nodes))
    return out


def teacher_tp_remedy(cfg, cluster: Cluster) -> list[Remedy]:
    """The teacher alone at a larger TP inside a node (``parallel.teacher``), when its weights are a
    large share of the peak: a big teacher then stops forcing the student's TP up, which would slow
    the student with TP communication it does not need. The smallest such TP that fits, else the
    largest; none when the teacher's weights are a small share or no larger TP is valid."""
    shape, _ = check_layout(cfg, cluster)
    est = estimate_memory(cfg, shape, cluster)
    if teacher_weight_bytes(cfg.teacher, shape, est.stage) < TEACHER_SHARE * est.peak:
        return []
    options = [Remedy(f"teacher at its own TP ({tp})",
                      (f"parallel.teacher.tp={tp}", f"parallel.teacher.pp={shape.teacher_pp}"))
               for tp in TP_SIZES if shape.teacher_tp < tp <= cluster.gpus_per_node]
    peaks = [(r, res[0]) for r in options if (res := try_remedy(cfg, cluster, r)) is not None]
    fitting = [r for r, peak in peaks if peak <= usable_bytes(cluster)]
    return fitting[:1] or [r for r, _ in peaks[-1:]]


def try_remedy(cfg, cluster: Cluster, remedy: Remedy) -> Optional[tuple[float, Any, Cluster]]:
    """(peak bytes, config, cluster) after the change, or None if the change itself is invalid."""
    try:
        new_cfg, new_cluster = _apply(cfg, remedy, cluster)
        shape, _ = check_layout(new_cfg, new_cluster)
    except OPDLMError:
        return None
    return estimate_memory(new_cfg, shape, new_cluster).peak, new_cfg, new_cluster


def suggest(cfg, cluster: Cluster, max_steps: int = 3) -> tuple[list[tuple[Remedy, float]], list[Remedy]]:
    """Each valid single change with its peak, and a greedy combination that fits (empty if none does)."""
    limit = usable_bytes(cluster)
    singles = []
    for remedy in candidate_remedies(cfg, cluster):
        result = try_remedy(cfg, cluster, remedy)
        if result is not None:
            singles.append((remedy, result[0]))
    combo: list[Remedy] = []
    cur_cfg, cur_cluster = cfg, cluster
    for _ in range(max_steps):
        options = [(r, res) for r in candidate_remedies(cur_cfg, cur_cluster)
                   if (res := try_remedy(cur_cfg, cur_cluster, r)) is not None]
        if not options:
            break
        remedy, (peak, cur_cfg, cur_cluster) = min(options, key=lambda o: o[1][0])
        combo.append(remedy)
        if peak <= limit:
            return singles, combo
    return singles, []


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class PlanReport:
    """Everything ``opdlm plan`` found."""

    spec: str
    cluster: Cluster
    shape: Shape
    findings: list[Finding]
    memory: MemoryEstimate
    cfg: Any

    @property
    def fits(self) -> bool:
        return self.memory.peak <= usable_bytes(self.cluster)

    @property
    def ok(self) -> bool:
        return self.fits and not any(f.level == "error" for f in self.findings)


def make_plan(cfg, cluster: Cluster, spec: str = "", require_paths: bool = False) -> PlanReport:
    """Run every check on a resolved config (raises ConfigError for a broken layout)."""
    if cluster.gpu not in GPUS:
        raise ConfigError(f"unknown GPU kind {cluster.gpu!r}; choose one of {sorted(GPUS)}")
    shape, findings = check_layout(cfg, cluster)
    findings += check_checkpoints(cfg, require_paths)
    memory = estimate_memory(cfg, shape, cluster)
    return PlanReport(spec=spec, cluster=cluster, shape=shape, findings=findings, memory=memory, cfg=cfg)


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def format_report(rep: PlanReport, with_suggestions: bool = True) -> str:
    cfg, sh, cl, mem = rep.cfg, rep.shape, rep.cluster, rep.memory
    lines = [
        f"opdlm plan: {rep.spec or cfg.name} on {cl.nodes} node(s) x {cl.gpus_per_node} GPUs "
        f"({cl.gpu}: {cl.spec.name}, {cl.spec.memory_gib:.1f} GiB)",
        f"  student {_describe(cfg.model)}",
        f"  teacher {_describe(cfg.teacher)}{'  (offloaded between forwards)' if cfg.distill.teacher_offload else ''}",
        f"  layout  {_layout(sh)}; {sh.rows_per_rank} rollouts per DP rank per step, "
        f"micro-batch {sh.micro_batch} -> {sh.num_microbatches} micro-batches",
        f"  rows    prompt {sh.prompt} + response {sh.response}: student {sh.student_row} tokens "
        f"[prompt|x0|xt], teacher {sh.teacher_row}; attention {cfg.model.resolved_attention_backend(on_gpu=True)}; "
        f"KL {'full vocabulary' if cfg.distill.top_k is None else f'top-{cfg.distill.top_k}'}",
        "checks:",
    ]
    lines += [f"  {f.level:<5} {f.text}" for f in rep.findings]
    phases = list(mem.phases)
    stage = f"pipeline stage {mem.stage} of {sh.pp}" if sh.pp > 1 else "one pipeline stage"
    lines.append(f"memory per GPU, GiB ({stage}; the heaviest):")
    components = list(dict.fromkeys(c for p in phases for c in mem.phases[p]))
    width = max(58, *(len(name) + 1 for name in [*mem.static, *components]))
    lines.append(f"  {'component':<{width}}" + "".join(f"{p:>9}" for p in phases))
    for name, value in mem.static.items():
        lines.append(f"  {name:<{width}}" + "".join(f"{_gib(value):>9}" for _ in phases))
    for comp in components:
        cells = [_gib(mem.phases[p][comp]) if comp in mem.phases[p] else f"{'-':>7}" for p in phases]
        lines.append(f"  {comp:<{width}}" + "".join(f"{c:>9}" for c in cells))
    lines.append(f"  {'total':<{width}}" + "".join(f"{_gib(mem.phase_total(p)):>9}" for p in phases))
    acts = ", ".join(f"{k} {mem.activations[k] / GIB:.2f}" for k in ("none", "selective", "full"))
    lines.append(f"  student activations by recompute mode (GiB): {acts}")
    limit = usable_bytes(cl)
    verdict = "fits" if rep.fits else "DOES NOT FIT"
    lines.append(f"peak {mem.peak / GIB:.2f} GiB ({mem.peak_phase}) vs {limit / GIB:.2f} GiB usable "
                 f"({100 * (1 - RESERVE):.0f}% of {cl.spec.memory_gib:.1f}): {verdict}")
    if not rep.fits and with_suggestions:
        singles, combo = suggest(cfg, cl)
        lines.append("what to change (estimated peak after each single change):")
        for remedy, peak in sorted(singles, key=lambda x: x[1]):
            mark = "fits" if peak <= limit else "still too large"
            how = " ".join(remedy.overrides) or f"--nodes {remedy.nodes}"
            lines.append(f"  {remedy.label:<55} {how:<44} {peak / GIB:7.2f} GiB  {mark}")
        if combo:
            how = " ".join(o for r in combo for o in r.overrides)
            nodes = [r.nodes for r in combo if r.nodes]
            lines.append(f"  combined: {' + '.join(r.label for r in combo)}: {how}"
                         + (f" --nodes {nodes[-1]}" if nodes else ""))
        elif not any(p <= limit for _, p in singles):
            lines.append("  no combination of these fits: use a GPU with more memory (--gpu h200) or more GPUs")
    errors = [f for f in rep.findings if f.level == "error"]
    if errors:
        lines.append(f"refused: {len(errors)} check(s) failed (see 'error' above)")
    elif not rep.fits:
        lines.append("refused: the plan does not fit in GPU memory")
    else:
        lines.append("ok")
    return "\n".join(lines)


def _describe(m: ModelConfig) -> str:
    n = stage_params(m, 1, 1, 0) / 1e9
    extras = [m.params_dtype, f"recompute={m.recompute}"] + ([f"fp8={m.fp8}"] if m.fp8 else [])
    return (f"{m.family} {n:.2f}B: {m.num_layers} layers x {m.hidden_size}, FFN {m.ffn_hidden_size}, "
            f"{m.num_attention_heads}/{m.num_query_groups} heads of {m.kv_channels}, vocab {m.vocab_size} "
            f"({', '.join(extras)})")


# ----------------------------------------------------------------------------------------------
# CLI


def recipe_cluster(spec: str) -> Optional[Cluster]:
    """The cluster a recipe function was registered for (``@recipe``), or None (YAML, unregistered)."""
    if spec.endswith((".yaml", ".yml")):
        return None
    try:
        from nemo_opdlm.recipes.base import CLUSTERS
    except ImportError:
        return None
    shape = CLUSTERS.get(spec.replace(":", ".").rpartition(".")[2])
    return None if shape is None else Cluster(shape.nodes, shape.gpus_per_node, shape.gpu)


def _get(cfg, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if node is None:  # under an unset section (parallel.teacher.tp with the shared layout): unset too
            return None
        if part == "teacher" and node is cfg:
            node = cfg.teacher
            continue
        if not hasattr(node, part):
            raise ConfigError(f"--get {key}: no field {part!r}")
        node = getattr(node, part)
    return node


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opdlm plan", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe (module:function, a bare recipe name, or a YAML file)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="a partial YAML config merged on top of the recipe before the overrides (repeatable)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None, help="GPU kind (default: the recipe's)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the recipe's)")
    p.add_argument("--require-paths", action="store_true",
                   help="refuse when checkpoints or data are missing here (run inside the job)")
    p.add_argument("--get", action="append", default=[], metavar="KEY",
                   help="print a resolved config value (e.g. parallel.tp) and exit; repeatable")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    return p.parse_intermixed_args(argv)


def plan_main(argv: Optional[Sequence[str]] = None) -> int:
    """``opdlm plan``: 0 if the plan is valid and fits, 1 if refused, 2 if the config itself is invalid."""
    args = parse_args(argv)
    from nemo_opdlm.recipes.lookup import resolve

    try:
        cfg = resolve(args.recipe, list(args.overrides), args.config)
        if args.get:
            for key in args.get:
                value = _get(cfg, key)
                print("" if value is None else value)
            return 0
        default = recipe_cluster(args.recipe) or Cluster(1, 8, "h100-80g")
        cluster = Cluster(nodes=args.nodes or default.nodes, gpus_per_node=args.gpus_per_node or default.gpus_per_node,
                          gpu=args.gpu or default.gpu)
        rep = make_plan(cfg, cluster, spec=args.recipe, require_paths=args.require_paths)
    except OPDLMError as err:
        print(f"opdlm plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"recipe": args.recipe, "cluster": dataclasses.asdict(cluster),
                          "shape": dataclasses.asdict(rep.shape), "stage": rep.memory.stage,
                          "static": rep.memory.static, "phases": rep.memory.phases,
                          "activations": rep.memory.activations, "peak_bytes": rep.memory.peak,
                          "usable_bytes": usable_bytes(cluster), "fits": rep.fits, "ok": rep.ok,
                          "findings": [dataclasses.asdict(f) for f in rep.findings]}, indent=2))
    else:
        print(format_report(rep))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(plan_main())
