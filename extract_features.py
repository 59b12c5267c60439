"""Run the frozen backbone once per image and cache its pooled features for `train.py --features`.

The classic recipe runs the backbone for every caption of every epoch although the
backbone never learns. This runs it once per image — the whole image squared to
--image_size, as sample.py sees it — and stores the features as float16 in one
memory-mapped array, `features.npy` (row i = `index.json`'s files[i]), optionally
with the mirrored image's features in `features_flip.npy` for augmentation. With
--spatial a row is the unpooled last feature map, (h*w, C), for the attention decoder.
Work in progress lives in `*.partial` files (saved every 10 s) and resumes where
it stopped; the finished cache appears only when complete. A cache built with another backbone or
image size is refused.
"""
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from caption_files import read_captions
from files import atomic_write
from data_loader import CACHE_FORMAT
from devices import add_device_flag, pick_device
from errors import InputError, check_format, integer, script_parser
from images import ImageFiles, eval_transform
from model import CNN_CHOICES, LITE_SIZES, EncoderCNN, ModelConfig


def write_json(obj, path):
    with atomic_write(path, 'w') as f:
        json.dump(obj, f)


def plan(args):
    """The cache's index: settings, the image files (in row order), progress so far."""
    names = set()
    for caption_path in args.caption_path:
        names.update(read_captions(caption_path)[1].values())
    present = sorted(n for n in names if os.path.isfile(os.path.join(args.image_dir, n)))
    if len(present) < len(names):
        print(f'warning: {len(names) - len(present)} of {len(names)} images are not in {args.image_dir}; '
              f'their captions will be dropped', file=sys.stderr)
    config = ModelConfig(cnn=args.cnn)  # the backbone's normalisation
    return {'format': CACHE_FORMAT, 'cnn': args.cnn, 'image_size': args.image_size, 'mean': list(config.mean),
            'std': list(config.std), 'flip': args.flip, 'spatial': args.spatial, 'files': present, 'broken': [],
            'done': 0}


def check_compatible(found, wanted, where):
    check_format(where, found.get('format'), CACHE_FORMAT)
    for key in ('cnn', 'image_size', 'flip', 'spatial', 'files'):
        if found[key] != wanted[key]:
            what = 'other images' if key == 'files' else f'{key}={found[key]!r} (asked: {wanted[key]!r})'
            raise InputError(f'{where}: this cache was built with {what}; use another --output_dir or delete it')


def resumed_work(folder, index, arrays, shape):
    """(index, writable arrays) of the work in progress in `folder`, resumed where a kill left it
    (its arrays possibly already renamed to their final names), or started afresh when there is none
    or it cannot be read."""
    index_path = os.path.join(folder, 'index.json.partial')
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                found = json.load(f)
            except json.JSONDecodeError:
                found = None
        if found is not None:
            check_compatible(found, index, folder)
            try:
                stores = []
                for name in arrays:
                    path = os.path.join(folder, name)
                    if not os.path.exists(path + '.partial') and os.path.exists(path):
                        os.replace(path, path + '.partial')  # killed while finishing: finish again
                    stores.append(np.load(path + '.partial', mmap_mode='r+'))
                if all(store.shape == shape for store in stores):
                    return found, stores
            except (OSError, ValueError):
                pass
        print(f'warning: {folder}: the unfinished cache there cannot be resumed; starting it again', file=sys.stderr)
    stores = [np.lib.format.open_memmap(os.path.join(folder, name + '.partial'), mode='w+', dtype=np.float16,
                                        shape=shape) for name in arrays]
    write_json(index, index_path)  # only once the arrays exist
    return index, stores


def extract(args):
    index = plan(args)
    os.makedirs(args.output_dir, exist_ok=True)
    index_path = os.path.join(args.output_dir, 'index.json')
    arrays = ['features.npy'] + (['features_flip.npy'] if args.flip else [])
    if os.path.exists(index_path):
        with open(index_path) as f:
            check_compatible(json.load(f), index, args.output_dir)
        if os.path.exists(index_path + '.partial'):  # a kill right after the cache was completed
            os.remove(index_path + '.partial')
        print(f'{args.output_dir}: the cache is already complete')
        return
    device = pick_device(args.device)
    encoder = EncoderCNN(1, args.cnn, spatial=args.spatial).to(device).eval()  # only its backbone is used
    shape = (len(index['files']), encoder.feature_size)
    if args.spatial:  # rows of (h*w, C); h and w depend on the backbone's padding, so ask it
        probe = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
        shape = (len(index['files']),) + tuple(encoder.backbone_features(probe).shape[1:])
    index, stores = resumed_work(args.output_dir, index, arrays, shape)
    paths = [os.path.join(args.image_dir, n) for n in index['files']]
    dataset = ImageFiles(paths, eval_transform(args.image_size, index['mean'], index['std']))
    todo = torch.utils.data.Subset(dataset, range(index['done'], len(paths)))
    loader = torch.utils.data.DataLoader(todo, batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=ImageFiles.collate)
    encoder.to(memory_format=torch.channels_last)
    layers = encoder.folded_backbone()
    saved = time.time()
    with torch.inference_mode(), tqdm(total=len(paths), initial=index['done'], desc='extracting', unit='image',
                                      file=sys.stderr) as bar:
        for indices, images, errors in loader:
            for i, error in errors:
                tqdm.write(f'warning: skipped {error}', file=sys.stderr)
                index['broken'].append(index['files'][i])
            if indices:
                images = images.to(device, memory_format=torch.channels_last)
                batches = [images, images.flip(3)] if args.flip else [images]
                for store, batch in zip(stores, batches):
                    store[indices] = encoder.backbone_features(batch, layers).cpu().numpy().astype(np.float16)
            index['done'] += len(indices) + len(errors)
            if time.time() - saved > 10 or index['done'] == len(paths):  # progress is kept every 10 s
                for store in stores:
                    store.flush()
                write_json(index, index_path + '.partial')  # only after the rows are on disk
                saved = time.time()
            bar.update(len(indices) + len(errors))
    del stores
    for a in arrays:
        os.replace(os.path.join(args.output_dir, a + '.partial'), os.path.join(args.output_dir, a))
    del index['done']
    write_json(index, index_path)
    os.remove(index_path + '.partial')
    print(f"Cached {len(paths) - len(index['broken'])} images' features in {args.output_dir}"
          f" ({len(index['broken'])} unreadable)")


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--image_dir', default='data/resized2014', help='folder of the images')
    parser.add_argument('--caption_path', nargs='+', default=['data/annotations/captions_train2014.json'],
                        help='caption files whose images to cache (several share one cache)')
    parser.add_argument('--output_dir', default='data/features', help='folder for the cache')
    parser.add_argument('--cnn', default=ModelConfig.cnn, choices=CNN_CHOICES, metavar='CNN',
                        help='the pretrained backbone: ' + ', '.join(CNN_CHOICES))
    parser.add_argument('--image_size', type=integer(16, 1024),
                        help="images are squared to this size (default: the backbone's "
                        'input size, 224 for ResNets)')
    parser.add_argument('--flip', action='store_true', help="also cache the mirrored images' features")
    parser.add_argument('--spatial', action='store_true',
                        help='cache the unpooled feature map (for train.py --decoder attention); 49x larger')
    parser.add_argument('--batch_size', type=integer(1), default=32, help='images per backbone forward')
    parser.add_argument('--num_workers', type=integer(0), default=2, help='image loading processes')
    add_device_flag(parser)
    args = parser.parse_args(argv)
    args.image_size = args.image_size or LITE_SIZES.get(args.cnn, 224)
    try:
        extract(args)
    except InputError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
