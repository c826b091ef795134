#!/usr/bin/env bash
# Two chains of on-policy preference rounds (scripts/preference_rounds.sh) side by side on a lent GPU, at two
# learning rates; the four best rounds come back as tar files (see PACK there) with both chains' logs.
#
#   Here, once:  scripts/train_shapes_gpu.sh --fetch-wheels
#   There:       run(command="bash scripts/preference_rounds_gpu.sh ROUNDS", carry=[".whl"], timeout_s=590)
#   Back here:   for f in FILES_AT/*.tar; do mkdir -p runs/gpu/${f##*/}; tar -xf $f -C runs/gpu/${f##*/}; done
#                then copy the other components of attnscope/shapes/weights beside a chosen round's export/ and
#                run `attnscope shapes eval --model runs/gpu/<tar>/export` (the CPU's numbers are the record).
# No new round starts after NEW_ROUNDS_UNTIL [300] seconds, so the last ends inside the call's time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
source scripts/gpu_env.sh
export DEVICE=cuda THREADS=4 PACK="${OUT:-runs/gpu-packs}" KEEP=4 DEADLINE=$(( $(date +%s) + ${NEW_ROUNDS_UNTIL:-300} ))
mkdir -p runs
LR=1e-4 bash scripts/preference_rounds.sh runs/gpu-lr1e-4 "$ROUNDS" > runs/gpu-lr1e-4.log 2>&1 &
LR=5e-5 bash scripts/preference_rounds.sh runs/gpu-lr5e-5 "$ROUNDS" > runs/gpu-lr5e-5.log 2>&1 &
status=0
wait -n || status=$?
wait -n || status=$?
for chain in lr1e-4 lr5e-5; do
    # tqdm's carriage-return redraws make most of a log; keep the lines that say something
    grep -v -e 'it/s\]' -e 'Loading' "runs/gpu-$chain.log" > "$PACK/chain-$chain.log" || true
    grep -h "it/s" runs/gpu-$chain/round*/train.log 2>/dev/null | tail -3 || true
done
grep -h "^round" runs/gpu-*.log || true
ls -la "$PACK"
exit $status
