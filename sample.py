"""Caption images with a trained model.

One image: stdout carries its caption alone. Several (files, folders or globs):
one `path<TAB>caption` line each, computed in batches. Loads checkpoints from
train.py (they record their own sizes, backbone and decode settings) or the classic
published plain state_dicts (read with the size flags). Nothing is downloaded, and
files are loaded safely (weights and words only, never code).
"""
import argparse
import glob
import json
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from build_vocab import VocabularyError, ids_to_caption, load_vocab
from data_loader import ImageListDataset, eval_transform
from model import CNN_CHOICES, CheckpointError, load_captioner, pick_device
from resize import ImageError, open_image

IMAGE_EXTENSIONS = tuple(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


CLASSIC_FILES = ('models/encoder-5-3000.pkl', 'models/decoder-5-3000.pkl', 'data/vocab.pkl')
SHIPPED_FILES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models', 'flickr8k', name)
                      for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl'))


def default_model_files():
    """The classic published model if all three of its files are at their classic paths, else the shipped one."""
    return CLASSIC_FILES if all(os.path.exists(p) for p in CLASSIC_FILES) else SHIPPED_FILES


def add_model_args(parser):
    """The model and decoding flags shared by sample.py and evaluate.py."""
    model = parser.add_argument_group(
        'model', 'Without these flags: the classic published model if all three of its files are at their classic '
        f'paths ({", ".join(CLASSIC_FILES)}), else the Flickr8k model shipped in models/flickr8k/')
    model.add_argument('--encoder_path', help='encoder checkpoint')
    model.add_argument('--decoder_path', help='decoder checkpoint')
    model.add_argument('--vocab_path', help='vocabulary from build_vocab.py')
    sizes = parser.add_argument_group('model sizes, used only for plain state_dicts (the classic files); '
                                      'train.py checkpoints record their own')
    sizes.add_argument('--cnn', default='resnet152', choices=CNN_CHOICES)
    sizes.add_argument('--embed_size', type=int, default=256)
    sizes.add_argument('--hidden_size', type=int, default=512)
    sizes.add_argument('--num_layers', type=int, default=1)
    decoding = parser.add_argument_group('decoding')
    decoding.add_argument('--beam_size', type=int, help='1 = greedy, as the classic recipe '
                          '(default: the setting the checkpoint records, else 1)')
    decoding.add_argument('--max_length', type=int, default=20, help='most words generated')
    decoding.add_argument('--length_penalty', type=float, help='rank finished beams by sum(log p) / length**alpha '
                          '(0 = raw log-probability; default: the checkpoint\'s setting, else 0)')
    parser.add_argument('--batch_size', type=int, default=16, help='images per batch')
    parser.add_argument('--num_workers', type=int, default=2, help='image loading processes')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                        help='bf16: the encoder (but its first layers) under bfloat16 autocast '
                             '(faster, a few captions differ)')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu")


def load_model(args, device):
    """Vocabulary, encoder, decoder and config from the flags of add_model_args."""
    files = default_model_files()
    args.encoder_path = args.encoder_path or files[0]
    args.decoder_path = args.decoder_path or files[1]
    args.vocab_path = args.vocab_path or files[2]
    vocab = load_vocab(args.vocab_path)
    defaults = {'cnn': args.cnn, 'embed_size': args.embed_size, 'hidden_size': args.hidden_size,
                'num_layers': args.num_layers}
    encoder, decoder, config = load_captioner(args.encoder_path, args.decoder_path, len(vocab), defaults, device)
    if args.beam_size is not None:
        config['beam_size'] = args.beam_size
    if args.length_penalty is not None:
        config['length_penalty'] = args.length_penalty
    config['max_length'] = args.max_length
    encoder.to(memory_format=torch.channels_last)
    if supported_precision(device, args.precision) == 'bf16':
        encoder.use_bf16()
    return vocab, encoder, decoder, config


def native_bf16(device):
    """Whether `device` computes in bfloat16 natively: a CPU with AVX-512 bf16 or AMX, or a CUDA GPU
    with bf16 (Ampere and later)."""
    if device.type == 'cpu':
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return device.type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)


