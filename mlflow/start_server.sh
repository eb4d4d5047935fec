#!/usr/bin/env bash
# Start a local MLflow tracking server: sqlite backend + a proxied artifact root, on 127.0.0.1.
#
#   mlflow/start_server.sh [PORT] [DIR]        # defaults: 5000, ./mlflow_server
#   HOST=0.0.0.0 mlflow/start_server.sh 5000   # listen on every interface (trusted networks only)
#
# Then train with tracking.uri=http://127.0.0.1:PORT and open http://127.0.0.1:PORT in a browser.
# It runs in the foreground (Ctrl-C, or kill -TERM <pid>, stops it and its children); /health answers
# OK once it is up (about 8 s).
set -euo pipefail
PORT="${1:-${MLFLOW_PORT:-5000}}"
DIR="$(mkdir -p "${2:-${MLFLOW_DIR:-./mlflow_server}}" && cd "${2:-${MLFLOW_DIR:-./mlflow_server}}" && pwd)"
HOST="${HOST:-127.0.0.1}"
mkdir -p "$DIR/artifacts"
echo "MLflow server: http://$HOST:$PORT  (store sqlite:///$DIR/mlflow.db, artifacts $DIR/artifacts)" >&2
exec mlflow server \
  --backend-store-uri "sqlite:///$DIR/mlflow.db" \
  --artifacts-destination "$DIR/artifacts" \
  --host "$HOST" --port "$PORT" --workers 1
