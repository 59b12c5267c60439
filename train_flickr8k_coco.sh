#!/usr/bin/env bash
# Rebuild the shipped model models/flickr8k_coco/: train_recipe.sh's stages on Flickr8k's training
# photos and the COCO photos that coco_ids.json lists (130 of train2017, 891 of val2014), chosen on
# two dev sets side by side (Flickr8k's 1,000 dev photos and 289 of COCO val2017), never trained on.
#
#   bash train_flickr8k_coco.sh FLICKR8K_DIR COCO_DIR
#
# FLICKR8K_DIR holds Flickr8k.token.txt, the split lists and Images/; COCO_DIR holds COCO's own
# annotations/captions_{train2017,val2014,val2017}.json and the folders train2017/, val2014/ and
# val2017/ (only the listed photos are read; the caption files may be the official ones or any
# superset of the listed images). Seeded. Intermediate files go to WORK_DIR (default
# data/flickr8k_coco_work); the model is written to OUTPUT_DIR (default models/flickr8k_coco).
# train_recipe.sh's variables (EPOCHS, SCST_STEPS, ...) apply; PYTHON names the interpreter.
set -euo pipefail
FLICKR8K=$(cd "${1:?usage: bash train_flickr8k_coco.sh FLICKR8K_DIR COCO_DIR}" && pwd)  # absolute: the script moves
COCO=$(cd "${2:?usage: bash train_flickr8k_coco.sh FLICKR8K_DIR COCO_DIR}" && pwd)
TRAIN2017=${COCO_TRAIN2017_CAPTIONS:-$COCO/annotations/captions_train2017.json}
VAL2014=${COCO_VAL2014_CAPTIONS:-$COCO/annotations/captions_val2014.json}
VAL2017=${COCO_VAL2017_CAPTIONS:-$COCO/annotations/captions_val2017.json}
cd "$(dirname "$0")"
export WORK_DIR=${WORK_DIR:-data/flickr8k_coco_work} OUTPUT_DIR=${OUTPUT_DIR:-models/flickr8k_coco}
export THRESHOLD=${THRESHOLD:-5} VAL_IMAGES=${VAL_IMAGES:-1289}  # every photo of both dev sets
PYTHON=${PYTHON:-python}
echo "== Flickr8k's captions in COCO format, then merged with COCO's listed photos"
"$PYTHON" prepro_flickr8k.py --data_dir "$FLICKR8K" --output_dir "$WORK_DIR/flickr8k"
"$PYTHON" prepro_merge.py --output_dir "$WORK_DIR" --ids coco_ids.json \
    --set flickr8k train "$WORK_DIR/flickr8k/captions_train.json" "$FLICKR8K/Images" \
    --set coco_train2017 train "$TRAIN2017" "$COCO/train2017" \
    --set coco_val2014 train "$VAL2014" "$COCO/val2014" \
    --set flickr8k_dev dev "$WORK_DIR/flickr8k/captions_dev.json" "$FLICKR8K/Images" \
    --set coco_val2017 dev "$VAL2017" "$COCO/val2017"
exec bash train_recipe.sh "$WORK_DIR" "$WORK_DIR/images"
