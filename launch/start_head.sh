#!/usr/bin/env bash
# Start a one-node Ray head for horse_dist jobs (loopback by default).
#   launch/start_head.sh [extra `ray start` args, e.g. --block]
# Env: RAY_HOST (127.0.0.1; 0.0.0.0 to accept other nodes), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265),
#      RAY_CLIENT_PORT (10001), RAY_NUM_CPUS / RAY_NUM_GPUS (autodetected if unset),
#      RAY_AUTH_MODE: token (default: every client must send the token in ~/.ray/auth_token, or
#      RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; launch/submit.sh does. With none, this script generates one:
#      `ray start` with RAY_AUTH_MODE=token does not) or disabled (only on a trusted loopback/private network).
# The head inherits this shell's PATH with .venv/bin first, so job entrypoints find the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
   && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  ray get-auth-token --generate >/dev/null
  echo "generated a Ray auth token in ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
fi
host="${RAY_HOST:-127.0.0.1}"
args=(--head --port "${RAY_PORT:-6379}" --node-ip-address "$host"
      --dashboard-host "$host" --dashboard-port "${RAY_DASHBOARD_PORT:-8265}"
      --ray-client-server-port "${RAY_CLIENT_PORT:-10001}" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus "$RAY_NUM_GPUS")
echo "ray start ${args[*]} $* (RAY_AUTH_MODE=$RAY_AUTH_MODE)"
exec ray start "${args[@]}" "$@"
