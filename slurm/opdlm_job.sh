# shellcheck shell=bash
# The body shared by slurm/convert_*.sh (sourced, not submitted): plan, import, train, requeue.
#
# One job: run one OPDLM conversion inside a Slurm allocation (or, with --dry-run, only check it):
#   1. `opdlm plan` on the batch host: the recipe, its overrides and this allocation, before any GPU
#      work (a typo fails here in seconds, not after hours in the queue);
#   2. on the first run only, import the HF teacher into a megatron checkpoint (tools/import_hf.py),
#      written all-or-nothing, so a pre-empted import is simply redone;
#   3. train with one task per GPU (srun; rank, world and master come from Slurm's variables) or one
#      torchrun per node (nemo_opdlm.runtime.torchrun: torchrun that forwards a pre-emption to its
#      workers instead of killing them); the trainer resumes from <run dir>/checkpoints/latest by itself;
#   4. on USR1 (sent by `--signal=B:USR1@...` before the time limit) or TERM (pre-emption): forward
#      the signal to the training step, which checkpoints at the end of its step and exits, then
#      `scontrol requeue` the job unless training is finished.
#
# Knobs (environment variables; every one is optional unless the recipe's paths do not exist):
#   RECIPE           recipe (module:function, bare name, or a YAML file such as recipes/NAME.yaml); set by the calling script
#   TEACHER_HF       HF directory of the teacher (default: the recipe's init.teacher_hf)
#   STUDENT_HF       HF directory of the student's initial weights (default: the recipe's)
#   DATA             prompt file or dataset (default: the recipe's data.path)
#   RUN_DIR          run directory: checkpoints/, logs/, teacher_mcore/ (default: runs/<recipe>)
#   TEACHER_CKPT     where the imported teacher goes (default: $RUN_DIR/teacher_mcore)
#   IMPORT_TEACHER   1 (default): import the HF teacher once and train from the import; 0: read HF directly
#   OVERRIDES        extra key=value overrides (space separated); arguments to the script are added too
#   LAUNCHER         srun (default: one task per GPU) or torchrun (one srun task per node)
#   GPU_KIND         GPU kind for the memory plan: h100-80g (default), h200, a100-80g, a100-40g, cpu
#   PYTHON           interpreter inside the job (default: python)
#   CONTAINER_IMAGE  run every step in this image with pyxis (--container-image); unset: no container
#   CONTAINER_MOUNTS pyxis mounts (default: the repository and the run directory at the same paths)
#   MAX_RESTARTS     stop requeueing after this many restarts (default 20)
#   MASTER_PORT      rendezvous port (default: derived from the job id)
#   REPO             the repository (default: the submit directory)

set -euo pipefail

log() { printf '[opdlm %(%F %T)T] %s\n' -1 "$*"; }
die() { log "error: $*" >&2; exit 1; }

