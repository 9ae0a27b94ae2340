#!/usr/bin/env bash
# One SLURM task: srun starts this once per process. It names this process's id and the GPUs it
# drives for irg_jax.runtime.maybe_initialize_distributed, then execs the command.
#
# Reads IRG_COORDINATOR_ADDRESS, IRG_NUM_PROCESSES, IRG_PROCS_PER_NODE (exported by
# slurm_multinode.sbatch) and SLURM_PROCID, SLURM_LOCALID (set by srun).
# IRG_DRY_RUN=1: print the environment and command instead of running it.
set -euo pipefail

export IRG_PROCESS_ID=$SLURM_PROCID

visible_gpus() {  # how many GPUs this task can see
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  else
    nvidia-smi -L | grep -c '^GPU'
  fi
}

gpus=$(visible_gpus)
if (( IRG_PROCS_PER_NODE > 1 )); then
  # One process per GPU. If SLURM already bound this task to a single GPU it is device 0 here;
  # otherwise the task sees the whole node and takes the GPU numbered by its local rank.
  if (( gpus == 1 )); then export IRG_LOCAL_DEVICE_IDS=0; else export IRG_LOCAL_DEVICE_IDS=$SLURM_LOCALID; fi
else
  # One process per node drives every GPU of it (JAX's own SLURM detection would keep only one).
  export IRG_LOCAL_DEVICE_IDS=$(seq -s, 0 $(( gpus - 1 )))
fi

if [[ ${IRG_DRY_RUN:-0} == 1 ]]; then
  printf 'task %s on %s: IRG_COORDINATOR_ADDRESS=%s IRG_NUM_PROCESSES=%s IRG_PROCESS_ID=%s IRG_LOCAL_DEVICE_IDS=%s' \
    "$SLURM_PROCID" "${SLURMD_NODENAME:-$(hostname)}" "$IRG_COORDINATOR_ADDRESS" "$IRG_NUM_PROCESSES" \
    "$IRG_PROCESS_ID" "$IRG_LOCAL_DEVICE_IDS"
  printf ' %q' "$@"
  printf '\n'
  exit 0
fi
exec "$@"
