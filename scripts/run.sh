#!/usr/bin/env bash
# The main job on its built-in default: set up .venv, then run it. Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
exec .venv/bin/nanoseek demo "$@"
