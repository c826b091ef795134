#!/usr/bin/env bash
# The GPU suite (issue 27), as one prepared run for a lent device: FLUX.1-dev-size capture, erasure and attack
# costs, then SD3.5-large-size capture if time is left. Writes ${OUT:-benchmarks}/gpu_suite.json (each section as
# it finishes) and a log beside it. Budget: about 5–7 minutes on an H100; the Python side starts no section after
# --budget seconds and the timeout keeps the call inside the device tool's limit.
#
# The device image has torch, transformers, peft and einops but not diffusers: carry it as wheels. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then call the device with carry [".whl"] and the command `bash benchmarks/gpu_suite.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}"
mkdir -p "$out"
site=/tmp/gpu-suite-site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
# attnscope without installing it: its package folders as pip's package-dir maps them (pyproject.toml).
mkdir -p "$site/attnscope"
for f in attnscope/*; do ln -sfn "$PWD/$f" "$site/attnscope/$(basename "$f")"; done
ln -sfn "$PWD/erase" "$site/attnscope/erase"
ln -sfn "$PWD/apps" "$site/attnscope/apps"
ln -sfn "$PWD/lab" "$site/attnscope/lab"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu_suite_device.txt" 2>&1 || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
set -o pipefail
timeout 470 python3 benchmarks/gpu_suite.py --scale full --device cuda --dtype bfloat16 --budget 400 \
  --json "$out/gpu_suite.json" 2>&1 | tee "$out/gpu_suite.log"
