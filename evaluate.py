"""Caption a split and score it with the standard COCO caption metrics.

BLEU-1..4, METEOR, ROUGE-L and CIDEr (and SPICE when its models are installed) are
computed by pycocoevalcap's own scorers on captions tokenised by its PTB tokenizer,
as papers report them. The tokenizer, METEOR and SPICE run on Java; without `java`
the tokenizer is approximated in Python and METEOR and SPICE are skipped (said so).

    python evaluate.py --caption_path ANN.json --image_dir DIR --output results.json --scores scores.json
    python evaluate.py --caption_path ANN.json --features CACHE --output results.json --scores scores.json
    python evaluate.py --caption_path ANN.json --results results.json --scores scores.json

With --features, the split's images are read from a feature cache that extract_features.py made
with the model's backbone, input size and normalisation: only the decoder runs, so comparing
beam sizes or length penalties takes seconds per setting instead of a pass of the backbone.
"""
import json
import os
import sys

from tqdm import tqdm

from captioner import Captioner, add_model_args
from caption_files import group_captions, read_captions, read_results, write_results
from data_loader import FeatureDataset, image_batches, read_feature_index
from errors import InputError, integer, script_parser
from images import ImageError
from metrics import bootstrap_intervals, score


def caption_split(captioner, images, image_dir, batch_size=16, num_workers=2):
    """Caption every image of {image_id: file_name} found in image_dir; returns {image_id: caption}."""
    present = {i: os.path.join(image_dir, name) for i, name in images.items()
               if os.path.isfile(os.path.join(image_dir, name))}
    if len(present) < len(images):
        print(f'warning: {len(images) - len(present)} of {len(images)} images are not in {image_dir}; '
              f'they are not scored', file=sys.stderr)
    by_path = {path: i for i, path in present.items()}
    predictions = {}
    for path, caption in captioner.caption_files(list(present.values()), batch_size, num_workers):
        if isinstance(caption, ImageError):
            tqdm.write(f'warning: skipped {caption}', file=sys.stderr)  # on a line of its own, not the bar's
        else:
            predictions[by_path[path]] = caption
    return predictions


def caption_cache(captioner, caption_path, folder, batch_size=64):
    """Caption the split's images from a feature cache made for this model; returns {image_id: caption}."""
    config = captioner.config
    index = read_feature_index(folder, config.cnn, captioner.has_attention)
    cached = (index['image_size'], tuple(index['mean']), tuple(index['std']))
    if cached != (config.image_size, config.mean, config.std):
        raise InputError(f'{folder}: cached at input size {cached[0]} with normalisation {cached[1:]}, but the '
                         f'model reads {config.image_size} with {(config.mean, config.std)}')
    dataset = FeatureDataset(folder, caption_path, captioner.vocab)
    return captioner.caption_images(image_batches(dataset, batch_size=batch_size), cached=True)


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--caption_path', default='data/annotations/captions_val2014.json',
                        help='COCO-format reference captions of the split')
    parser.add_argument('--image_dir', default='data/val2014', help="the split's images")
    parser.add_argument('--features', help="caption from this feature cache of the split's images "
                                           '(extract_features.py) instead of --image_dir')
    parser.add_argument('--results', help='score this existing results file instead of captioning')
    parser.add_argument('--output', help='write the predictions here (COCO results: image_id, file_name, caption)')
    parser.add_argument('--scores', help='write the scores here (JSON)')
    parser.add_argument('--bootstrap', type=integer(0, 100_000), default=0,
                        help='also give 95%% intervals of BLEU-4, METEOR and CIDEr from this many resamples of the '
                             'images (0 = none; 1000 is usual)')
    add_model_args(parser)
    args = parser.parse_args(argv)
    try:
        annotations, images = read_captions(args.caption_path)
        if args.results:
            predictions = read_results(args.results, images)
        else:
            captioner = Captioner.from_args(args)
            predictions = caption_cache(captioner, args.caption_path, args.features, args.batch_size) \
                if args.features else caption_split(captioner, images, args.image_dir, args.batch_size,
                                                    args.num_workers)
            if args.output:
                write_results(args.output, [(i, images[i], c) for i, c in predictions.items()])
    except InputError as e:
        sys.exit(f'error: {e}')
    references = group_captions((a['image_id'], a['caption']) for a in annotations)
    count = sum(1 for i in predictions if i in references)
    if not count:
        sys.exit(f'error: no prediction has references in {args.caption_path}')
    print(f'scoring {count} images that have both a prediction and references', file=sys.stderr)
    scores = score(references, predictions)
    intervals = bootstrap_intervals(references, predictions, args.bootstrap) if args.bootstrap else {}
    if args.scores:
        with open(args.scores, 'w') as f:
            json.dump({**scores, **{f'{name}_95': list(bounds) for name, bounds in intervals.items()}}, f, indent=1)
    print(f'{"metric":<8} {"score":>7}   ({count} images' + (f'; 95% interval, {args.bootstrap} bootstrap resamples '
                                                           'of the images)' if intervals else ')'))
    for name, value in scores.items():
        bounds = f'   [{intervals[name][0]:.4f}, {intervals[name][1]:.4f}]' if name in intervals else ''
        print(f'{name:<8} {value:7.4f}{bounds}')
    written = [f'{what} in {path}' for what, path in (('predictions', args.output), ('scores', args.scores)) if path]
    if written:
        print(f'wrote {" and ".join(written)}', file=sys.stderr)


if __name__ == '__main__':
    main()