def supported_precision(device, precision):
    """`precision`, or fp32 (with a warning) where bfloat16 is not native."""
    if precision == 'bf16' and not native_bf16(device):
        print(f'warning: no native bfloat16 on this {device.type} device; using fp32', file=sys.stderr)
        return 'fp32'
    return precision


@torch.inference_mode()
def caption_batch(images, vocab, encoder, decoder, config, device):
    """Captions for a batch of normalised image tensors (B, 3, H, W)."""
    images = images.to(device, memory_format=torch.channels_last)
    features = encoder.project(encoder.backbone_features(images))
    ids = decoder.beam_search(features, config.get('beam_size', 1), vocab('<end>'), config.get('max_length', 20),
                              config.get('length_penalty', 0.0))
    return [ids_to_caption(vocab, row) for row in ids.cpu()]


def caption_files(paths, vocab, encoder, decoder, config, device, batch_size=16, num_workers=2, progress=True):
    """Yield (path, caption) for every file, or (path, ImageError) for one that cannot be read.

    A DataLoader reads and transforms the next images while the current batch is captioned.
    """
    dataset = ImageListDataset(paths, eval_transform(config['image_size'], config['mean'], config['std']))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=ImageListDataset.collate, pin_memory=device.type == 'cuda')
    bar = tqdm(total=len(paths), desc='captioning', unit='image', file=sys.stderr, disable=not progress)
    for indices, images, errors in loader:
        for index, error in errors:
            yield paths[index], ImageError(error)
        if indices:
            for index, caption in zip(indices, caption_batch(images, vocab, encoder, decoder, config, device)):
                yield paths[index], caption
        bar.update(len(indices) + len(errors))
    bar.close()


def expand_images(values):
    """Files named directly, the images in named folders, and glob matches, in order, once each."""
    paths = []
    for value in values:
        if os.path.isdir(value):
            found = sorted(os.path.join(value, name) for name in os.listdir(value)
                           if name.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(value):
            found = sorted(p for p in glob.glob(value) if os.path.isfile(p))
        else:
            found = [value]
        if not found:
            raise ImageError(f'{value}: no images there')
        paths += [p for p in found if p not in paths]
    return paths


def save_captioned(image, caption, path):
    """Write the image with its caption as a title."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 6 * image.height / image.width + 0.6))
    ax.imshow(image)
    ax.set_title(caption, wrap=True)
    ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_contact_sheet(results, path, columns=4):
    """A grid of the images, each with its caption below."""
    import textwrap

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = (len(results) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, (image_path, caption) in zip(axes.flat, results):
        image = open_image(image_path)
        image.thumbnail((320, 320))
        ax.imshow(image)
        ax.set_title('\n'.join(textwrap.wrap(caption, 34)), fontsize=9, y=-0.02, va='top')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image', nargs='+', required=True, help='image files, folders or globs to caption')
    add_model_args(parser)
    parser.add_argument('--save', metavar='FILE.png', help='one image: also write it with its caption')
    parser.add_argument('--output', metavar='results.json', help='write [{"file_name", "caption"}] here')
    parser.add_argument('--sheet', metavar='FILE.png', help='draw a contact sheet of the images and captions')
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    try:
        paths = expand_images(args.image)
        single = len(paths) == 1
        if single:
            image = open_image(paths[0])  # a bad single image fails before the model loads
        vocab, encoder, decoder, config = load_model(args, device)
    except (ImageError, VocabularyError, CheckpointError) as e:
        sys.exit(f'error: {e}')

    results, failed = [], 0
    for path, caption in caption_files(paths, vocab, encoder, decoder, config, device, args.batch_size,
                                       0 if single else args.num_workers, progress=not single):
        if isinstance(caption, ImageError):
            failed += 1
            tqdm.write(f'warning: skipped {caption}', file=sys.stderr)
            continue
        results.append((path, caption))
        print(caption if single else f'{path}\t{caption}', flush=True)
    if args.output:
        with open(args.output, 'w') as f:
            json.dump([{'file_name': p, 'caption': c} for p, c in results], f, indent=1)
    if args.save and single:
        save_captioned(image, results[0][1], args.save)
    if args.sheet and results:
        save_contact_sheet(results, args.sheet)
    if failed:
        sys.exit(f'error: {failed} of {len(paths)} images could not be read')


if __name__ == '__main__':
    main()
