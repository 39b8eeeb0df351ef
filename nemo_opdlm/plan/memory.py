"""The memory of one training step per GPU, as closed forms of the config and the layout.

One job: bytes per component and phase (rollout, teacher, train) on the heaviest pipeline stage,
under the assumptions :func:`estimate_stage` lists (what megatron-core and this package
allocate). ``measure.py`` runs the real step under fake tensors to check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from nemo_opdlm.plan.layout import GIB, Cluster, GpuSpec, Shape

if TYPE_CHECKING:  # annotations only: models.config imports torch
    from nemo_opdlm.models.config import ModelConfig


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


def fp32_vocab_bytes(positions: int, vocab_shard: int) -> int:
    """One chunk of fp32 ``[positions, V/tp]`` temporaries: the log-normaliser, the full-vocabulary
    log-probs and both KLs (forward and backward) work a chunk of positions at a time
    (``runtime.vocab_parallel``, ``benchmarks/results/targets_memory.json``)."""
    from nemo_opdlm.runtime.vocab_parallel import CHUNK_ROWS

    return min(positions, CHUNK_ROWS) * vocab_shard * 4


def logit_columns(shape: Shape) -> int:
    """Columns of a micro-batch whose logits the output layer computes: ``L + 1`` per row (the
    student's xt and the column before it, ``masks.logits_needed``; the teacher's last ``L + 1``
    of ``[prompt | x0]``), never the whole row."""
    return shape.micro_batch * (shape.response + 1)


def student_loss_bytes(top_k: Optional[int], shape: Shape, vocab_shard: int) -> int:
    """The student's logits and its KL on the last stage, through backward: the logits in fp32
    (megatron-core's ``Float16Module`` upcasts the last stage's output), at the loss positions
    (at most ``L`` per row) a gathered fp32 copy and its gradient, the teacher's log-probs gathered
    there (full vocabulary), and one chunk of the KL's temporaries."""
    positions = shape.micro_batch * shape.response
    gathered = (2 if top_k is not None else 3) * positions * vocab_shard * 4
    return logit_columns(shape) * vocab_shard * 4 + gathered + fp32_vocab_bytes(positions, vocab_shard)


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
    model = cfg.model if shape.own_teacher else cfg.teacher_built
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
    teacher, t_tp, mb = cfg.teacher_built, shape.teacher_tp, shape.micro_batch
    t_tokens = mb * shape.teacher_row
    t_vocab = teacher.padded_vocab_size(t_tp) // t_tp
    out: dict[str, float] = {}
    if cfg.distill.teacher_offload:
        out["teacher weights (loaded for its forward)"] = teacher_weight_bytes(teacher, shape, stage)
    out["teacher forward (transient)"] = forward_transient_bytes(teacher, t_tp, t_tokens, shape.teacher_row)
    student_last = stage == shape.pp - 1
    if shape.own_teacher or student_last:
        out["teacher logits (transient)"] = (logit_columns(shape) * t_vocab * _bytes(teacher.params_dtype)
                                             + fp32_vocab_bytes(mb * shape.response, t_vocab))
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
    - a teacher that runs inside the student's loss does so after the student's forward and before
      the loss's gathered copies exist: its ``L + 1`` columns of logits in its dtype and one chunk (the
      "teacher" column) stay under the train column's gathered copies when the teacher's
      vocabulary shard is no wider than the student's; only its small forward transient is not
      counted there.
    - optimizer: torch's AdamW (megatron-core falls back to it without apex or Transformer Engine)
      steps with foreach kernels on a GPU, whose ``sqrt(v)`` is a new fp32 tensor as large as the
      rank's shard of the parameters.
    - training: rows of ``P + 2L`` tokens; 1F1B keeps ``pp - stage`` micro-batches in flight on a
      stage; full recompute keeps each layer's input and rebuilds one layer at a time; the last stage
      holds the logits of ``L + 1`` columns in fp32 and the KL's gathered copies
      (:func:`student_loss_bytes`).
    Checked against the real step under fake tensors (``measure.py``, ``opdlm plan --measure``;
    ``benchmarks/results/memory_measured.md``).
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
        est.static["teacher weights"] = teacher_weight_bytes(cfg.teacher_built, shape, stage)
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
        train["student logits + loss"] = student_loss_bytes(cfg.distill.top_k, shape, vocab_shard)
        label, held = held_targets(cfg, shape)
        train[label] = held
    est.phases["train"] = train
    # torch's AdamW (megatron-core's optimizer without apex or Transformer Engine) steps with foreach
    # kernels on a GPU: sqrt(v) of the whole fp32 shard is one new tensor list
    est.phases["optimizer"] = {f"Adam update temporary (fp32 shard / {shard})": p_s * 4 / shard}
    return est


def estimate_memory(cfg, shape: Shape, cluster: Cluster) -> MemoryEstimate:
    """The heaviest pipeline stage's estimate (first stage: embedding + most in-flight micro-batches;
    last stage: output layer, logits and teacher targets)."""
    stages = sorted({0, shape.pp - 1})
    estimates = [estimate_stage(cfg, shape, s, cluster.spec) for s in stages]
    return max(estimates, key=lambda e: e.peak)
