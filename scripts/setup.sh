#!/usr/bin/env bash
# Creates ./.venv with everything tp-curvature needs (idempotent). Used by README and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch pinned to the release this machine serves from disk; never a newer one
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[bench,test]"
