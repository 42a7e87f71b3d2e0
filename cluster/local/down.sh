#!/usr/bin/env bash
# Stop the local cluster that cluster/local/up.sh started from STATE_DIR: the Ray head, MLflow and the S3 endpoint.
#
#   cluster/local/down.sh [STATE_DIR]    # default: $TGAN_CLUSTER_STATE, else ~/.tgan-cluster
#
# Only the processes recorded in STATE_DIR/*.pid (and their process groups) are stopped, never other Ray instances
# on the machine. The MLflow database, artifacts and logs stay in STATE_DIR; TGAN_PURGE=1 deletes STATE_DIR too.
# Settings: TGAN_STOP_TIMEOUT=45 seconds to wait for a graceful stop before SIGKILL.
set -euo pipefail

STATE="${1:-${TGAN_CLUSTER_STATE:-$HOME/.tgan-cluster}}"
TIMEOUT="${TGAN_STOP_TIMEOUT:-45}"

say() { echo "[down] $*" >&2; }

[[ -d "$STATE" ]] || { say "no cluster state in $STATE; nothing to stop"; exit 0; }

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop() {  # name: SIGTERM the service's process group, wait, then SIGKILL what is left
  local name="$1" pid_file="$STATE/$1.pid" pid deadline started=$SECONDS
  [[ -e "$pid_file" ]] || return 0
  pid="$(cat "$pid_file")"
  # up.sh started each service with setsid, so its pid is also its process group id.
  if group_alive "$pid"; then
    # Ray: SIGTERM to `ray start --block` only; it drains the node and stops its own processes in order.
    if [[ "$name" == ray ]]; then kill -TERM "$pid" 2>/dev/null || true; else kill -TERM -- "-$pid" 2>/dev/null || true; fi
    deadline=$((SECONDS + TIMEOUT))
    while group_alive "$pid" && (( SECONDS < deadline )); do
      # once the leader is gone, whatever it left behind in its group gets the same request
      kill -0 "$pid" 2>/dev/null || kill -TERM -- "-$pid" 2>/dev/null || true
      sleep 0.5
    done
    if group_alive "$pid"; then
      say "$name did not stop within ${TIMEOUT}s; killing process group $pid"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pid_file"
  say "$name stopped ($((SECONDS - started))s)"
}

# Reverse start order: jobs on Ray may still be writing to MLflow and S3.
stop ray
stop mlflow
stop s3

if [[ -e "$STATE/ray-temp-dir" ]]; then
  ray_temp="$(cat "$STATE/ray-temp-dir")"
  # only ever the folder up.sh made with mktemp
  [[ "$ray_temp" == /tmp/tgan-ray.* ]] && rm -rf -- "$ray_temp"
  rm -f "$STATE/ray-temp-dir"
fi
rm -f "$STATE/env.sh"
if [[ "${TGAN_PURGE:-0}" == 1 ]]; then
  rm -rf -- "$STATE"
  say "deleted $STATE"
fi
say "down"
