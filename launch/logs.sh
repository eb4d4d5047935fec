#!/usr/bin/env bash
# Follow a Ray job's logs: launch/logs.sh SUBMISSION_ID   (no id: list the cluster's jobs)
# Env: RAY_JOB_ADDRESS (http://127.0.0.1:8265), RAY_AUTH_MODE (token).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
address="${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}"
if [ $# -eq 0 ]; then exec ray job list --address "$address"; fi
exec ray job logs --address "$address" --follow "$1"
