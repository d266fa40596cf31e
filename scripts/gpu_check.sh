#!/usr/bin/env bash
# The device check: the device tests, then short bench op / models / sd runs; md/json in ./gpu-check
# (or --out DIR). On one H100 it takes at most 8 minutes. Dry run on a CPU: scripts/gpu_check.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python -m agent_attention bench gpu "$@"
