# Sourced by the slurm/*.sh templates (not submitted itself). It does, in order:
#   1. environment: cd to the repository, optional venv, W&B offline, logs appended;
#   2. sizes from the allocation: nodes, processes per node (GPUs, or tasks on CPU nodes),
#      first host as main address, a free port: each read from SLURM_*, never typed twice;
#   3. preflight: the accelerate config as it will be launched against the allocation;
#   4. one `accelerate launch` per node through srun, machine rank = the task's SLURM_NODEID;
#   5. preemption: USR1 (from --signal=B:USR1@N or scancel --signal=USR1 --batch) is
#      forwarded to every training process, which checkpoint and exit; the job is requeued
#      (at most MAX_RESTARTS times) and the recipe resumes from its last checkpoint.
# Settings (environment variables, all optional; `sbatch` passes your environment on):
#   RECIPE             recipe name in recipes/            (default image_classification)
#   RECIPE_CONFIG      recipe YAML, passed as -c          (default: the recipe's defaults)
#   ACCELERATE_CONFIG  accelerate YAML                    (default: set by each template)
#   OUTPUT_DIR         run folder, kept across requeues   (default runs/<job name>-<job id>)
#   VENV               a virtual environment to activate  (default: whatever is on PATH)
#   REPO               the repository clone               (default: where you ran sbatch)
#   MAX_RESTARTS       requeues allowed after preemption  (default 5)
#   MAIN_ADDR          address of the first node          (default: its Slurm host name)
#   WANDB_MODE         offline unless set (compute nodes rarely reach the internet)
# Arguments given to `sbatch template.sh ARGS` go to the recipe (e.g. --epochs 10).

log() { echo "[slurm $(date +%H:%M:%S)] $*"; }

# Preemption. The trap runs when USR1 reaches this shell (it interrupts `wait` below).
# USR1 is forwarded to every process of the job steps on all nodes: the recipes
# checkpoint at their next optimizer step and exit; the launchers ignore it. It is
# repeated every 30 s in case a recipe process had not yet installed its handler.
STOP_REQUESTED=""
on_usr1() {
  [ -n "$STOP_REQUESTED" ] && return
  STOP_REQUESTED=USR1
  log "USR1: asking the training processes to checkpoint and stop"
  ( while scancel --signal=USR1 "$SLURM_JOB_ID"; do sleep 30; done ) &
  RESENDER=$!
}
trap on_usr1 USR1
# TERM (scancel, a time limit without headroom, Slurm's own preemption) reaches every
# process of the steps from Slurm itself: stay alive so the log says what happened.
trap 'STOP_REQUESTED=${STOP_REQUESTED:-TERM}; log "TERM received: waiting for the checkpoint"' TERM

cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}" || exit 2
if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate" || exit 2; fi
command -v accelerate >/dev/null || { log "accelerate not on PATH: set VENV or load your modules"; exit 2; }

: "${RECIPE:=image_classification}"
: "${OUTPUT_DIR:=runs/${SLURM_JOB_NAME%.sh}-${SLURM_JOB_ID}}"
: "${MAX_RESTARTS:=5}"
export WANDB_MODE="${WANDB_MODE:-offline}"   # sync later from a login node: slurm/wandb_sync.sh
export PYTHONUNBUFFERED=1                    # log lines in order, not at exit

