"""Caption an image with a trained model; prints the caption alone on stdout.

Loads checkpoints from train.py (they record their own sizes and backbone) or the
classic published plain state_dicts (read with the size flags). Nothing is
downloaded, and files are loaded safely (weights and words only, never code).
"""
import argparse
import sys

import torch

from build_vocab import VocabularyError, ids_to_caption, load_vocab
from data_loader import eval_transform
from model import CNN_CHOICES, CheckpointError, load_captioner, pick_device
from resize import ImageError, open_image


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image', required=True, help='image to caption')
    parser.add_argument('--encoder_path', default='models/encoder-5-3000.pkl', help='encoder checkpoint')
    parser.add_argument('--decoder_path', default='models/decoder-5-3000.pkl', help='decoder checkpoint')
    parser.add_argument('--vocab_path', default='data/vocab.pkl', help='vocabulary from build_vocab.py')
    sizes = parser.add_argument_group('model sizes, used only for plain state_dicts (the classic files); '
                                      'train.py checkpoints record their own')
    sizes.add_argument('--cnn', default='resnet152', choices=CNN_CHOICES)
    sizes.add_argument('--embed_size', type=int, default=256)
    sizes.add_argument('--hidden_size', type=int, default=512)
    sizes.add_argument('--num_layers', type=int, default=1)
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu")
    parser.add_argument('--save', metavar='FILE.png', help='also write the image with its caption')
    return parser.parse_args(argv)


def load_model(args, device):
    """Vocabulary, encoder, decoder and config from the flags shared by sample.py and evaluate.py."""
    vocab = load_vocab(args.vocab_path)
    defaults = {'cnn': args.cnn, 'embed_size': args.embed_size, 'hidden_size': args.hidden_size,
                'num_layers': args.num_layers}
    encoder, decoder, config = load_captioner(args.encoder_path, args.decoder_path, len(vocab), defaults, device)
    return vocab, encoder, decoder, config


@torch.inference_mode()
def caption_images(images, vocab, encoder, decoder, config, device):
    """Greedy captions for a list of RGB PIL images."""
    transform = eval_transform(config['image_size'], config['mean'], config['std'])
    batch = torch.stack([transform(image) for image in images]).to(device)
    ids = decoder.sample(encoder(batch)).cpu()
    return [ids_to_caption(vocab, row) for row in ids]


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


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        image = open_image(args.image)
        vocab, encoder, decoder, config = load_model(args, device)
    except (ImageError, VocabularyError, CheckpointError) as e:
        sys.exit(f'error: {e}')
    caption = caption_images([image], vocab, encoder, decoder, config, device)[0]
    print(caption)
    if args.save:
        save_captioned(image, caption, args.save)


if __name__ == '__main__':
    main()
