#!/usr/bin/env bash
# Reproduce the shipped model models/flickr8k/ from the official Flickr8k files: train_recipe.sh's
# stages on Flickr8k's captions, after prepro_flickr8k.py has converted them.
#
#   bash train_flickr8k.sh DATA_DIR      # DATA_DIR holds Flickr8k.token.txt, the split lists and Images/
#
# Seeded. Intermediate files go to WORK_DIR (default data/flickr8k_work); the model is written to
# OUTPUT_DIR (default models/flickr8k); both relative to the repo. train_recipe.sh's variables
# (EPOCHS, SCST_STEPS, BEAMS, ...) apply; PYTHON names the interpreter.
set -euo pipefail
DATA_DIR=$(cd "${1:?usage: bash train_flickr8k.sh DATA_DIR}" && pwd)  # absolute: the script moves to the repo
cd "$(dirname "$0")"
export WORK_DIR=${WORK_DIR:-data/flickr8k_work} OUTPUT_DIR=${OUTPUT_DIR:-models/flickr8k} THRESHOLD=${THRESHOLD:-5}
echo "== Flickr8k's captions in COCO format"
"${PYTHON:-python}" prepro_flickr8k.py --data_dir "$DATA_DIR" --output_dir "$WORK_DIR"
exec bash train_recipe.sh "$WORK_DIR" "$DATA_DIR/Images"
