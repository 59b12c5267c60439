#!/usr/bin/env bash
# Reproduce the shipped model models/flickr8k/ from the official Flickr8k files, with this repo's
# own scripts: converter -> vocabulary -> cached features -> training -> export -> evaluation.
#
#   bash train_flickr8k.sh DATA_DIR      # DATA_DIR holds Flickr8k.token.txt, the split lists and Images/
#
# Seeded; 29 minutes on 2 quiet CPU cores here (features 6, training 21, export and scoring 2).
# Intermediate files go to WORK_DIR (default data/flickr8k_work); the model is written to OUTPUT_DIR
# (default models/flickr8k); both relative to the repo.
set -euo pipefail
DATA_DIR=$(cd "${1:?usage: bash train_flickr8k.sh DATA_DIR}" && pwd)  # absolute: the script moves to the repo
WORK=${WORK_DIR:-data/flickr8k_work}
OUT=${OUTPUT_DIR:-models/flickr8k}
EPOCHS=${EPOCHS:-5}
PYTHON=${PYTHON:-python}  # the interpreter to run the steps with
cd "$(dirname "$0")"
start=$SECONDS
step() { echo; echo "== [$(( (SECONDS - start) / 60 )) min] $*"; }

step "1/6 COCO-format caption files"
"$PYTHON" prepro_flickr8k.py --data_dir "$DATA_DIR" --output_dir "$WORK"
step "2/6 vocabulary (words seen at least 5 times in the training captions)"
"$PYTHON" build_vocab.py --caption_path "$WORK/captions_train.json" --vocab_path "$WORK/vocab.pkl" --threshold 5
step "3/6 efficientnet-lite0 7x7 feature maps of every train photo and its mirror image, and of every dev photo"
"$PYTHON" extract_features.py --image_dir "$DATA_DIR/Images" --caption_path "$WORK/captions_train.json" \
    --output_dir "$WORK/features_train" --cnn efficientnet-lite0 --image_size 224 --flip --spatial
"$PYTHON" extract_features.py --image_dir "$DATA_DIR/Images" --caption_path "$WORK/captions_dev.json" \
    --output_dir "$WORK/features_dev" --cnn efficientnet-lite0 --image_size 224 --spatial
step "4/6 training the attention decoder, validated on the dev split after every epoch"
"$PYTHON" train.py --cnn efficientnet-lite0 --decoder attention --embed_size 512 --features "$WORK/features_train" \
    --caption_path "$WORK/captions_train.json" --val_features "$WORK/features_dev" \
    --val_caption_path "$WORK/captions_dev.json" --val_images 1000 --vocab_path "$WORK/vocab.pkl" \
    --model_path "$WORK/models" --num_epochs "$EPOCHS" --dropout 0.5 --lr_decay_every 3 --lr_decay 0.5 \
    --num_workers 0 --log_step 50 --save_step 100000 --seed 1 --resume latest
step "5/6 export the best epoch (by dev CIDEr) as float16 with its decode settings"
"$PYTHON" export_model.py --encoder_path "$WORK/models/encoder-best.ckpt" --decoder_path "$WORK/models/decoder-best.ckpt" \
    --vocab_path "$WORK/vocab.pkl" --output_dir "$OUT" --beam_size 3 --length_penalty 1
step "6/6 dev-split scores of the exported model, greedy and beam 3"
for beam in 1 3; do
    "$PYTHON" evaluate.py --caption_path "$WORK/captions_dev.json" --image_dir "$DATA_DIR/Images" \
        --encoder_path "$OUT/encoder.ckpt" --decoder_path "$OUT/decoder.ckpt" --vocab_path "$OUT/vocab.pkl" \
        --beam_size $beam --output "$WORK/dev_results_beam$beam.json" --scores "$WORK/dev_scores_beam$beam.json"
done
step "done: $OUT"
