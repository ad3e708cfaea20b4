#!/usr/bin/env bash
# The whole recipe of the bundled synthdoc model (docs/synthdoc.md), every step resumable:
#   scripts/train_synthdoc.sh [RUNS]        # RUNS: where data and checkpoints go (default ../runs/synthdoc)
# Rerun it after a stop: finished steps are skipped, a stopped training step resumes from its checkpoint.
# Then `scripts/export_bundled.py RUNS/stage2/final` copies the model into the package, and
# `python benchmarks/synthdoc.py` measures it. On a GPU every step runs unchanged (the trainer picks CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/synthdoc}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
mkdir -p "$RUNS"

train() {  # train CONFIG NAME [--set ...]: skipped when NAME/final exists, else resumed
  local config=$1 name=$2
  shift 2
  [ -e "$RUNS/$name/final" ] && { echo "== $name: done"; return; }
  echo "== $name"
  "$BIN/llava-uhd" train --config "$config" --set "output_dir=$RUNS/$name" "$@" --resume
}

# stage 0: the vision tower learns to read glyphs (a minute of small windows, then whole slices)
train configs/synthdoc/stage0-warmup.yaml stage0-warmup
train configs/synthdoc/stage0.yaml stage0 --set "model.init_from=$RUNS/stage0-warmup/final"

# the tokenizer and the training pages of stages 1 and 2 (one set of pages, two JSONs)
[ -e "$RUNS/tokenizer/tokenizer.json" ] || "$BIN/llava-uhd" synthdoc tokenizer "$RUNS/tokenizer"
DATA=$RUNS/data/train
[ -e "$DATA/stage1.json" ] || "$BIN/llava-uhd" synthdoc data "$DATA" --split train --seed 1 --n 1600 \
  --kinds caption --colour-jitter 12 --json-name stage1.json
[ -e "$DATA/stage2.json" ] || "$BIN/llava-uhd" synthdoc data "$DATA" --split train --seed 1 --n 1600 \
  --kinds qa qa qa --colour-jitter 12 --json-name stage2.json

common=(--set "data.image_folder=$DATA/images" --set "feature_cache_dir=$RUNS/feature-cache")
# the resampler learns to keep what the frozen tower reads (the same pages; fills the feature cache)
train configs/synthdoc/stage0-resampler.yaml stage0-resampler --set "model.init_from=$RUNS/stage0/final" \
  --set "feature_cache_dir=$RUNS/feature-cache"
# stage 1: captions align the resampler to the fresh LM (and teach it its words); stage 2: the questions
train configs/synthdoc/stage1.yaml stage1 --set "model.tokenizer=$RUNS/tokenizer" \
  --set "model.init_from=$RUNS/stage0-resampler/final" --set "data.train=$DATA/stage1.json" "${common[@]}"
train configs/synthdoc/stage2.yaml stage2 --set "model.pretrained=$RUNS/stage1/final" \
  --set "data.train=$DATA/stage2.json" "${common[@]}"
echo "== done: $RUNS/stage2/final"
