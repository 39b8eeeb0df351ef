"""The OPDLM training loop: rollout -> states -> teacher -> fwd/bwd -> optimizer; nothing else.

One job: run steps in order, checkpoint, and stop cleanly. Each step derives every random stream
from (seed, step, rank), so a resumed run repeats exactly what an uninterrupted one would have
done. Pre-emption (SIGTERM / SIGUSR1, as Slurm sends before a time limit) saves a checkpoint at
the end of the current step and returns; a non-finite loss, teacher target or gradient norm skips
the step's update and, too many in a row, stops the run with an error (``finite.py``, which also
keeps non-finite weights out of every checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from nemo_opdlm.checkpoint import run_dir
from nemo_opdlm.checkpoint.manifest import damage
from nemo_opdlm.config import RunConfig, to_dict
from nemo_opdlm.data.sampler import PromptLoader
from nemo_opdlm.distill.packing import real_tokens
from nemo_opdlm.errors import NonFiniteLossError, OPDLMError  # noqa: F401  (NonFiniteLossError: re-exported)
from nemo_opdlm.models.teacher import resident
from nemo_opdlm.rollout.schedules import LengthCurriculum
from nemo_opdlm.runtime.collective_errors import as_collective_error
from nemo_opdlm.runtime.comm import agree, is_rank0
from nemo_opdlm.runtime.context import ParallelContext
from nemo_opdlm.runtime.device import peak_gib_since_last_call
from nemo_opdlm.runtime.distributed import init_runtime, shutdown_runtime
from nemo_opdlm.runtime.orphans import ParentWatch
from nemo_opdlm.runtime.preemption import Preemption
from nemo_opdlm.runtime.seeding import seed_everything, step_seed
from nemo_opdlm.training import checkpoint, run_config
from nemo_opdlm.training.finite import NonFiniteSteps, agreed_problem, step_problem
from nemo_opdlm.training.metrics import MetricsLogger, describe_run, run_summary
from nemo_opdlm.training.optim import TrainState, optimizer_step, wrap_for_training
from nemo_opdlm.training.setup import Setup, build
from nemo_opdlm.training.step import forward_backward, reduce_reported, student_schedule


@dataclass
class Where:
    """Where the run is (``"step 4 (checkpoint save)"``): what a failed collective's message names."""

    label: str = "setup (building the models, resuming)"


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` in this process (one rank of a torchrun/srun job). Returns a summary.

    A torchrun worker dies with its launcher (``runtime/orphans.py``). A collective that times out
    (a stopped or hung rank) or loses a rank that exited is raised as one-line CollectiveError naming
    where and whom (``runtime/collective_errors.py``)."""
    parent = ParentWatch.start()
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed,
                      models=(("model", cfg.model), ("teacher_model", cfg.teacher)))
    where = Where()
    try:
        return _train(cfg, rt.ctx, rt.teacher_ctx, parent, where)
    except BaseException as err:  # a checkpoint save wraps a rank's failure in a BaseException
        if isinstance(err, (OPDLMError, KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        failure = as_collective_error(err, where.label, cfg.parallel.timeout_minutes)
        if failure is None:
            raise
        raise failure from err
    finally:
        shutdown_runtime()


def _note(message: str) -> None:
    if is_rank0():
        print(f"[opdlm] {message}", flush=True)


def _train(cfg: RunConfig, parallel: ParallelContext, teacher_parallel: ParallelContext, parent: ParentWatch,
           where: Where) -> dict[str, Any]:
    lock, resume_from = None, None
    if cfg.train.save_dir:  # one writer per run directory; decided before the models load
        lock, resume_from = run_dir.open_run(cfg.train.save_dir, resume=cfg.train.resume,
                                             overwrite=cfg.train.overwrite, latest=checkpoint.LATEST,
                                             note=_note, damage=damage)
    try:
        if resume_from:  # a different model is refused here, before anything loads
            check = run_config.check_resume(resume_from, cfg)
            if check.changed:
                _note(f"resuming with a config that differs from {check.source}: {'; '.join(check.changed)}. "
                      "This run's config wins for each (optim.* and train.steps: the LR schedule is rebuilt "
                      "from it at the checkpoint's update count)")
        return _run(cfg, parallel, teacher_parallel, resume_from, parent, where)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, parallel: ParallelContext, teacher_parallel: ParallelContext,
         resume_from: Optional[str], parent: ParentWatch, where: Where) -> dict[str, Any]:
    t_build = time.perf_counter()
    _note(describe_run(cfg, parallel.tp_size, parallel.pp_size, parallel.dp_size))
    s = build(cfg, parallel, teacher_parallel, resume_from)
    state = wrap_for_training(s.student, cfg.model, cfg.optim, cfg.train.steps)
    log = MetricsLogger(enabled=parallel.is_logging_rank, total_steps=cfg.train.steps, out_dir=cfg.train.save_dir,
                        tensorboard_dir=cfg.train.tensorboard_dir, wandb_project=cfg.train.wandb_project,
                        run_name=cfg.name, config=to_dict(cfg))
    start = _resume(resume_from, state, s.loader, log) if resume_from else 0
    if cfg.train.save_dir and is_rank0():  # once the run is accepted: a refused one leaves the record as it was
        run_config.write(cfg.train.save_dir, cfg)  # the config this run uses (each step_N/ keeps its own)
    curriculum = LengthCurriculum(min_length=cfg.rollout.min_length, max_length=cfg.rollout.max_length,
                                  warmup_steps=cfg.rollout.curriculum_steps, shape=cfg.rollout.curriculum,
                                  block_size=student_schedule(cfg).block_size)
    history: list[dict[str, float]] = []
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_in_row, log.note)
    step, status = start, "completed"

    saved: list[str] = []

    def save(at: int) -> None:
        if cfg.train.save_dir:
            parent.check(f"before saving step {at}")
            where.label = f"step {at} (checkpoint save)"
            t = time.perf_counter()
            saved.append(checkpoint.save(cfg.train.save_dir, at, state, extra={"data": s.loader.state_dict()},
                                         model=cfg.model, diffusion=cfg.diffusion, hf_config=s.hf_config,
                                         assets_dir=s.tokenizer_dir, run_config=cfg))
            log.note(f"saved checkpoint {saved[-1]} ({time.perf_counter() - t:.1f} s)")

    log.note(f"built in {time.perf_counter() - t_build:.1f} s ({len(s.loader.prompts)} prompts); step {start + 1} "
             f"of {cfg.train.steps} starts: rollouts up to {curriculum.length(start)} tokens for "
             f"{cfg.train.prompts_per_step} prompts (the first step also compiles and warms up)")
    t_loop = time.perf_counter()
    with Preemption() as preempt:
        for step in range(start + 1, cfg.train.steps + 1):
            parent.check(f"before step {step}")
            scalars = _train_step(cfg, s, state, step, curriculum.length(step - 1), nonfinite, parallel, where)
            history.append(dict(step=step, **scalars))
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                parent.check(f"before logging step {step}")
                log.log(step, scalars)
            where.label = f"step {step} (pre-emption check)"
            stop = agree(preempt.seen)
            exit_now = bool(cfg.train.exit_interval) and step % cfg.train.exit_interval == 0 and step < cfg.train.steps
            if (stop or exit_now or step == cfg.train.steps
                    or (cfg.train.save_every and step % cfg.train.save_every == 0)):
                save(step)
                stop = stop or agree(preempt.seen)  # signalled during this save: it is the checkpoint
            if stop and step < cfg.train.steps:
                status = "preempted"
                log.note(f"pre-emption signal: checkpoint saved at step {step}, exiting")
                break
            if exit_now:
                status = "exited"
                log.note(f"train.exit_interval={cfg.train.exit_interval}: checkpoint saved at step {step}, exiting "
                         f"(start the run again to resume towards step {cfg.train.steps})")
                break
    log.note(run_summary(status, start, step, cfg.train.steps, history, time.perf_counter() - t_loop,
                         saved[-1] if saved else None, cfg.train.save_dir))
    log.close()
    return {"status": status, "step": step, "history": history}


def _train_step(cfg: RunConfig, s: Setup, state: TrainState, step: int, length: int, nonfinite: NonFiniteSteps,
                parallel: ParallelContext, where: Where) -> dict[str, float]:
    """One step: rollouts of up to ``length`` tokens, teacher targets, forward/backward, the update
    (skipped when not finite); returns the step's scalars (``where`` names the phase for a
    collective's timeout)."""
    where.label = f"step {step} (rollout, teacher targets, forward/backward)"
    t0 = time.perf_counter()
    seed = step_seed(cfg.train.seed, step)
    seed_everything(seed, parallel)
    batch = s.loader.next_batch()
    with resident(s.teacher, cfg.distill.teacher_offload):
        out = forward_backward(cfg, batch, state, s.teacher, s.eos_ids, s.pad_id, seed=seed, length=length)
    t1 = time.perf_counter() - out.seconds["student_fwd_bwd_s"]
    where.label = f"step {step} (metrics all-reduce, optimizer step)"
    metrics = reduce_reported(out.reported, parallel.dp_group)
    lr = float(state.optimizer.param_groups[0]["lr"])  # this step's (the scheduler moves it on after)
    grad_norm = _update(state, metrics, step, nonfinite)
    t_train = time.perf_counter() - t1
    peaks = dict(out.peak_gib, optimizer=peak_gib_since_last_call())
    scalars = _scalars(metrics, out.responses.rollout_metrics, out.rows, length, grad_norm, lr, out.seconds["rollout_s"],
                       t_train, time.perf_counter() - t0, parallel.dp_size)
    scalars.update({f"memory/{phase}_peak_gib": gib for phase, gib in peaks.items() if gib is not None})
    return scalars


def _resume(resume_from: str, state: TrainState, loader: PromptLoader, log: MetricsLogger) -> int:
    """Load the checkpoint ``resume_from`` into the state and the data cursor; the step it was at."""
    common = checkpoint.load(resume_from, state)
    loader.load_state_dict(common["data"])
    start = int(common["step"])
    log.note(f"resumed from {resume_from} at step {start}")
    if common["schedule_changes"]:
        changed = "; ".join(common["schedule_changes"])
        log.note(f"the config's optimizer settings differ from the checkpoint's ({changed}): the config "
                 f"wins, its schedule continues from update {state.scheduler.num_steps}")
    return start


def _update(state: TrainState, metrics: dict[str, float], step: int, nonfinite: NonFiniteSteps) -> float:
    """The optimizer step unless this step's loss, targets (on any rank) or gradient norm are not
    finite; the gradient norm (NaN when skipped before it). Raises after
    ``train.max_nonfinite_in_row`` skipped steps in a row."""
    problem = agreed_problem(step_problem(metrics), "a non-finite loss or teacher target on another rank")
    grad_norm = float("nan")
    if problem is None:
        update = optimizer_step(state)
        grad_norm = update.grad_norm
        if not update.applied and not update.overflow:
            problem = f"non-finite gradient norm ({grad_norm})"
    nonfinite.record(step, problem)
    return grad_norm


def _scalars(metrics: dict[str, float], rollout: dict[str, float], rows: dict, length: int, grad_norm: float,
             lr: float, t_rollout: float, t_train: float, t_step: float, dp: int) -> dict[str, float]:
    out: dict[str, float] = {}
    if metrics:
        tokens = max(metrics.get("num_tokens", 0.0), 1.0)
        out["loss"] = metrics["loss"]
        for name in ("kl", "ce"):
            if f"{name}_sum" in metrics:
                out[name] = metrics[f"{name}_sum"] / tokens  # per-token mean (the loss is per-sequence)
        out["train/loss_tokens"] = metrics.get("num_tokens", 0.0)
        out["train/sequences"] = metrics.get("num_sequences", 0.0)
    for k, v in rollout.items():
        out[f"rollout/{k}"] = float(v)
    trained = float(rows["input_ids"].numel()) * dp  # the rows padded to the longest (as before packing)
    useful = float(real_tokens(rows["meta"])) * dp  # their real tokens: what packing keeps
    out.update({
        "rollout/length_limit": float(length), "grad_norm": grad_norm,
        "lr": lr, "time/rollout_s": t_rollout, "time/train_s": t_train,
        "time/step_s": t_step, "throughput/tokens_per_s": trained / max(t_step, 1e-9),
        "throughput/useful_tokens_per_s": useful / max(t_step, 1e-9),
    })
    return out
