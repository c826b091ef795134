#!/usr/bin/env bash
# Train a shapes model on a lent GPU (the device tool's machine) and bring the export back as one tar file.
#
#   Here, once:  scripts/train_shapes_gpu.sh --fetch-wheels
#                (the device machine has CUDA torch, transformers and peft but no diffusers and no network: this
#                downloads the diffusers wheel matching this checkout's into .whl/, which .git/info/exclude ignores)
#   There:       run(command="bash scripts/train_shapes_gpu.sh MINUTES [attnscope shapes train options]",
#                    carry=[".whl"], timeout_s=MINUTES*60 + 120)
#                e.g. a grounding fine-tune of the bundle at a GPU batch:
#                bash scripts/train_shapes_gpu.sh 8 --init-from attnscope/shapes/weights --batch 128 --lr 3e-4 \
#                     --grounding 0.1 --uniform-t 0.5
#                or a new run with a deeper text encoder: ... 8 --batch 128 --t5-layers 3 --grounding 0.1
#                or the SD3-form model (attnscope shapes train-sd3), continuing the bundled one:
#                SHAPES_COMMAND=train-sd3 bash scripts/train_shapes_gpu.sh 8 --init-from shapes-sd3 --batch 128
#   Back here:   tar -xf FILES_AT/shapes-gpu.tar -C runs
#                attnscope shapes eval --model runs/shapes-gpu/export --out runs/shapes-gpu/eval
#                then export into attnscope/shapes/weights with the history, as lab/README.md says.
#
# The export (≤ 20 MB, checked) and train.log come back in $OUT/shapes-gpu.tar; the checkpoint (optimizer state
# included) is larger than what the device tool returns, so a GPU run is not resumed here: it is exported.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    version=$(python -c "import diffusers; print(diffusers.__version__)")
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==$version"
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    exit 0
fi

MINUTES="${1:?usage: train_shapes_gpu.sh MINUTES [train options] (or --fetch-wheels, here)}"
shift
source scripts/gpu_env.sh

RUN=runs/shapes-gpu
# Rendering is numpy on the CPU: 12 processes keep a batch of 128 ahead of the GPU.
python3 -m attnscope.cli shapes "${SHAPES_COMMAND:-train}" --out "$RUN" --minutes "$MINUTES" --seed 0 --device cuda --workers 12 \
    --threads 2 --checkpoint-minutes 2 "$@"
python3 -m attnscope.cli shapes export "$RUN/ckpt.pt" --to "$RUN/export"
tar -cf "${OUT:-runs}/shapes-gpu.tar" -C runs shapes-gpu/export shapes-gpu/train.log
echo "packed ${OUT:-runs}/shapes-gpu.tar"
