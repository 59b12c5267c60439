#!/usr/bin/env bash
# The whole recipe for any captioned photo collection in one command: vocabulary -> cached features
# -> cross-entropy training -> self-critical training -> blends of the two -> dev scores -> export
# of the model and decoding that score best on dev. train_flickr8k.sh is its Flickr8k case.
#
#   bash train_recipe.sh CAPTIONS IMAGE_DIR
#
# CAPTIONS is a folder holding captions_train.json and captions_dev.json (COCO format: what
# prepro_csv.py, prepro_flickr8k.py and prepro_karpathy.py write), or a CSV / JSON Lines file of
# (file, caption) rows, converted first with prepro_csv.py's defaults (10% of the photos for dev,
# 10% for test). IMAGE_DIR holds the photos. FINETUNE=models/flickr8k starts from that model
# instead of from scratch: its vocabulary is extended with the new words and its weights trained on
# (keep its CNN and IMAGE_SIZE). Seeded. Intermediate files go to WORK_DIR (default data/recipe_work);
# the model is written to OUTPUT_DIR (default models/mine); both relative to the repo. A re-run
# with the same settings continues the run in WORK_DIR; with others it is refused unless OVERWRITE=1.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # this header and the variables below, with their defaults
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | cut -c3-; grep -E '^[A-Z_]+=\$\{' "$0"; exit 0
fi
CAPTIONS=$(realpath "${1:?usage: bash train_recipe.sh CAPTIONS IMAGE_DIR}")  # absolute: the script moves to the repo
IMAGE_DIR=$(cd "${2:?usage: bash train_recipe.sh CAPTIONS IMAGE_DIR}" && pwd)
WORK=${WORK_DIR:-data/recipe_work}
OUT=${OUTPUT_DIR:-models/mine}
FINETUNE=${FINETUNE:-}         # a model folder (encoder.ckpt, decoder.ckpt, vocab.pkl) to start from
THRESHOLD=${THRESHOLD:-5}      # words seen fewer times in the training captions become <unk>
CNN=${CNN:-efficientnet-lite1}
IMAGE_SIZE=${IMAGE_SIZE:-224}  # photos are squared to this; Lite1 at its own 240 px: same dev score, slower
EPOCHS=${EPOCHS:-4}            # cross-entropy epochs
LEARNING_RATE=${LEARNING_RATE:-0.001}  # their starting learning rate, halved every 3 epochs
SCST_STEPS=${SCST_STEPS:-720}  # self-critical batches after them, validated on dev every 60; 0: none
BLENDS=${BLENDS:-0.85}         # the self-critical model's shares in blends with the cross-entropy one,
CE_MEAN=${CE_MEAN:-3}          # whose weights are the mean of its last 3 epochs' (1: its best epoch's)
BEAMS=${BEAMS:-5}              # beam sizes scored on dev besides greedy, with each of
PENALTIES=${PENALTIES:-2}      # these length penalties and
NO_REPEATS=${NO_REPEATS:-2}    # these repeat rules (no phrase of N words twice); the best setting is exported
VAL_IMAGES=${VAL_IMAGES:-1000} # dev photos captioned after each epoch (at most those there are)
SEED=${SEED:-1}                # seeds the weights, the shuffle and the augmentation
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")"
start=$SECONDS
step() { echo; echo "== [$(( (SECONDS - start) / 60 )) min] $*"; }

# A work folder belongs to one run: its settings are recorded there. A re-run with the same settings
# continues it (finished stages are skipped, a killed one resumes); other settings are refused unless
# OVERWRITE=1, which starts the run over (the feature caches are kept while the photos, CNN and size are).
SETTINGS=(CAPTIONS IMAGE_DIR FINETUNE THRESHOLD CNN IMAGE_SIZE EPOCHS LEARNING_RATE SCST_STEPS BLENDS CE_MEAN BEAMS
          PENALTIES NO_REPEATS VAL_IMAGES SEED)
record=$WORK/recipe_settings.txt
current=$(for name in "${SETTINGS[@]}"; do printf '%s=%s\n' "$name" "${!name}"; done)
if [[ -f $record ]]; then
    changed=$(diff <(cat "$record") <(echo "$current") | sed -n 's/^> //p' | cut -d= -f1 | tr '\n' ' ' || true)
    if [[ -z $changed ]]; then
        echo "== continuing the run in $WORK (same settings): finished stages are skipped, an unfinished one resumes"
    elif [[ -n ${OVERWRITE:-} ]]; then
        echo "== OVERWRITE=1: starting the run in $WORK over (changed: $changed)"
        rm -rf "$WORK/models" "$WORK"/dev_results_* "$WORK"/dev_scores_*
        if grep -qwE 'CAPTIONS|IMAGE_DIR|CNN|IMAGE_SIZE' <<< "$changed"; then rm -rf "$WORK"/features_*; fi
    else
        name=${changed%% *}
        echo "error: $WORK holds a run with $(grep "^$name=" "$record"), not $name=${!name}: rerun with its settings" \
             "to continue it, OVERWRITE=1 to start it over with these, or another WORK_DIR" >&2
        exit 1
    fi
