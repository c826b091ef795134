#!/usr/bin/env bash
# The erasure ablation of benchmarks/RESULTS.md: `attnscope erase --concept red` with its defaults and with one part
# of the method taken away, each measured by `attnscope eval` (its default protocol: 16 seeds per prompt).
#
#   bash benchmarks/erase_ablation.sh [OUT]        (default OUT: runs/erase-ablation; ~6 min per variant, 2 cores)
#
# Resumable: a variant whose LoRA (or eval.json) exists is not trained (or evaluated) again. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
out=${1:-runs/erase-ablation}
# The shapes models train without the attention term (their profile's weight is 0), so its row puts it back.
variants=(
  "full|"
  "paper-attention|--weights attention=1e-3"
  "localized-attention|--attention-form localized --weights attention=1"
  "no-contrastive|--weights contrastive=0"
  "no-preservation|--weights flow=0,keep=0"
  "esd-only|--weights flow=0,contrastive=0,keep=0"
  "paper-targets-qk|--targets add_q_proj,add_k_proj"
)
for entry in "${variants[@]}"; do
  name=${entry%%|*}
  flags=${entry#*|}
  if [ ! -f "$out/$name/pytorch_lora_weights.safetensors" ]; then
    # shellcheck disable=SC2086  # the flags are words
    attnscope erase --concept red --out "$out/$name" --overwrite $flags
  fi
  if [ ! -f "$out/$name/eval.json" ]; then
    attnscope eval --lora "$out/$name"
  fi
done
python - "$out" "${variants[@]%%|*}" <<'PY'
import json, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
print("| run | Acc_e | Acc_g | Acc_ir (erased / base = relative) | irrelevant colour / shape per object | pixel MAE "
      "| attention on the concept, base → erased | train s |")
print("|---|---:|---:|---|---|---:|---|---:|")
for name in names:
    e = json.loads((out / name / "eval.json").read_text())
    seconds = json.loads((out / name / "train_log.json").read_text())["seconds"]
    attrs, base_attrs = e["irrelevant_attributes"], e["base"]["irrelevant_attributes"]
    mass, base_mass = e["attention_mass"], e["base"]["attention_mass"]
    key = next(iter(mass))
    print(f"| {name} | {e['acc_e']:.3f} | {e['acc_g']:.3f} | {e['acc_ir']:.3f} / {e['base']['acc_ir']:.3f} = "
          f"{e['acc_ir_relative']:.1%} | {attrs['color']:.3f} / {attrs['shape']:.3f} (base {base_attrs['color']:.3f} / "
          f"{base_attrs['shape']:.3f}) | {e['quality']['pixel_mae']:.3f} | {base_mass[key]:.4f} → {mass[key]:.4f} "
          f"| {seconds:.0f} |")
PY
