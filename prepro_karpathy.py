"""Turn one of Karpathy's split files into COCO-format caption files for train, val and test.

Karpathy's `dataset_coco.json` / `dataset_flickr8k.json` / `dataset_flickr30k.json`
list images with their `split` (train, restval, val, test), `filename`, for COCO a
`filepath` (train2014 or val2014), and `sentences[].raw`. This writes
`captions_karpathy_{train,val,test}.json` (restval joined to train), with
`file_name` = `filepath/filename`, so `--image_dir` is the folder holding
`train2014/` and `val2014/` (or the Flickr `Images/` folder). Image ids are COCO's
`cocoid` where present, else the file's `imgid`.
"""
import os
import sys

from caption_files import read_json, write_coco
from errors import InputError, script_parser

SPLIT_OF = {'train': 'train', 'restval': 'train', 'val': 'val', 'test': 'test'}


def read_karpathy(path):
    """({split: [file_name, ...]}, {file_name: [caption, ...]}, {file_name: image id}) from a split file."""
    data = read_json(path, 'split file')
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
        raise InputError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    splits, captions, ids = {'train': [], 'val': [], 'test': []}, {}, {}
    for i, image in enumerate(data['images']):
        try:
            name = os.path.join(image.get('filepath', ''), image['filename'])
            split = SPLIT_OF[image['split']]
            sentences = [s['raw'].strip() for s in image['sentences']]
            ids[name] = image.get('cocoid', image.get('imgid', i))
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: images[{i}] lacks 'filename', a known 'split' or 'sentences' ({e})") from None
        splits[split].append(name)
        captions[name] = sentences
    return splits, captions, ids


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--split_file', default='data/dataset_coco.json', help="Karpathy's dataset_*.json")
    parser.add_argument('--output_dir', default='data/karpathy', help='where to write captions_karpathy_*.json')
    args = parser.parse_args(argv)
    try:
        splits, captions, ids = read_karpathy(args.split_file)
    except InputError as e:
        sys.exit(f'error: {e}')
    os.makedirs(args.output_dir, exist_ok=True)
    for split, names in splits.items():
        out = os.path.join(args.output_dir, f'captions_karpathy_{split}.json')
        n_images, n_captions = write_coco(out, names, captions, ids)
        print(f'{split}: {n_images} images, {n_captions} captions -> {out}')


if __name__ == '__main__':
    main()
