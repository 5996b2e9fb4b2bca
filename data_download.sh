#!/usr/bin/env bash
# Download a public clinical dataset and convert it to the segx_helpers dataset format: a thin wrapper around
# `python -m segx_helpers.cli.download`, the same command (which also works from an installed package, on Colab
# too). Run ./data_download.sh -h for the usage.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY="$REPO/.venv/bin/python"
[[ -x $PY ]] || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m segx_helpers.cli.download "$@"
