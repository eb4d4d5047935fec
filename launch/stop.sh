#!/usr/bin/env bash
# launch/stop.sh SUBMISSION_ID : stop one job.   launch/stop.sh --head : stop the Ray head on this machine.
# (`ray stop` ends every Ray process of this user on this machine, not only the head started here.)
# Env: RAY_JOB_ADDRESS (http://127.0.0.1:8265), RAY_AUTH_MODE (token).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "${1:-}" in
  "") echo "usage: launch/stop.sh SUBMISSION_ID | --head" >&2; exit 2 ;;
  --head) exec ray stop ;;
  *) exec ray job stop --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}" "$1" ;;
esac