fi
mkdir -p "$WORK"
echo "$current" > "$record"

if [[ -f $CAPTIONS ]]; then
    step "1/7 COCO-format caption files from $CAPTIONS"
    "$PYTHON" prepro_csv.py --captions "$CAPTIONS" --image_dir "$IMAGE_DIR" --output_dir "$WORK"
    CAPTIONS=$(realpath "$WORK")
else
    step "1/7 COCO-format caption files: those in $CAPTIONS"
fi
for split in train dev; do
    [[ $CAPTIONS/captions_$split.json -ef $WORK/captions_$split.json ]] || cp "$CAPTIONS/captions_$split.json" "$WORK/"
done
if [[ -n $FINETUNE ]]; then
    step "2/7 vocabulary: $FINETUNE/vocab.pkl's words, then the new ones seen at least $THRESHOLD times in the training captions"
    extend=(--extend "$FINETUNE/vocab.pkl")
    init=(--init_from "$FINETUNE/decoder.ckpt" --init_vocab "$FINETUNE/vocab.pkl")
else
    step "2/7 vocabulary (words seen at least $THRESHOLD times in the training captions)"
    extend=() init=()
fi
"$PYTHON" build_vocab.py --caption_path "$WORK/captions_train.json" --vocab_path "$WORK/vocab.pkl" --threshold "$THRESHOLD" "${extend[@]}"
step "3/7 $CNN feature maps at $IMAGE_SIZE px of every train and dev photo"
"$PYTHON" extract_features.py --image_dir "$IMAGE_DIR" --caption_path "$WORK/captions_train.json" \
    --output_dir "$WORK/features_train" --cnn "$CNN" --image_size "$IMAGE_SIZE" --spatial
"$PYTHON" extract_features.py --image_dir "$IMAGE_DIR" --caption_path "$WORK/captions_dev.json" \
    --output_dir "$WORK/features_dev" --cnn "$CNN" --image_size "$IMAGE_SIZE" --spatial
common=(--cnn "$CNN" --decoder attention --deep_output --embed_size 512 --features "$WORK/features_train"
        --caption_path "$WORK/captions_train.json" --val_features "$WORK/features_dev"
        --val_caption_path "$WORK/captions_dev.json" --val_images "$VAL_IMAGES" --vocab_path "$WORK/vocab.pkl"
        --model_path "$WORK/models" --dropout 0.5 --num_workers 0 --log_step 50 --save_step 100000 --seed "$SEED"
        --resume latest)
step "4/7 cross-entropy training${FINETUNE:+ from $FINETUNE}, validated on the dev split after every epoch"
"$PYTHON" train.py "${common[@]}" "${init[@]}" --num_epochs "$EPOCHS" --lr_decay_every 3 --lr_decay 0.5 \
    --label_smoothing 0.1 --learning_rate "$LEARNING_RATE"
if (( SCST_STEPS > 0 )); then
    step "5/7 self-critical training (CIDEr-D reward, 5 samples per photo), $SCST_STEPS steps from the best cross-entropy epoch"
    rounds=$(( (SCST_STEPS + 59) / 60 ))  # each a random part of the photos, then validated; the best is kept
    "$PYTHON" train.py "${common[@]}" --scst --init_from "$WORK/models/decoder-best.ckpt" --num_epochs "$rounds" \
        --epoch_steps $(( SCST_STEPS / rounds )) --batch_size 250 --samples 5 --learning_rate 1e-4
    stages=(best scst-best)
    cross_entropy=("$WORK/models/decoder-best.ckpt")
    if (( CE_MEAN > 1 )); then  # each epoch's last checkpoint
        cross_entropy=()
        for (( epoch = EPOCHS > CE_MEAN ? EPOCHS - CE_MEAN + 1 : 1; epoch <= EPOCHS; epoch++ )); do
            cross_entropy+=("$(ls -v "$WORK/models/decoder-$epoch-"*.ckpt | tail -1)")
        done
    fi
    for share in $BLENDS; do  # every weight (1 - share) x cross-entropy + share x self-critical
        "$PYTHON" blend_checkpoints.py --first "${cross_entropy[@]}" \
            --second "$WORK/models/decoder-scst-best.ckpt" --weight "$share" --output "$WORK/models/decoder-blend$share.ckpt"
        stages+=("blend$share")
    done
else
    step "5/7 self-critical training: skipped (SCST_STEPS=0)"
    stages=(best)
fi
step "6/7 dev scores of each stage's best checkpoint (and each blend) with beam sizes $BEAMS, length penalties $PENALTIES and repeat rules $NO_REPEATS (greedy: logged in training)"
for stage in "${stages[@]}"; do
    for beam in $BEAMS; do
        for penalty in $PENALTIES; do
            for no_repeat in $NO_REPEATS; do
                name="$stage-beam$beam-lp$penalty-nr$no_repeat"
                "$PYTHON" evaluate.py --caption_path "$WORK/captions_dev.json" --features "$WORK/features_dev" \
                    --encoder_path "$WORK/models/encoder-$stage.ckpt" --decoder_path "$WORK/models/decoder-$stage.ckpt" \
                    --vocab_path "$WORK/vocab.pkl" --beam_size "$beam" --length_penalty "$penalty" --no_repeat "$no_repeat" \
                    --output "$WORK/dev_results_$name.json" --scores "$WORK/dev_scores_$name.json"
            done
        done
    done
