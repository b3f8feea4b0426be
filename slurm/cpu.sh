#!/bin/bash
# CPU nodes, one or several: one process per task (--ntasks-per-node), one `accelerate launch`
# per node through srun, DDP over gloo. The tests of this repository submit this template.
#   sbatch slurm/cpu.sh                                         # from the repository root
#   sbatch --nodes=4 --ntasks-per-node=8 --cpus-per-task=4 slurm/cpu.sh --epochs 10
# Settings (RECIPE, RECIPE_CONFIG, ACCELERATE_CONFIG, OUTPUT_DIR, VENV, MAX_RESTARTS) and
# preemption/requeue: slurm/common.sh and docs/hpc.md.
#SBATCH --job-name=vr-cpu
#SBATCH --nodes=1                   # = num_machines
#SBATCH --ntasks-per-node=2         # = processes per node; num_processes = nodes x this
#SBATCH --cpus-per-task=1           # threads per process
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120         # USR1 to this script 2 min before the limit: checkpoint, requeue
#SBATCH --requeue                   # this job may be requeued
#SBATCH --open-mode=append          # a requeued job appends to its log, never overwrites it
#SBATCH --output=%x-%j.out
# Site-specific (docs/hpc.md): uncomment and edit.
##SBATCH --partition=cpu
##SBATCH --account=my_project
# module load python/3.11           # or: export VENV=$HOME/venvs/vision-recipes before sbatch

: "${ACCELERATE_CONFIG:=accelerate_configs/cpu_ddp.yaml}"
source "${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
launch "$@"
