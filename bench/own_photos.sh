#!/usr/bin/env bash
# Fine-tuning the shipped model against training from scratch on a small collection of your own:
# the photos of CSV (file, caption rows) are split once (prepro_csv.py --dev DEV --test TEST), and
# train_recipe.sh trains on the training photos from scratch and from models/flickr8k (FINETUNE),
# with SEEDS seeds each and the same epochs; the test split's CIDEr, BLEU-4 and METEOR of each
# model, and of the shipped model as it is, are printed.
#
#   bash bench/own_photos.sh CSV IMAGE_DIR [WORK]      # e.g. 200 training photos: DEV=43 TEST=50
set -euo pipefail
CSV=$(realpath "$1") IMAGES=$(cd "$2" && pwd)
cd "$(dirname "$0")/.."
WORK=${3:-data/own_photos}
DEV=${DEV:-43} TEST=${TEST:-50} SEEDS=${SEEDS:-1 2 3} PYTHON=${PYTHON:-python}
export EPOCHS=${EPOCHS:-15} THRESHOLD=${THRESHOLD:-2} SCST_STEPS=${SCST_STEPS:-0} PYTHON
"$PYTHON" prepro_csv.py --captions "$CSV" --image_dir "$IMAGES" --output_dir "$WORK/split" --dev "$DEV" --test "$TEST"
for split in train dev test; do  # one feature cache for every run (the shipped model's backbone and size)
    "$PYTHON" extract_features.py --image_dir "$IMAGES" --caption_path "$WORK/split/captions_$split.json" \
        --output_dir "$WORK/features_$split" --cnn efficientnet-lite1 --image_size 224 --spatial
done
test_scores() {  # MODEL_DIR NAME: score a model on the test split from the cache
    "$PYTHON" evaluate.py --caption_path "$WORK/split/captions_test.json" --features "$WORK/features_test" \
        --encoder_path "$1/encoder.ckpt" --decoder_path "$1/decoder.ckpt" --vocab_path "$1/vocab.pkl" \
        --output "$WORK/test_results_$2.json" --scores "$WORK/test_scores_$2.json" > /dev/null
}
test_scores models/flickr8k shipped
for seed in $SEEDS; do
    for way in scratch finetune; do
        run=$WORK/$way-$seed
        mkdir -p "$run/work"
        for split in train dev; do
            ln -sfn "$(realpath "$WORK/features_$split")" "$run/work/features_$split"
        done
        start=$SECONDS
        SEED=$seed FINETUNE=$([[ $way == finetune ]] && echo models/flickr8k || true) WORK_DIR=$run/work \
            OUTPUT_DIR=$run/model bash train_recipe.sh "$WORK/split" "$IMAGES" > "$run/log.txt" 2>&1
        echo "$way seed $seed: trained in $(( SECONDS - start )) s"
        test_scores "$run/model" "$way-$seed"
    done
done
"$PYTHON" - "$WORK" $SEEDS <<'PY'
import json, statistics, sys
work, seeds = sys.argv[1], sys.argv[2:]
print(f'{"model":<22}{"CIDEr":>8}{"BLEU-4":>8}{"METEOR":>8}')
for name in ['shipped'] + [f'{way}-{s}' for way in ('scratch', 'finetune') for s in seeds]:
    s = json.load(open(f'{work}/test_scores_{name}.json'))
    print(f'{name:<22}{s["CIDEr"]:8.3f}{s["Bleu_4"]:8.3f}{s.get("METEOR", float("nan")):8.3f}')
for way in ('scratch', 'finetune'):
    cider = [json.load(open(f'{work}/test_scores_{way}-{s}.json'))['CIDEr'] for s in seeds]
    print(f'{way} mean CIDEr {statistics.mean(cider):.3f} (min {min(cider):.3f}, max {max(cider):.3f})')
PY
