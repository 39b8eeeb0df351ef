#!/bin/bash
# OPDLM conversion of an 8B-class model on one node of 8 GPUs (default: Qwen3-8B self-distillation).
#
#   sbatch slurm/convert_8b.sh                                   # submit from the repository root
#   TEACHER_HF=/models/Qwen3-8B DATA=/data/prompts.jsonl sbatch slurm/convert_8b.sh
#   RECIPE=llama31_8b_self_tp2_pp1_8g TEACHER_HF=/models/Llama-3.1-8B-Instruct sbatch slurm/convert_8b.sh
#   RECIPE=recipes/qwen3_8b_self_tp2_pp1_8g.yaml sbatch slurm/convert_8b.sh   # a YAML recipe (or your copy)
#   sbatch slurm/convert_8b.sh train.steps=100 rollout.threshold=0.8     # extra key=value overrides
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj SBATCH_TIMELIMIT=12:00:00 sbatch slurm/convert_8b.sh
#   sbatch --signal=B:USR1@600 slurm/convert_8b.sh                # more time to checkpoint before the limit
#   CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.04-py3 sbatch slurm/convert_8b.sh   # pyxis/enroot
#   bash slurm/convert_8b.sh --dry-run                           # login node: only `opdlm plan`
#
# The #SBATCH lines are defaults: sbatch's command-line options and SBATCH_* environment variables
# (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...) override them. Everything else is set by
# the environment variables listed in slurm/opdlm_job.sh. Slurm's own log goes to the submit
# directory; the run's logs (one per job and restart) go to $RUN_DIR/logs/.
#SBATCH --job-name=opdlm-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -euo pipefail
RECIPE=${RECIPE:-qwen3:qwen3_8b_self_tp2_pp1_8g}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# Under sbatch this file runs from Slurm's spool directory, so the shared body is found via REPO.
if [[ ! -f "$REPO/slurm/opdlm_job.sh" ]]; then
  echo "convert_8b.sh: $REPO/slurm/opdlm_job.sh not found: submit from the repository root or set REPO" >&2
  exit 1
fi
# shellcheck source=slurm/opdlm_job.sh
source "$REPO/slurm/opdlm_job.sh"
opdlm_job_main "$@"
