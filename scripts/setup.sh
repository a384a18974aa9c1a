#!/usr/bin/env bash
# Create .venv (once) and install nanoseek with the given extras. torch==2.13.0 goes in first:
# it is the CPU build, and letting pip resolve an unpinned torch would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
python3 -m venv .venv 2>/dev/null || [ -x .venv/bin/python ]
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.nanoseek-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi
