#!/usr/bin/env bash
# Install, then run the whole test suite offline (no model hub access anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
python -m pytest "$@"
