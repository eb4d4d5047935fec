#!/usr/bin/env bash
# Side-by-side table (config differences, final metrics) and a comparison plot of tracked runs.
#
#   mlflow/compare.sh --experiment zsre-smollm2-135m            # newest 10 runs of an experiment
#   mlflow/compare.sh --run RUN_ID --run RUN_ID --plot cmp.png  # given runs
#   mlflow/compare.sh --uri http://127.0.0.1:5000 -e zsre-smollm2-135m -f "tags.method = 'horse'"
#
# All arguments go to `python -m horse_dist.compare` (see --help).
set -euo pipefail
exec "${PYTHON:-python}" -m horse_dist.compare "$@"
