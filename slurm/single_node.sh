#!/bin/bash
# One node, N GPUs: one `accelerate launch` starting one process per allocated GPU.
#   sbatch slurm/single_node.sh                                 # from the repository root
#   ACCELERATE_CONFIG=accelerate_configs/zero2.yaml RECIPE_CONFIG=recipes/configs/my.yaml \
#     sbatch slurm/single_node.sh --epochs 90                   # arguments go to the recipe
# Settings (RECIPE, RECIPE_CONFIG, ACCELERATE_CONFIG, OUTPUT_DIR, VENV, MAX_RESTARTS) and
# preemption/requeue: slurm/common.sh and docs/hpc.md.
#SBATCH --job-name=vr-single
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1         # one launcher per node; it starts the processes
#SBATCH --gpus-per-node=4           # = processes on the node (num_processes is read from this)
#SBATCH --cpus-per-task=32          # cores for all processes of the node (data, threads)
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300         # USR1 to this script 5 min before the limit: checkpoint, requeue
#SBATCH --requeue                   # this job may be requeued
#SBATCH --open-mode=append          # a requeued job appends to its log, never overwrites it
#SBATCH --output=%x-%j.out
# Site-specific (docs/hpc.md): uncomment and edit.
##SBATCH --partition=gpu
##SBATCH --account=my_project
# module load cuda/12.4             # or: export VENV=$HOME/venvs/vision-recipes before sbatch

: "${ACCELERATE_CONFIG:=accelerate_configs/multi_gpu.yaml}"
source "${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
launch "$@"
