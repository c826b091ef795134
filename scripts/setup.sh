#!/usr/bin/env bash
# Install attnscope and its development extras into the current Python environment.
#
# torch is pinned here, not in pyproject (which asks for torch>=2.4): on our CPU machines `torch==2.13.0` is a
# CPU wheel that lies on disk, while an unpinned torch would pull a multi-GB CUDA build. A torch that is already
# importable is kept (GPU users install theirs first).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"

# The explorer's end-to-end tests drive Debian's Chromium through Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not found; the browser test of the explorer will be skipped" >&2
  fi
fi
