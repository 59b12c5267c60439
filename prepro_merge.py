"""Merge several captioned photo collections into one set of caption files, for training on all of them.

Each --set names a collection, the split it goes to, its COCO-format caption file and its image
folder. Its photos become `NAME/FILE` under --output_dir/images, where NAME is a link to the
collection's folder, so that every script reads the merged set with one --image_dir. Image ids
are renumbered from 1 (each image keeps its collection and its original id); with --ids, a
collection named in that JSON file ({NAME: [image ids]}) keeps only the listed images, so a
subset of COCO's official caption files is rebuilt exactly. Writes captions_train.json and
captions_dev.json (every set of that split), and captions_dev_NAME.json for each dev set, to score
the sets side by side.

    python prepro_merge.py --output_dir data/merged --ids coco_ids.json \\
        --set flickr8k train data/flickr8k/captions_train.json data/flickr8k/Images \\
        --set coco_val2014 train data/annotations/captions_val2014.json data/val2014 ...
"""
import json
import os
import re
import sys

from caption_files import group_captions, read_captions, read_json
from errors import InputError, script_parser
from files import atomic_write


def read_set(name, caption_path, image_dir, ids=None):
    """[(file name, original id, [captions])] of one collection: its images with captions (only
    those of `ids`, when given), each image once, in the caption file's order."""
    if not os.path.isdir(image_dir):
        raise InputError(f'{image_dir}: no such image folder (for --set {name})')
    annotations, images = read_captions(caption_path)
    if ids is not None:
        missing = sorted(set(ids) - set(images))
        if missing:
            raise InputError(f'{caption_path}: lacks {len(missing)} of the {len(ids)} images listed for {name} '
                             f'(first: {missing[0]})')
        images = {i: images[i] for i in ids}
    captions = group_captions((a['image_id'], a['caption']) for a in annotations if a['image_id'] in images)
    return [(images[i], i, captions[i]) for i in images if i in captions]


def merge(sets, output_dir, ids):
    """Write the merged caption files and the image links; returns {split: {set name: (images, captions)}}."""
    links = os.path.join(output_dir, 'images')
    os.makedirs(links, exist_ok=True)
    merged, counts = {}, {}
    next_id = 1
    for name, split, caption_path, image_dir in sets:
        rows = read_set(name, caption_path, image_dir, ids.get(name))
        link = os.path.join(links, name)
        target = os.path.abspath(image_dir)
        if os.path.islink(link) and os.readlink(link) != target:
            os.remove(link)
        if not os.path.islink(link):
            os.symlink(target, link)
        images, annotations = [], []
        for file_name, original, captions in rows:
            images.append({'id': next_id, 'file_name': f'{name}/{file_name}', 'set': name, 'original_id': original})
            annotations += [{'image_id': next_id, 'caption': c} for c in captions]
            next_id += 1
        merged.setdefault(split, []).append((name, images, annotations))
    for split, parts in merged.items():
        files = [(f'captions_{split}.json', parts)]
        if split == 'dev':
            files += [(f'captions_dev_{name}.json', [(name, images, annotations)]) for name, images, annotations in parts]
        for file_name, chosen in files:
            images = [image for _, part, _ in chosen for image in part]
            annotations = [dict(a, id=k) for k, a in enumerate((a for _, _, part in chosen for a in part), 1)]
            with atomic_write(os.path.join(output_dir, file_name), 'w') as f:
                json.dump({'images': images, 'annotations': annotations}, f)
        counts[split] = {name: (len(images), len(annotations)) for name, images, annotations in parts}
    return counts


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--set', nargs=4, action='append', required=True, metavar=('NAME', 'SPLIT', 'CAPTIONS', 'IMAGE_DIR'),
                        help='a collection: its name (letters, digits, _ and -), train or dev, its COCO-format '
                             'caption file and its image folder (repeat for each)')
    parser.add_argument('--ids', help='JSON {NAME: [image ids]}: keep only these images of the collections it names')
    parser.add_argument('--output_dir', default='data/merged', help='where the caption files and image links go')
    args = parser.parse_args(argv)
    names = [s[0] for s in args.set]
    for name, split, _, _ in args.set:
        if not re.fullmatch(r'[A-Za-z0-9_-]+', name) or names.count(name) > 1:
            parser.error(f'--set {name}: a name must be unique and of letters, digits, _ and - only')
        if split not in ('train', 'dev'):
            parser.error(f'--set {name} {split}: the split must be train or dev')
    if 'train' not in [s[1] for s in args.set]:
        parser.error('no --set for the train split')
    try:
        ids = read_json(args.ids, 'image id list') if args.ids else {}
        if not isinstance(ids, dict) or not all(isinstance(v, list) for v in ids.values()):
            raise InputError(f'{args.ids}: not a JSON object of image id lists')
        counts = merge(args.set, args.output_dir, ids)
    except InputError as e:
        sys.exit(f'error: {e}')
    for split, parts in counts.items():
        print(f'{split}: ' + ', '.join(f'{name} {n} images ({c} captions)' for name, (n, c) in parts.items()) +
              f' -> {os.path.join(args.output_dir, f"captions_{split}.json")}')


if __name__ == '__main__':
    main()