done
# The model and decoding (greedy with training's repeat rule, from the training logs, or one of
# BEAMS x PENALTIES x NO_REPEATS) with the best dev CIDEr.
read -r best beam penalty no_repeat cider < <("$PYTHON" -c "import json
from decoding import Decoding
logs = {'best': 'train_log.jsonl', 'scst-best': 'scst_log.jsonl'}
found = []
for stage in '${stages[*]}'.split():
    if stage in logs:  # blends were never decoded greedily
        log = map(json.loads, open('$WORK/models/' + logs[stage]))
        found.append((stage, 1, 1, Decoding.no_repeat, max(r['CIDEr'] for r in log if 'CIDEr' in r)))
    for beam in '$BEAMS'.split():
        for penalty in '$PENALTIES'.split():
            for no_repeat in '$NO_REPEATS'.split():
                scores = json.load(open(f'$WORK/dev_scores_{stage}-beam{beam}-lp{penalty}-nr{no_repeat}.json'))
                found.append((stage, beam, penalty, no_repeat, scores['CIDEr']))
*best, cider = max(found, key=lambda f: f[4])
print(*best, f'{cider:.3f}')")
dev_sets=("$WORK"/captions_dev_*.json)  # one file per dev collection (prepro_merge.py), scored side by side
[[ -e ${dev_sets[0]} ]] || dev_sets=("$WORK/captions_dev.json")
step "7/7 the $best model's dev scores, decoding with beam $beam, length penalty $penalty and no_repeat $no_repeat (dev CIDEr $cider), then its export as float16"
card=$WORK/model_card.md
{
    echo "# $(basename "$OUT"): a captioning model trained by train_recipe.sh"
    echo
    echo "$CNN + soft-attention LSTM, the repo's recipe: $EPOCHS cross-entropy epochs${FINETUNE:+ from $FINETUNE}," \
         "then $SCST_STEPS self-critical steps; exported: the $best checkpoint, beam $beam, length penalty $penalty," \
         "no_repeat $no_repeat. It knows the photos it was trained on and little else."
    echo
    echo "| data | photos | captions |"; echo "| --- | --- | --- |"
    for split in train dev; do
        "$PYTHON" -c "import json; d = json.load(open('$WORK/captions_$split.json'))
print(f'| $split | {len(d[\"images\"])} | {len(d[\"annotations\"])} |')"
    done
    echo
    echo "| dev set | photos | BLEU-4 | CIDEr |"; echo "| --- | --- | --- | --- |"
    for dev in "${dev_sets[@]}"; do
        name=$(basename "$dev" .json)
        "$PYTHON" evaluate.py --caption_path "$dev" --features "$WORK/features_dev" \
            --encoder_path "$WORK/models/encoder-$best.ckpt" --decoder_path "$WORK/models/decoder-$best.ckpt" \
            --vocab_path "$WORK/vocab.pkl" --beam_size "$beam" --length_penalty "$penalty" --no_repeat "$no_repeat" \
            --output "$WORK/final_results_$name.json" --scores "$WORK/final_scores_$name.json" > /dev/null
        "$PYTHON" -c "import json; s = json.load(open('$WORK/final_scores_$name.json'))
n = len(json.load(open('$WORK/final_results_$name.json')))
print(f'| ${name#captions_} | {n} | {s[\"Bleu_4\"]:.3f} | {s[\"CIDEr\"]:.3f} |')"
    done
    echo
    echo "Trained in $(( (SECONDS - start) / 60 )) min with:"
    echo
    echo '```'
    grep -vE '^(CAPTIONS|IMAGE_DIR)=|=$' "$record" | tr '\n' ' '  # the settings as given (CAPTIONS: the file or folder named)
    echo "bash train_recipe.sh $(sed -n 's/^CAPTIONS=//p' "$record") $(sed -n 's/^IMAGE_DIR=//p' "$record")"
    echo '```'
} > "$card"
sed -n '/^| dev set/,/^$/p' "$card"
card_as=README.md  # unless OUT holds a model card of its own (models/flickr8k's), which is kept
if [[ -f $OUT/README.md ]] && ! head -1 "$OUT/README.md" | grep -q 'trained by train_recipe.sh'; then card_as=training.md; fi
"$PYTHON" export_model.py --encoder_path "$WORK/models/encoder-$best.ckpt" \
    --decoder_path "$WORK/models/decoder-$best.ckpt" --vocab_path "$WORK/vocab.pkl" --output_dir "$OUT" \
    --beam_size "$beam" --length_penalty "$penalty" --no_repeat "$no_repeat" --card "$card" --card_as "$card_as"
step "done: $OUT (what it was trained on and its dev scores: $OUT/$card_as)"
