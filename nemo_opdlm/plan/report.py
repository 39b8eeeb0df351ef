"""Every check of a plan as one report, and its text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.plan.checks import check_checkpoints
from nemo_opdlm.plan.layout import GIB, GPUS, RESERVE, Cluster, Finding, Shape, _layout, check_layout, usable_bytes
from nemo_opdlm.plan.memory import MemoryEstimate, estimate_memory, stage_params
from nemo_opdlm.plan.remedies import suggest

if TYPE_CHECKING:  # annotations only: models.config imports torch
    from nemo_opdlm.models.config import ModelConfig


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
