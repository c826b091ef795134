#!/usr/bin/env bash
# Train the bundled shapes model, export it into attnscope/shapes/weights/ and evaluate it.
#
#   scripts/train_shapes.sh [MINUTES]        # default 108 (the bundled model's budget)
#
# Re-running resumes from runs/shapes-train/ckpt.pt (delete the folder to start over). One CPU thread
# (--threads 1) is the recorded setting; more threads only change the speed, not the result per step.
# The bundled weights took more than one run (resumes with changed options, then a grounding fine-tune with
# --init-from): the exact sequence is the "history" in attnscope/shapes/weights/training.json (lab/README.md).
# On a lent GPU, use scripts/train_shapes_gpu.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MINUTES="${1:-108}"
OUT=runs/shapes-train
attnscope shapes train --out "$OUT" --minutes "$MINUTES" --seed 0 --threads 1 --resume
attnscope shapes export "$OUT/ckpt.pt"
attnscope shapes eval --out "$OUT/eval"