opdlm_job_main() {
  local dry_run=0
  if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
  [[ -n "${RECIPE:-}" ]] || die "RECIPE is not set"
  [[ -f "$REPO/nemo_opdlm/plan/cli.py" ]] || die "REPO=$REPO is not the opdlm repository (submit from its root or set REPO)"
  cd "$REPO"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  PYTHON=${PYTHON:-python}
  GPU_KIND=${GPU_KIND:-h100-80g}
  LAUNCHER=${LAUNCHER:-srun}
  IMPORT_TEACHER=${IMPORT_TEACHER:-1}
  MAX_RESTARTS=${MAX_RESTARTS:-20}
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${NODES:-1}}}
  local gpn=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-8}}}
  gpn=${gpn%%(*}  # "8(x2)" -> 8
  local name=${RECIPE##*/}
  name=${name%.y*ml}
  name=${name##*[:.]}  # module:function -> function; configs/x.yaml -> x
  RUN_DIR=${RUN_DIR:-$REPO/runs/$name}
  TEACHER_CKPT=${TEACHER_CKPT:-$RUN_DIR/teacher_mcore}

  # --- what the recipe says (also validates it: a broken recipe stops here)
  local -a common=(train.save_dir="$RUN_DIR/checkpoints") teacher_src=()
  if [[ -n "${DATA:-}" ]]; then common+=(data.path="$DATA"); fi
  if [[ -n "${STUDENT_HF:-}" ]]; then common+=(init.student_hf="$STUDENT_HF"); fi
  if [[ -n "${TEACHER_HF:-}" ]]; then teacher_src=(init.teacher_hf="$TEACHER_HF"); fi
  local -a base=("${common[@]}" "${teacher_src[@]}")
  local -a extra=()
  if [[ -n "${OVERRIDES:-}" ]]; then read -r -a extra <<<"$OVERRIDES"; fi
  extra+=("$@")
  local -a values
  mapfile -t values < <("$PYTHON" -m nemo_opdlm.plan "$RECIPE" "${base[@]}" "${extra[@]}" \
    --get parallel.tp --get parallel.pp --get train.steps --get init.teacher_hf --get init.teacher_checkpoint \
    --get init.tokenizer --get parallel.teacher.tp --get parallel.teacher.pp) || true
  [[ ${#values[@]} -eq 8 ]] || die "the recipe $RECIPE with these overrides is invalid (see the error above)"
  local tp=${values[0]} pp=${values[1]} steps=${values[2]} teacher_hf=${values[3]} teacher_ckpt_cfg=${values[4]}
  local tokenizer=${values[5]}
  # the teacher is imported at the layout it runs at: its own (parallel.teacher), else the student's
  local teacher_tp=${values[6]:-$tp} teacher_pp=${values[7]:-$pp}

  # the import's overrides come last: they must win over an init.teacher_hf given as an argument
  local -a train_overrides=("${common[@]}")
  local do_import=0
  if [[ "$IMPORT_TEACHER" == 1 && -n "$teacher_hf" && -z "$teacher_ckpt_cfg" ]]; then
    do_import=1
    train_overrides+=("${extra[@]}" init.teacher_hf=null init.teacher_checkpoint="$TEACHER_CKPT"
                      init.tokenizer="${tokenizer:-$teacher_hf}")
  else
    train_overrides+=("${teacher_src[@]}" "${extra[@]}")
  fi
  local -a plan=("$PYTHON" -m nemo_opdlm.plan "$RECIPE" "${base[@]}" "${extra[@]}" --nodes "$nodes"
                 --gpus-per-node "$gpn" --gpu "$GPU_KIND")

  if [[ $dry_run == 1 || -z "${SLURM_JOB_ID:-}" ]]; then
    [[ $dry_run == 1 ]] || log "not inside a Slurm job: running the plan only (submit with sbatch)"
    "${plan[@]}"
    return
  fi

  local restart=${SLURM_RESTART_COUNT:-0}
  local log_dir="$RUN_DIR/logs"
  mkdir -p "$log_dir" "$(dirname "$TEACHER_CKPT")"
  local job_log="$log_dir/${SLURM_JOB_ID}-restart${restart}.log"
  log "job $SLURM_JOB_ID (restart $restart): $RECIPE on $nodes node(s) x $gpn GPUs, tp=$tp pp=$pp; log $job_log"
  if ! "${plan[@]}" --require-paths 2>&1 | tee -a "$job_log"; then
    die "opdlm plan refused $RECIPE (see above); nothing was started"
  fi

  # --- launcher
  local port_base=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
  local -a srun_flags=(--kill-on-bad-exit=1)
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_flags+=(--container-image="$CONTAINER_IMAGE"
                 --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO,$RUN_DIR:$RUN_DIR}"
                 --container-workdir="$REPO")
  fi

  # --- import the teacher once
  if [[ $do_import == 1 ]]; then
    if [[ -f "$TEACHER_CKPT/opdlm_convert.json" ]]; then
      log "teacher already imported at $TEACHER_CKPT"
    else
      local n_import=$((teacher_tp * teacher_pp))
      log "importing $teacher_hf -> $TEACHER_CKPT on $n_import task(s)"
      if ! MASTER_PORT=$port_base srun "${srun_flags[@]}" --ntasks="$n_import" \
          --nodes="$(((n_import + gpn - 1) / gpn))" --ntasks-per-node="$((n_import < gpn ? n_import : gpn))" \
          "$PYTHON" tools/import_hf.py --hf-dir "$teacher_hf" --out "$TEACHER_CKPT" \
          --tp "$teacher_tp" --pp "$teacher_pp" \
          2>&1 | tee -a "$job_log"; then
        die "teacher import failed (see $job_log)"
      fi
    fi
  fi

  # --- train, forwarding pre-emption signals
  local save_dir="$RUN_DIR/checkpoints"
  if [[ -f "$save_dir/latest" ]]; then log "resuming from $save_dir/$(cat "$save_dir/latest")"; fi
  local -a cmd
  local forward_signal
  if [[ "$LAUNCHER" == torchrun ]]; then
    local master
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
    cmd=(srun "${srun_flags[@]}" --ntasks="$nodes" --ntasks-per-node=1
         "$PYTHON" -m nemo_opdlm.runtime.torchrun --nnodes="$nodes" --nproc-per-node="$gpn"
         --rdzv-backend=c10d --rdzv-endpoint="${master:-$(hostname)}:$((port_base + 1))" --rdzv-id="$SLURM_JOB_ID"
         -m nemo_opdlm.cli train --recipe "$RECIPE" "${train_overrides[@]}")
    # torchrun with pre-emption passed on (runtime/torchrun.py): the agent forwards TERM or USR1 to its
    # workers and waits for their checkpoint, where plain torchrun SIGKILLs them after 30 s and exits 1
    forward_signal=TERM
  else
    cmd=(srun "${srun_flags[@]}" --ntasks="$((nodes * gpn))" --ntasks-per-node="$gpn"
         "$PYTHON" -m nemo_opdlm.cli train --recipe "$RECIPE" "${train_overrides[@]}")
    forward_signal=USR1
  fi
  STOP_REQUESTED=0
  TRAIN_PID=""
  FORWARD_SIGNAL=$forward_signal
  trap on_preempt USR1 TERM
  log "launching: ${cmd[*]}"
  MASTER_PORT=$((port_base + 1)) "${cmd[@]}" > >(tee -a "$job_log") 2>&1 &
  TRAIN_PID=$!
  wait_for "$TRAIN_PID"
  local rc=$WAIT_RC
  trap - USR1 TERM
  log "training step exited with $rc"

  if [[ $STOP_REQUESTED == 1 ]]; then
    local done_step=0
    if [[ -f "$save_dir/latest" ]]; then done_step=$(sed -n 's/^step_0*\([0-9][0-9]*\).*/\1/p' "$save_dir/latest"); fi
    if [[ "${done_step:-0}" -ge "$steps" ]]; then
      log "training finished (step $done_step of $steps): not requeueing"
    elif [[ $restart -ge $MAX_RESTARTS ]]; then
      log "restart $restart reached MAX_RESTARTS=$MAX_RESTARTS: not requeueing"
    else
      log "requeueing job $SLURM_JOB_ID (checkpoint at step ${done_step:-0} of $steps)"
      scontrol requeue "$SLURM_JOB_ID"
    fi
    return 0
  fi
  return "$rc"
}

# Trap handler: remember the request and pass the signal on to the training step.
on_preempt() {
  log "pre-emption signal: forwarding $FORWARD_SIGNAL to the training step (pid ${TRAIN_PID:-none})"
  STOP_REQUESTED=1
  if [[ -n "${TRAIN_PID:-}" ]]; then kill -s "$FORWARD_SIGNAL" "$TRAIN_PID" 2>/dev/null || true; fi
}

# Wait for a background pid through trapped signals (a trap makes `wait` return early); sets WAIT_RC.
wait_for() {
  local pid=$1 rc again
  while true; do
    rc=0
    wait "$pid" || rc=$?
    if [[ $rc -gt 128 ]] && kill -0 "$pid" 2>/dev/null; then continue; fi
    if [[ $rc -gt 128 ]]; then  # interrupted, and the step ended meanwhile: fetch its own status
      again=0
      wait "$pid" 2>/dev/null || again=$?
      if [[ $again -ne 127 ]]; then rc=$again; fi
    fi
    break
  done
  WAIT_RC=$rc
}
