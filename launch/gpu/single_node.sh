#!/usr/bin/env bash
# Training on one GPU machine.
#
# One process driving every GPU (default, no jax.distributed needed):
#   bash launch/gpu/single_node.sh python -m irg_jax.train --config configs/x.py --workdir runs/r1
# IRG_NPROC=N processes, one per GPU, joined by jax.distributed on localhost (the same
# multi-process path as a cluster, on one machine):
#   IRG_NPROC=8 bash launch/gpu/single_node.sh python -m irg_jax.train ...
# Process 0 prints to the console; process i>0 writes IRG_LOG_DIR/process_<i>.log (default irg_logs).
# Stops every process when one fails or on Ctrl-C.
#
# IRG_DRY_RUN=1: print the command(s) with their environment and run nothing.
set -euo pipefail

quote_cmd() {  # print a command line, each word quoted for the shell
  local out="" word
  for word in "$@"; do out+="${out:+ }$(printf '%q' "$word")"; done
  echo "$out"
}

(( $# > 0 )) || { echo "usage: [IRG_NPROC=N] $0 COMMAND..." >&2; exit 2; }
nproc=${IRG_NPROC:-1}
[[ $nproc =~ ^[1-9][0-9]*$ ]] || { echo "IRG_NPROC=$nproc is not a positive integer" >&2; exit 2; }
dry_run=${IRG_DRY_RUN:-0}
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/irg_jax/jax_cache}

if (( nproc == 1 )); then
  if [[ $dry_run == 1 ]]; then quote_cmd "$@"; exit 0; fi
  exec "$@"
fi

port=${IRG_COORDINATOR_PORT:-23456}
log_dir=${IRG_LOG_DIR:-irg_logs}
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM

for (( rank = 0; rank < nproc; rank++ )); do
  env_vars=(IRG_COORDINATOR_ADDRESS=localhost:$port IRG_NUM_PROCESSES=$nproc IRG_PROCESS_ID=$rank
            IRG_LOCAL_DEVICE_IDS=$rank)
  if [[ $dry_run == 1 ]]; then
    quote_cmd "${env_vars[@]}" "$@"
    continue
  fi
  if (( rank == 0 )); then
    env "${env_vars[@]}" "$@" &
  else
    mkdir -p "$log_dir"
    env "${env_vars[@]}" "$@" > "$log_dir/process_$rank.log" 2>&1 &
  fi
  pids+=($!)
done
[[ $dry_run == 1 ]] && exit 0

status=0
for (( n = 0; n < nproc; n++ )); do
  if ! wait -n; then status=1; stop_all; fi
done
(( status == 0 )) || echo "single_node.sh: a process failed; logs of processes 1..$((nproc - 1)) in $log_dir" >&2
exit $status
