#!/usr/bin/env bash
# Submit a meta-training run as a Ray job and stream its logs (exit code = the job's).
#   launch/submit.sh [--no-wait] [--config FILE] [key=value ...]      (train overrides, as for horse_dist.train)
# e.g. launch/submit.sh dist.num_workers=2 data.n_edits=64 train.steps=20
# The repository is uploaded as the job's working_dir with the excludes in launch/runtime_env.yaml.
# Runs and the MLflow store default to absolute paths of this checkout (the working_dir copy on the
# cluster is temporary); later key=value arguments override them.
# Env: RAY_JOB_ADDRESS (http://127.0.0.1:8265), RAY_AUTH_MODE (token, must match the head),
#      RUNTIME_ENV (launch/runtime_env.yaml), SUBMISSION_ID (auto), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
address="${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}"
wait_flag=()
if [ "${1:-}" = "--no-wait" ]; then wait_flag=(--no-wait); shift; fi
submission_id="${SUBMISSION_ID:-horse-dist-$(date +%Y%m%d-%H%M%S)-$RANDOM}"
echo "submission id: $submission_id"
exec ray job submit --address "$address" --submission-id "$submission_id" \
  --runtime-env "${RUNTIME_ENV:-launch/runtime_env.yaml}" --working-dir . "${wait_flag[@]}" -- \
  "${PYTHON:-python}" -m horse_dist.train dist.backend=ray \
  "train.out_dir=$PWD/runs" "tracking.uri=sqlite:///$PWD/mlflow.db" "$@"
