#!/usr/bin/env bash
# On-policy preference rounds (lab/preference.py): each round samples the current model on fresh
# training captions and judges the images (`attnscope shapes preferences`), fine-tunes it on its own pairs
# (`attnscope shapes train --preference`), exports the result and scores it on the held-out seeds 100-115 and on
# the eval's seeds 0-15 (benchmarks/sampler_sweep.py). The next round starts from that export, so the errors the
# last fine-tune introduced (a dropped object, a wrong colour) are the losers of the next.
#
#   scripts/preference_rounds.sh OUT ROUNDS [more `attnscope shapes train` options]
#
# Environment (defaults in brackets): MODEL, the starting export [attnscope/shapes/weights]; DEVICE [cpu];
# THREADS [2]; PROMPTS, captions per round [2000]; SAMPLES, images per caption [4]; STEPS, fine-tune steps per
# round [800]; BATCH, images per step, half winners and half losers [64]; LR [1e-4]; SFT, the weight of flow
# matching on the winners [1]; SWEEP_SEEDS, seeds per two-object prompt in each scoring [16]; PYTHON [python3];
# DEADLINE, epoch seconds after which no new round starts [none]; PACK, a folder that receives each round's new
# weights, record and scores as one tar file named CHAIN-roundR-SCORE.tar, SCORE the mean two-object rate of both
# seed sets plus 1 where colour stays at 0.97 or above, keeping the KEEP [4] best (how a GPU run brings its results
# back: the device tool returns a few files of at most 16 MB).
# Round r writes OUT/round<r>/{set.pt,ckpt.pt,train.log,export/,heldout.jsonl}. Run again, the script skips the
# finished rounds and continues an interrupted one (its preference set and its checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: preference_rounds.sh OUT ROUNDS [train options]}"
ROUNDS="${2:?usage: preference_rounds.sh OUT ROUNDS [train options]}"
shift 2
model="${MODEL:-attnscope/shapes/weights}"
common=(--device "${DEVICE:-cpu}" --threads "${THREADS:-2}")
python="${PYTHON:-python3}"

for round in $(seq 1 "$ROUNDS"); do
    dir="$OUT/round$round"
    if [[ -f "$dir/heldout.jsonl" ]]; then model="$dir/export"; continue; fi
    if [[ -n "${DEADLINE:-}" && $(date +%s) -ge $DEADLINE ]]; then
        echo "deadline passed: no round $round"
        break
    fi
    mkdir -p "$dir"
    # Captions and sampling seeds come from the round number: every round sees captions it has not seen.
    "$python" -m attnscope.cli shapes preferences --model "$model" --out "$dir/set.pt" --prompts "${PROMPTS:-2000}" \
        --samples "${SAMPLES:-4}" --seed "$round" --batch 500 "${common[@]}"
    "$python" -m attnscope.cli shapes train --out "$dir" --resume --init-from "$model" --preference "$dir/set.pt" \
        --minutes 0 --steps "${STEPS:-800}" --batch "${BATCH:-64}" --lr "${LR:-1e-4}" --seed "$round" \
        --preference-sft "${SFT:-1}" --uniform-t 0.5 "${common[@]}" "$@"
    "$python" -m attnscope.cli shapes export "$dir/ckpt.pt" --to "$dir/export"
    sweep=("$python" benchmarks/sampler_sweep.py --model "$dir/export" --seeds "${SWEEP_SEEDS:-16}" "${common[@]}")
    "${sweep[@]}" > "$dir/heldout.part"  # the model's own sampler and guidance
    "${sweep[@]}" --first-seed 0 >> "$dir/heldout.part"
    mv "$dir/heldout.part" "$dir/heldout.jsonl"
    echo "round $round: $(head -1 "$dir/heldout.jsonl")"
    if [[ -n "${PACK:-}" ]]; then
        score=$("$python" -c "import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
mean = sum(r['two_object_all_correct'] for r in rows) / len(rows)
colour_kept = min(r['color'] for r in rows) >= 0.97
print(f'{mean + colour_kept:.4f}')" "$dir/heldout.jsonl")
        mkdir -p "$PACK"
        tar -cf "$PACK/$(basename "$OUT")-round$round-$score.tar" -C "$dir" export/transformer \
            export/text_encoder_2 export/training.json heldout.jsonl train.log
        (   # chains side by side share PACK: one prunes at a time, the lowest score first
            flock 9
            ls "$PACK"/*-round*-*.tar | awk -F- '{print $NF, $0}' | sort -g | head -n -"${KEEP:-4}" | cut -d' ' -f2- \
                | xargs -r rm -f
        ) 9> /tmp/preference_rounds.lock
    fi
    model="$dir/export"
done
