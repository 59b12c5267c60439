#!/usr/bin/env bash
# Reproduce the shipped model models/flickr8k/ from the official Flickr8k files, with this repo's
# own scripts: converter -> vocabulary -> cached features -> cross-entropy training ->
# self-critical training -> dev scores -> export with the decoding that scores best on dev.
#
#   bash train_flickr8k.sh DATA_DIR      # DATA_DIR holds Flickr8k.token.txt, the split lists and Images/
#
# Seeded. Intermediate files go to WORK_DIR (default data/flickr8k_work); the model is written to
# OUTPUT_DIR (default models/flickr8k); both relative to the repo. PYTHON names the interpreter.
set -euo pipefail
DATA_DIR=$(cd "${1:?usage: bash train_flickr8k.sh DATA_DIR}" && pwd)  # absolute: the script moves to the repo
WORK=${WORK_DIR:-data/flickr8k_work}
OUT=${OUTPUT_DIR:-models/flickr8k}
CNN=${CNN:-efficientnet-lite0}
EPOCHS=${EPOCHS:-5}            # cross-entropy epochs
SCST_EPOCHS=${SCST_EPOCHS:-1}  # self-critical epochs after them (0: none)
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")"
start=$SECONDS
step() { echo; echo "== [$(( (SECONDS - start) / 60 )) min] $*"; }

step "1/7 COCO-format caption files"
"$PYTHON" prepro_flickr8k.py --data_dir "$DATA_DIR" --output_dir "$WORK"
step "2/7 vocabulary (words seen at least 5 times in the training captions)"
"$PYTHON" build_vocab.py --caption_path "$WORK/captions_train.json" --vocab_path "$WORK/vocab.pkl" --threshold 5
step "3/7 $CNN feature maps of every train photo and its mirror image, and of every dev photo"
"$PYTHON" extract_features.py --image_dir "$DATA_DIR/Images" --caption_path "$WORK/captions_train.json" \
    --output_dir "$WORK/features_train" --cnn "$CNN" --flip --spatial
"$PYTHON" extract_features.py --image_dir "$DATA_DIR/Images" --caption_path "$WORK/captions_dev.json" \
    --output_dir "$WORK/features_dev" --cnn "$CNN" --spatial
common=(--cnn "$CNN" --decoder attention --embed_size 512 --features "$WORK/features_train"
        --caption_path "$WORK/captions_train.json" --val_features "$WORK/features_dev"
        --val_caption_path "$WORK/captions_dev.json" --val_images 1000 --vocab_path "$WORK/vocab.pkl"
        --model_path "$WORK/models" --dropout 0.5 --num_workers 0 --log_step 50 --save_step 100000 --seed 1
        --resume latest)
step "4/7 cross-entropy training, validated on the dev split after every epoch"
"$PYTHON" train.py "${common[@]}" --num_epochs "$EPOCHS" --lr_decay_every 3 --lr_decay 0.5
if (( SCST_EPOCHS > 0 )); then
    step "5/7 self-critical training (CIDEr-D reward, 5 samples per image) from the best cross-entropy epoch"
    "$PYTHON" train.py "${common[@]}" --scst --init_from "$WORK/models/decoder-best.ckpt" --num_epochs "$SCST_EPOCHS" \
        --batch_size 250 --samples 5 --learning_rate 1e-4
else
    step "5/7 self-critical training: skipped (SCST_EPOCHS=0)"
fi
# The better of the two stages by greedy dev CIDEr (logged after every epoch), and that CIDEr.
read -r best greedy < <("$PYTHON" -c "import json
def cider(log): return max(r['CIDEr'] for r in map(json.loads, open('$WORK/models/' + log)) if 'CIDEr' in r)
ce, scst = cider('train_log.jsonl'), cider('scst_log.jsonl') if $SCST_EPOCHS > 0 else -1
print(*(('scst-best', scst) if scst > ce else ('best', ce)))")
step "6/7 dev scores of the $best checkpoint (greedy dev CIDEr $greedy) with beam 3"
"$PYTHON" evaluate.py --caption_path "$WORK/captions_dev.json" --image_dir "$DATA_DIR/Images" \
    --encoder_path "$WORK/models/encoder-$best.ckpt" --decoder_path "$WORK/models/decoder-$best.ckpt" \
    --vocab_path "$WORK/vocab.pkl" --beam_size 3 --length_penalty 1 \
    --output "$WORK/dev_results_beam3.json" --scores "$WORK/dev_scores_beam3.json"
beam=$("$PYTHON" -c "import json; print(1 if $greedy > json.load(open('$WORK/dev_scores_beam3.json'))['CIDEr'] else 3)")
step "7/7 export as float16, decoding with beam $beam (the better dev CIDEr) and length penalty 1"
"$PYTHON" export_model.py --encoder_path "$WORK/models/encoder-$best.ckpt" \
    --decoder_path "$WORK/models/decoder-$best.ckpt" --vocab_path "$WORK/vocab.pkl" --output_dir "$OUT" \
    --beam_size "$beam" --length_penalty 1
step "done: $OUT"
