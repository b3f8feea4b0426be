#!/usr/bin/env bash
# Upload the W&B runs that jobs recorded offline (compute nodes rarely reach the internet).
# Run it on a login node, which does:
#   wandb login                          # once; the key goes to ~/.netrc, never to a log
#   slurm/wandb_sync.sh                  # every offline run under runs/
#   slurm/wandb_sync.sh runs/vr-ddp-1234 /scratch/me/runs   # these run folders or parents
#   slurm/wandb_sync.sh --dry-run ...    # list what would be uploaded, upload nothing
# A requeued job leaves one offline-run-<time>-<id> folder per run of the job, all with the
# same <id> (kept in <run folder>/wandb_run_id): they are uploaded oldest first into that one
# W&B run. Folders already uploaded are skipped, so it is safe to run again.
set -euo pipefail
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
[ $# -gt 0 ] || set -- runs
unset WANDB_MODE   # an exported WANDB_MODE=offline would make the upload a no-op

# Oldest first: folder names start with offline-run-YYYYMMDD_HHMMSS.
mapfile -t found < <(find "$@" -type d -name 'offline-run-*' -prune -print 2>/dev/null |
                     awk -F/ '{ print $NF "\t" $0 }' | sort | cut -f2-)
todo=()
for dir in "${found[@]}"; do
  if compgen -G "$dir/*.wandb.synced" >/dev/null; then echo "already synced: $dir"; else todo+=("$dir"); fi
done
if [ ${#todo[@]} -eq 0 ]; then echo "no offline W&B runs left to sync under: $*"; exit 0; fi
printf 'to sync: %s\n' "${todo[@]}"
exec wandb sync "${dry[@]}" "${todo[@]}"
