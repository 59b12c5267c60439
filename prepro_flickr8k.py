"""Turn the official Flickr8k caption files into COCO-format caption files, one per split.

Reads `Flickr8k.token.txt` (`name.jpg#k<TAB>caption` lines) and the split lists
`Flickr_8k.{train,dev,test}Images.txt` from --data_dir, and writes
`captions_{train,dev,test}.json` to --output_dir, so that every script of this
repo works on Flickr8k unchanged (`--image_dir DATA_DIR/Images`). Image ids are
numbered from 1 in the token file's order; a split whose list is absent is skipped.
"""
import os
import sys

from caption_files import group_captions, write_coco
from errors import InputError, script_parser

SPLITS = ('train', 'dev', 'test')


def read_tokens(path):
    """Captions per image name, in file order: {file_name: [caption, ...]}."""
    pairs = []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f'{path}: no such file') from None
    except UnicodeDecodeError as e:
        raise InputError(f'{path}: not UTF-8 text ({e})') from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        key, tab, caption = line.partition('\t')
        name, hash_sign, _ = key.partition('#')
        if not tab or not hash_sign:
            raise InputError(f'{path}:{number}: expected "name.jpg#k<TAB>caption", got {line[:60]!r}')
        pairs.append((name, caption.strip()))
    return group_captions(pairs)


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--data_dir', default='data/flickr8k', help='folder with the official Flickr8k text files')
    parser.add_argument('--output_dir', default='data/flickr8k', help='where to write captions_{split}.json')
    args = parser.parse_args(argv)
    token_path = os.path.join(args.data_dir, 'Flickr8k.token.txt')
    try:
        captions = read_tokens(token_path)
    except InputError as e:
        sys.exit(f'error: {e}')
    image_ids = {name: i for i, name in enumerate(captions, 1)}
    os.makedirs(args.output_dir, exist_ok=True)
    for split in SPLITS:
        list_path = os.path.join(args.data_dir, f'Flickr_8k.{split}Images.txt')
        if not os.path.exists(list_path):
            print(f'{split}: {list_path} is absent, skipped')
            continue
        with open(list_path, encoding='utf-8') as f:
            listed = [line.strip() for line in f if line.strip()]
        names = [name for name in listed if name in captions]
        if len(names) < len(listed):
            print(f'warning: {split}: {len(listed) - len(names)} listed images have no captions in {token_path}',
                  file=sys.stderr)
        out = os.path.join(args.output_dir, f'captions_{split}.json')
        n_images, n_captions = write_coco(out, names, captions, image_ids)
        print(f'{split}: {n_images} images, {n_captions} captions -> {out}')


if __name__ == '__main__':
    main()
