#!/usr/bin/env bash
# Install, then run the main job on the bundled shapes model: an image and the heatmaps of two words.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
attnscope maps --prompt "a red circle and a blue square" --words red,square --out out/maps "$@"
