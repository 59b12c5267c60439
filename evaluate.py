"""Caption a split and score it with the standard COCO caption metrics.

BLEU-1..4, METEOR, ROUGE-L and CIDEr (and SPICE when its models are installed) are
computed by pycocoevalcap's own scorers on captions tokenised by its PTB tokenizer,
as papers report them. The tokenizer, METEOR and SPICE run on Java; without `java`
the tokenizer is approximated in Python and METEOR and SPICE are skipped (said so).

    python evaluate.py --caption_path ANN.json --image_dir DIR --output results.json --scores scores.json
    python evaluate.py --caption_path ANN.json --results results.json --scores scores.json
"""
import argparse
import contextlib
import json
import os
import shutil
import sys

from build_vocab import CaptionFileError, VocabularyError, read_captions, read_json, tokenize
from model import CheckpointError, pick_device
from resize import ImageError
from sample import add_model_args, caption_files, load_model

METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE')
# What pycocoevalcap's PTB tokenizer drops after tokenising.
PUNCTUATION = {"''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',', ':', '-', '--',
               '...', ';', '(', ')', '[', ']', '{', '}'}


def tokenize_for_scoring(captions):
    """{id: [caption]} -> {id: [tokenised caption]}: the PTB tokenizer, or its Python stand-in without Java."""
    if shutil.which('java'):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{'caption': c} for c in v] for k, v in captions.items()})
    return {k: [' '.join(w for w in tokenize(c) if w not in PUNCTUATION) for c in v] for k, v in captions.items()}


def _spice_ready():
    """SPICE downloads Stanford CoreNLP on first use; only run it when that is already done."""
    import pycocoevalcap.spice as spice
    return os.path.exists(os.path.join(os.path.dirname(spice.__file__), 'lib', 'stanford-corenlp-3.6.0.jar'))


def score(references, predictions, metrics=METRICS):
    """Score {image_id: caption} against {image_id: [reference captions]} with pycocoevalcap's scorers.

    Only images with both a prediction and references are scored. Returns {metric: value};
    messages (and the scorers' own progress output) go to stderr.
    """
    log = sys.stderr
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    ids = [i for i in predictions if i in references]
    java = shutil.which('java') is not None
    if not java:
        print('java not found: the PTB tokenizer is approximated in Python; METEOR and SPICE skipped '
              '(install a Java runtime for the official figures)', file=log)
    with contextlib.redirect_stdout(log):  # the scorers print their progress on stdout
        gts = tokenize_for_scoring({i: references[i] for i in ids})
        res = tokenize_for_scoring({i: [predictions[i]] for i in ids})
        scores = {}
        if any(m.startswith('Bleu') for m in metrics):
            bleu, _ = Bleu(4).compute_score(gts, res)
            scores.update({f'Bleu_{n}': bleu[n - 1] for n in range(1, 5)})
        if 'METEOR' in metrics and java:
            from pycocoevalcap.meteor.meteor import Meteor
            scores['METEOR'], _ = Meteor().compute_score(gts, res)
        if 'ROUGE_L' in metrics:
            scores['ROUGE_L'], _ = Rouge().compute_score(gts, res)
        if 'CIDEr' in metrics:
            scores['CIDEr'], _ = Cider().compute_score(gts, res)
        if 'SPICE' in metrics and java:
            if not _spice_ready():
                print('SPICE skipped: its Stanford CoreNLP models are not installed (pycocoevalcap fetches them '
                      'with: python -c "from pycocoevalcap.spice.get_stanford_models import get_stanford_models; '
                      'get_stanford_models()")', file=log)
            else:
                try:
                    from pycocoevalcap.spice.spice import Spice
                    scores['SPICE'], _ = Spice().compute_score(gts, res)
                except Exception as e:  # noqa: BLE001 -- SPICE's Java side fails in many ways; skip it then
                    print(f'SPICE skipped: it failed ({type(e).__name__}: {e})', file=log)
    return {k: float(scores[k]) for k in METRICS if k in scores}


def read_results(path, images):
    """A COCO results file [{"image_id", "caption"}] -> {image_id: caption}, checked against `images`."""
    results = read_json(path, 'results file')
    if not isinstance(results, list):
        raise CaptionFileError(f'{path}: not a COCO results file (a list of {{"image_id", "caption"}})')
    predictions = {}
    for i, result in enumerate(results):
        if not isinstance(result, dict) or 'image_id' not in result or not isinstance(result.get('caption'), str):
            raise CaptionFileError(f"{path}: [{i}] lacks an 'image_id' or a 'caption' string")
        image_id = result['image_id']
        if image_id not in images:
            raise CaptionFileError(f'{path}: [{i}] image_id {image_id!r} is not in the annotations')
        if image_id in predictions:
            raise CaptionFileError(f'{path}: image_id {image_id!r} has more than one caption')
        predictions[image_id] = result['caption']
    return predictions


def caption_split(images, image_dir, vocab, encoder, decoder, config, device, batch_size=16, num_workers=2,
                  progress=True):
    """Caption every image of {image_id: file_name} found in image_dir; returns {image_id: caption}."""
    present = {i: os.path.join(image_dir, name) for i, name in images.items()
               if os.path.isfile(os.path.join(image_dir, name))}
    if len(present) < len(images):
        print(f'warning: {len(images) - len(present)} of {len(images)} images are not in {image_dir}; '
              f'they are not scored', file=sys.stderr)
    by_path = {path: i for i, path in present.items()}
    predictions = {}
    for path, caption in caption_files(list(present.values()), vocab, encoder, decoder, config, device,
                                       batch_size, num_workers, progress):
        if isinstance(caption, ImageError):
            print(f'warning: skipped {caption}', file=sys.stderr)
        else:
            predictions[by_path[path]] = caption
    return predictions


def print_table(scores, count):
    print(f'{"metric":<8} {"score":>7}   ({count} images)')
    for name, value in scores.items():
        print(f'{name:<8} {value:7.4f}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--caption_path', default='data/annotations/captions_val2014.json',
                        help='COCO-format reference captions of the split')
    parser.add_argument('--image_dir', default='data/val2014', help="the split's images")
    parser.add_argument('--results', help='score this existing results file instead of captioning')
    parser.add_argument('--output', default='results.json', help='where to write the predictions (COCO results)')
    parser.add_argument('--scores', default='scores.json', help='where to write the scores (JSON)')
    add_model_args(parser)
    args = parser.parse_args(argv)
    try:
        annotations, images = read_captions(args.caption_path)
        if args.results:
            predictions = read_results(args.results, images)
        else:
            device = pick_device(args.device)
            vocab, encoder, decoder, config = load_model(args, device)
            predictions = caption_split(images, args.image_dir, vocab, encoder, decoder, config, device,
                                        args.batch_size, args.num_workers)
            with open(args.output, 'w') as f:
                json.dump([{'image_id': i, 'caption': c} for i, c in predictions.items()], f)
    except (CaptionFileError, VocabularyError, CheckpointError) as e:
        sys.exit(f'error: {e}')
    references = {}
    for ann in annotations:
        references.setdefault(ann['image_id'], []).append(ann['caption'])
    count = sum(1 for i in predictions if i in references)
    if not count:
        sys.exit(f'error: no prediction has references in {args.caption_path}')
    print(f'scoring {count} images that have both a prediction and references', file=sys.stderr)
    scores = score(references, predictions)
    with open(args.scores, 'w') as f:
        json.dump(scores, f, indent=1)
    print_table(scores, count)


if __name__ == '__main__':
    main()
