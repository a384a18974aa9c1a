#!/usr/bin/env bash
# The README's main job: set up .venv, then train a small DeepSeek-V3-architecture model (MLA,
# DeepSeekMoE with loss-free balancing, one MTP module) from scratch on Python's own standard-library
# sources for about 10 minutes, with a progress bar; it ends by completing a few code prompts and
# printing where the checkpoint and the plot are. Extra arguments go to `nanoseek train`, e.g.
#   bash scripts/run.sh --corpus ../shared/data/text/tinyshakespeare.txt --minutes 5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
# OpenMP threads that wait by sleeping rather than spinning: on a shared machine, a spinning thread
# whose partner lost its core stalls every parallel op (measured 2.6x slower steps on 2 busy cores).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/nanoseek train "$@"
