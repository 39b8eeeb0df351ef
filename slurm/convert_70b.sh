#!/bin/bash
# OPDLM conversion with a 70B-class teacher on two nodes of 8 GPUs
# (default: Llama-3.1-70B-Instruct at TP=8, DP=2 -> Llama-3.1-8B-Instruct at TP=2, DP=8).
#
#   TEACHER_HF=/models/Llama-3.1-70B-Instruct STUDENT_HF=/models/Llama-3.1-8B-Instruct \
#     DATA=/data/prompts.jsonl sbatch slurm/convert_70b.sh
#   RECIPE=qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g TEACHER_HF=/models/Qwen3-32B STUDENT_HF=/models/Qwen3-8B \
#     sbatch slurm/convert_70b.sh
#   RECIPE=llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g sbatch --nodes=4 slurm/convert_70b.sh
#   LAUNCHER=torchrun sbatch slurm/convert_70b.sh                 # one torchrun per node instead of srun tasks
#   bash slurm/convert_70b.sh --dry-run                           # login node: only `opdlm plan`
#
# The teacher is imported once into $RUN_DIR/teacher_mcore (on the teacher's TP x PP tasks) and
# training then reads that checkpoint; see slurm/convert_8b.sh for overriding the #SBATCH defaults
# and slurm/opdlm_job.sh for every environment variable.
#SBATCH --job-name=opdlm-70b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue

set -euo pipefail
RECIPE=${RECIPE:-llama31:llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
if [[ ! -f "$REPO/slurm/opdlm_job.sh" ]]; then
  echo "convert_70b.sh: $REPO/slurm/opdlm_job.sh not found: submit from the repository root or set REPO" >&2
  exit 1
fi
# shellcheck source=slurm/opdlm_job.sh
source "$REPO/slurm/opdlm_job.sh"
opdlm_job_main "$@"
