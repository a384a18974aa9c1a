#!/usr/bin/env bash
# Create .venv (once) and install nanoseek with the given extras. torch==2.13.0 goes in first, so that
# resolving the other packages keeps that build. This project's machines serve its CPU build; PyPI's
# Linux wheel is the multi-GB CUDA build (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# gets the CPU one).
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
