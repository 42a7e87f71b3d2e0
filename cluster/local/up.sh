#!/usr/bin/env bash
# A single-machine "real cluster" on 127.0.0.1: an S3 endpoint (moto), an MLflow tracking server and a Ray head with
# its dashboard and job submission. Each is polled until it answers; if one fails, what started is stopped again.
#
#   cluster/local/up.sh [STATE_DIR]     # default: $TGAN_CLUSTER_STATE, else ~/.tgan-cluster
#   source ~/.tgan-cluster/env.sh       # RAY_API_SERVER_ADDRESS, RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, ...
#   ray job submit --working-dir . -- python jobs/pipeline.py --images ... --out ... --smoke-test
#   cluster/local/down.sh [STATE_DIR]
#
# Settings (environment variables, with defaults):
#   TGAN_DASHBOARD_PORT=8265   Ray dashboard and job submission (HTTP)
#   TGAN_RAY_PORT=6379         Ray GCS (ray.init(address="127.0.0.1:6379"))
#   TGAN_RAY_CLIENT_PORT=10001 TGAN_RAY_AGENT_PORT=52365   more Ray ports (change them to run two clusters)
#   TGAN_RAY_CPUS=2            CPUs the head offers (GPUs are detected)
#   TGAN_MLFLOW_PORT=5000      MLflow tracking server (sqlite store in STATE_DIR)
#   TGAN_MLFLOW_ARTIFACTS=STATE_DIR/mlflow-artifacts   where MLflow keeps artifacts (a folder or s3://bucket/prefix)
#   TGAN_S3_PORT=9000          local S3 endpoint (moto); TGAN_S3=0 skips it
#   TGAN_S3_BUCKET=tgan        bucket created on the local S3 endpoint
#   TGAN_READY_TIMEOUT=120     seconds to wait for each service
#   TGAN_RAY_DRAIN_S=5         seconds Ray may drain the node when down.sh stops it
#   RAY_AUTH_MODE=token        Ray 2.60's token auth, kept on: Ray binds its GCS port on every interface, not only
#                              127.0.0.1. The token is made once in STATE_DIR/ray-auth-token (mode 600) and env.sh
#                              points RAY_AUTH_TOKEN_PATH at it, so `ray job submit` and ray.init() send it. Set
#                              RAY_AUTH_MODE=disabled to turn auth off (a single-user machine behind a firewall).
set -euo pipefail

STATE="${1:-${TGAN_CLUSTER_STATE:-$HOME/.tgan-cluster}}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
DASHBOARD_PORT="${TGAN_DASHBOARD_PORT:-8265}"
RAY_PORT="${TGAN_RAY_PORT:-6379}"
RAY_CLIENT_PORT="${TGAN_RAY_CLIENT_PORT:-10001}"
RAY_AGENT_PORT="${TGAN_RAY_AGENT_PORT:-52365}"
RAY_CPUS="${TGAN_RAY_CPUS:-2}"
MLFLOW_PORT="${TGAN_MLFLOW_PORT:-5000}"
MLFLOW_ARTIFACTS="${TGAN_MLFLOW_ARTIFACTS:-$STATE/mlflow-artifacts}"
WITH_S3="${TGAN_S3:-1}"
S3_PORT="${TGAN_S3_PORT:-9000}"
S3_BUCKET="${TGAN_S3_BUCKET:-tgan}"
TIMEOUT="${TGAN_READY_TIMEOUT:-120}"
AUTH_MODE="${RAY_AUTH_MODE:-token}"
PYTHON="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { echo "[up] $*" >&2; }
die() { echo "[up] error: $*" >&2; exit 1; }

for pid_file in "$STATE"/*.pid; do
  [[ -e "$pid_file" ]] || continue
  if kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    die "a cluster is already running from $STATE ($(basename "$pid_file" .pid) pid $(cat "$pid_file")); run cluster/local/down.sh $STATE first"
  fi
  rm -f "$pid_file"
done

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
check_port() {  # name port variable
  port_in_use "$2" && die "port $2 for $1 is already in use on 127.0.0.1; choose another with $3=<port>"
  return 0
}
check_port "the Ray dashboard" "$DASHBOARD_PORT" TGAN_DASHBOARD_PORT
check_port "the Ray GCS" "$RAY_PORT" TGAN_RAY_PORT
check_port "the Ray client server" "$RAY_CLIENT_PORT" TGAN_RAY_CLIENT_PORT
check_port "the Ray dashboard agent" "$RAY_AGENT_PORT" TGAN_RAY_AGENT_PORT
check_port "MLflow" "$MLFLOW_PORT" TGAN_MLFLOW_PORT
[[ "$WITH_S3" == 1 ]] && check_port "S3 (moto)" "$S3_PORT" TGAN_S3_PORT

command -v ray >/dev/null || die "the ray command is not on PATH; pip install -e . (ray[default]) first"
"$PYTHON" -c "import aiohttp, aiohttp_cors, mlflow" 2>/dev/null \
  || die "job submission needs ray[default] (the dashboard) and mlflow in $PYTHON; pip install -e . first"

# Any failure from here on stops whatever already started.
trap 'status=$?; if (( status != 0 )); then say "startup failed; stopping what started"; "$HERE/down.sh" "$STATE" >&2 || true; fi' EXIT

start() {  # name command...: in its own session, so down.sh can stop it and all its children by process group
  local name="$1"; shift
  # The new session's shell writes its own pid (= the group id) and execs the service, which keeps that pid.
  # ($! would name setsid's short-lived parent whenever setsid has to fork.)
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$STATE/$name.pid" "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  local waited=0
  until [[ -s "$STATE/$name.pid" ]]; do
    (( waited++ < 50 )) || die "$name did not start (log: $STATE/$name.log)"
    sleep 0.1
  done
}

wait_ready() {  # name url [curl options]: poll until the URL answers 2xx, the service dies, or TIMEOUT passes
  local name="$1" url="$2" deadline=$((SECONDS + TIMEOUT))
  shift 2
  until curl -fsS -o /dev/null --max-time 5 "$@" "$url" 2>/dev/null; do
    if ! kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
      tail -n 25 "$STATE/$name.log" >&2 || true
      die "$name exited while starting (log: $STATE/$name.log)"
    fi
    (( SECONDS < deadline )) || die "$name did not answer $url within ${TIMEOUT}s (log: $STATE/$name.log; raise TGAN_READY_TIMEOUT?)"
    sleep 1
  done
  say "$name ready: $url"
}

# All three start at once (they do not need each other to boot), then each is polled in turn.
ENV_LINES=()
export RAY_AUTH_MODE="$AUTH_MODE" RAY_USAGE_STATS_ENABLED=0

# --- S3 endpoint ----------------------------------------------------------------------------------------------------
if [[ "$WITH_S3" == 1 ]]; then
  "$PYTHON" -c "import moto.server, flask" 2>/dev/null \
    || die "moto's server is not installed; pip install 'moto[server]' (or set TGAN_S3=0 to skip the local S3)"
  # moto takes any credentials; these test ones keep real AWS keys away from the local endpoint.
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_DEFAULT_REGION=us-east-1
  start s3 "$PYTHON" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
  ENV_LINES+=("AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL" "AWS_ACCESS_KEY_ID=testing" "AWS_SECRET_ACCESS_KEY=testing"
              "AWS_DEFAULT_REGION=us-east-1")
fi

# --- MLflow tracking server -----------------------------------------------------------------------------------------
# The server proxies artifacts (mlflow-artifacts:/), so clients on any node need only its URL, not the artifact store.
[[ "$MLFLOW_ARTIFACTS" == s3://* ]] || mkdir -p "$MLFLOW_ARTIFACTS"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no background job runner (GenAI scorers, trace archival). It is unused
# here, costs two Python processes on a small machine, and can take 45 s+ to honour SIGTERM.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow "$PYTHON" -m mlflow server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
ENV_LINES+=("MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI")

# --- Ray head -------------------------------------------------------------------------------------------------------
AUTH_HEADER=()
if [[ "$AUTH_MODE" == token ]]; then
  export RAY_AUTH_TOKEN_PATH="$STATE/ray-auth-token"
  if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32), end='')" >"$RAY_AUTH_TOKEN_PATH")
  fi
  # HTTP clients send it as a bearer token; curl reads the header from a file, so no command line shows it.
  (umask 077 && printf 'Authorization: Bearer %s\n' "$(cat "$RAY_AUTH_TOKEN_PATH")" >"$STATE/ray-auth-header")
  AUTH_HEADER=(-H "@$STATE/ray-auth-header")
  ENV_LINES+=("RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH")
elif [[ "$AUTH_MODE" != disabled ]]; then
  die "RAY_AUTH_MODE must be token or disabled, got '$AUTH_MODE'"
fi
# A short temp dir: Ray's unix socket paths must stay under ~107 characters, whatever STATE_DIR is.
RAY_TEMP="$(mktemp -d /tmp/tgan-ray.XXXXXX)"
echo "$RAY_TEMP" >"$STATE/ray-temp-dir"
# --block keeps `ray start` in the foreground: SIGTERM to it drains the node and stops every Ray process it started,
# so down.sh never needs `ray stop`, which would kill every Ray process on the machine, other users' included.
# Jobs inherit this environment: MLFLOW_TRACKING_URI and AWS_* reach the job drivers and their workers.
# On SIGTERM, Ray first drains the node (for Serve behind a load balancer) for up to 30 s by default; a few seconds
# is plenty on one machine.
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${TGAN_RAY_DRAIN_S:-5}" start ray ray start --head --block --port="$RAY_PORT" --num-cpus="$RAY_CPUS" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
  --dashboard-agent-listen-port="$RAY_AGENT_PORT" --temp-dir="$RAY_TEMP" --disable-usage-stats
# Two addresses: `ray job ...` talks HTTP to the dashboard (RAY_API_SERVER_ADDRESS); ray.init() and `tgan` in this
# shell join the GCS (RAY_ADDRESS). Inside a job Ray sets RAY_ADDRESS itself.
ENV_LINES+=("RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT" "RAY_ADDRESS=127.0.0.1:$RAY_PORT"
            "RAY_AUTH_MODE=$AUTH_MODE")

# --- readiness ------------------------------------------------------------------------------------------------------
if [[ "$WITH_S3" == 1 ]]; then
  wait_ready s3 "$AWS_ENDPOINT_URL/"
  "$PYTHON" - "$S3_BUCKET" <<'PY'
import sys

import boto3

s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[1])
PY
  say "bucket s3://$S3_BUCKET ready"
fi
wait_ready mlflow "$MLFLOW_TRACKING_URI/health"
# /api/jobs/ answers only once the job manager is up, later than the dashboard's front page.
wait_ready ray "http://127.0.0.1:$DASHBOARD_PORT/api/jobs/" "${AUTH_HEADER[@]}"

# --- what a client needs --------------------------------------------------------------------------------------------
{
  echo "# source this file to use the local cluster started from $STATE"
  for line in "${ENV_LINES[@]}"; do echo "export $line"; done
} >"$STATE/env.sh.tmp"
mv "$STATE/env.sh.tmp" "$STATE/env.sh"
say "up. Ray dashboard http://127.0.0.1:$DASHBOARD_PORT, GCS 127.0.0.1:$RAY_PORT; stop with: $HERE/down.sh $STATE"
say "environment for clients (also in $STATE/env.sh):"
cat "$STATE/env.sh"
