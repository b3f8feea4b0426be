#!/bin/bash
# Several nodes x N GPUs, DeepSpeed ZeRO (stage 2 by default): one `accelerate launch` per node
# through srun (the accelerate config must say deepspeed_multinode_launcher: standard; the
# preflight refuses pdsh, which breaks under Slurm). Sizes come from the allocation.
#   sbatch slurm/multinode_deepspeed.sh                         # from the repository root
#   ACCELERATE_CONFIG=my_zero3_multinode.yaml sbatch --nodes=4 slurm/multinode_deepspeed.sh
# Settings (RECIPE, RECIPE_CONFIG, ACCELERATE_CONFIG, OUTPUT_DIR, VENV, MAX_RESTARTS) and
# preemption/requeue: slurm/common.sh and docs/hpc.md.
#SBATCH --job-name=vr-zero
#SBATCH --nodes=2                   # = num_machines
#SBATCH --ntasks-per-node=1         # one launcher per node; it starts the processes
#SBATCH --gpus-per-node=4           # = processes per node; num_processes = nodes x this
#SBATCH --cpus-per-task=32          # cores per node for all its processes
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300         # USR1 to this script 5 min before the limit: checkpoint, requeue
#SBATCH --requeue                   # this job may be requeued
#SBATCH --open-mode=append          # a requeued job appends to its log, never overwrites it
#SBATCH --output=%x-%j.out
# Site-specific (docs/hpc.md): uncomment and edit.
##SBATCH --partition=gpu
##SBATCH --account=my_project
# module load cuda/12.4             # or: export VENV=$HOME/venvs/vision-recipes before sbatch
# DeepSpeed JIT-builds some ops on first use, into $TORCH_EXTENSIONS_DIR (default
# ~/.cache/torch_extensions): build them once on a login node if jobs must not wait.

: "${ACCELERATE_CONFIG:=accelerate_configs/multinode_zero2.yaml}"
source "${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
launch "$@"