launch() {
  local restart="${SLURM_RESTART_COUNT:-0}"
  # Sizes from the allocation (the batch script runs on its first node).
  export NUM_MACHINES="$SLURM_JOB_NUM_NODES"
  local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"; gpus="${gpus##*:}"  # "a100:4" -> 4
  if [ "${gpus:-0}" -gt 0 ] 2>/dev/null; then
    export PROCS_PER_NODE="$gpus"                               # one process per GPU
  else
    export PROCS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"         # CPU nodes: one process per task
  fi
  export NUM_PROCESSES=$(( NUM_MACHINES * PROCS_PER_NODE ))
  export MAIN_ADDR; MAIN_ADDR="${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
  export MAIN_PORT; MAIN_PORT="${MAIN_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"
  export ACCELERATE_CONFIG OUTPUT_DIR RECIPE RECIPE_CONFIG="${RECIPE_CONFIG:-}"
  log "job $SLURM_JOB_ID restart $restart (SLURM_RESTART_COUNT=$restart, cap $MAX_RESTARTS) on $SLURM_JOB_NODELIST:" \
      "$NUM_MACHINES node(s) x $PROCS_PER_NODE process(es), main $MAIN_ADDR:$MAIN_PORT, $ACCELERATE_CONFIG -> $OUTPUT_DIR"

  # Refuse a config that cannot fit the allocation before any node waits for another.
  python slurm/preflight.py --config_file "$ACCELERATE_CONFIG" \
      --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" || exit 2

  local step rc=75
  if [ -z "$STOP_REQUESTED" ]; then  # (a stop asked for during the preflight: requeue at once)
    # One launcher per node. The single quotes matter: $SLURM_NODEID is expanded by each
    # task on its own node (expanded here, every node would be machine rank 0 and hang).
    # `trap '' USR1` makes the launcher ignore USR1 (it would die of it); the recipe
    # processes it starts install their own handler. --kill-on-bad-exit ends every node
    # when one fails, instead of waiting for the wall-clock limit.
    srun --nodes="$NUM_MACHINES" --ntasks="$NUM_MACHINES" --ntasks-per-node=1 \
         --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 --unbuffered \
      bash -c 'trap "" USR1
        echo "[slurm] node $SLURMD_NODENAME: machine_rank $SLURM_NODEID of $NUM_MACHINES, $PROCS_PER_NODE process(es)"
        exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
          --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
          --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
          "recipes/$RECIPE.py" ${RECIPE_CONFIG:+-c "$RECIPE_CONFIG"} --output-dir "$OUTPUT_DIR" "$@"' \
      launcher "$@" &
    step=$!
    while :; do  # a trapped signal interrupts `wait`: wait again until srun has really ended
      wait "$step"; rc=$?
      kill -0 "$step" 2>/dev/null || break
    done
  fi
  [ -n "${RESENDER:-}" ] && kill "$RESENDER" 2>/dev/null
  trap '' USR1 TERM  # from here on, a late signal must not kill the requeue logic

  # The recipe exits 0 both when it finishes and when it checkpointed and stopped; in the
  # second case it leaves $OUTPUT_DIR/stopped.json (step, checkpoint, reason) behind.
  if [ "$rc" -eq 0 ] && [ ! -f "$OUTPUT_DIR/stopped.json" ]; then
    log "training finished: $OUTPUT_DIR/summary.json"
    exit 0
  fi
  if [ "$rc" -ne 0 ] && [ -z "$STOP_REQUESTED" ]; then
    log "training failed (exit code $rc); not requeued: the error is above"
    exit "$rc"
  fi
  log "stopped on ${STOP_REQUESTED:-request}: $(cat "$OUTPUT_DIR/stopped.json" 2>/dev/null || echo 'no checkpoint marker')"
  if [ "$STOP_REQUESTED" = USR1 ]; then
    if [ "$restart" -lt "$MAX_RESTARTS" ]; then
      log "requeueing job $SLURM_JOB_ID (restart $(( restart + 1 )) of at most $MAX_RESTARTS); it resumes from that checkpoint"
      scontrol requeue "$SLURM_JOB_ID" && exit 0
      log "scontrol requeue failed: resubmit the same command (same OUTPUT_DIR) to resume"
    else
      log "restart cap MAX_RESTARTS=$MAX_RESTARTS reached: not requeued; resubmit with OUTPUT_DIR=$OUTPUT_DIR to resume"
    fi
  fi
  exit 75   # resumable: checkpoint saved, training not finished
}
