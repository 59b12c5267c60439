"""Package a trained model for shipping: weights only, float16, with its decoding settings.

Writes encoder.ckpt, decoder.ckpt and vocab.pkl (and, with --card, README.md) into --output_dir, as one unit (all three
complete before any replaces an old one). The optimizer and training state are dropped,
weights are stored as float16 (loaded back as float32), and --beam_size / --length_penalty /
--no_repeat are recorded so that sample.py and evaluate.py decode with them by default. The
vocabulary is read with the same safe loader as everything else and checked against the decoder.
"""
import os
import pickle
import sys

import torch

from checkpoints import check_vocab, read_model, vocab_digest, write_model
from errors import InputError, integer, number, script_parser
from vocabulary import load_vocab
from decoding import Decoding


def export(args):
    saved = read_model(args.encoder_path, args.decoder_path)
    vocab = load_vocab(args.vocab_path)
    check_vocab(saved.decoder_file, args.decoder_path, vocab, args.vocab_path)
    paths = [os.path.join(args.output_dir, name) for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')]
    inputs = {os.path.realpath(p) for p in (args.encoder_path, args.decoder_path, args.vocab_path)}
    if inputs & {os.path.realpath(p) for p in paths}:
        raise InputError(f'{args.output_dir}: holds the model being exported; choose another --output_dir')
    dtype = torch.float32 if args.fp32 else torch.float16
    shrink = lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    decoding = Decoding(beam_size=args.beam_size, length_penalty=args.length_penalty, no_repeat=args.no_repeat)
    extra = {paths[2]: pickle.dumps(vocab)}
    if args.card:
        try:
            with open(args.card, 'rb') as f:
                extra[os.path.join(args.output_dir, args.card_as)] = f.read()
        except OSError as e:
            raise InputError(f'{args.card}: cannot read the model card ({e.strerror})') from None
    write_model(paths[0], paths[1], saved.config, decoding, shrink(saved.encoder_state), shrink(saved.decoder_state),
                vocab_sha=vocab_digest(vocab), extra_files=extra)
    return sum(os.path.getsize(p) for p in paths)


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--encoder_path', required=True, help="the trained model's encoder checkpoint")
    parser.add_argument('--decoder_path', required=True, help="the trained model's decoder checkpoint")
    parser.add_argument('--vocab_path', required=True, help='the vocabulary it was trained with')
    parser.add_argument('--output_dir', default='models/flickr8k', help='folder for the three files (not the input\'s)')
    parser.add_argument('--beam_size', type=integer(*Decoding.LIMITS['beam_size']), default=Decoding.beam_size,
                        help='the beam size to record (1 = greedy)')
    parser.add_argument('--length_penalty', type=number(0, 10), default=Decoding.length_penalty,
                        help='the length penalty to record')
    parser.add_argument('--no_repeat', type=integer(*Decoding.LIMITS['no_repeat']), default=Decoding.no_repeat,
                        help='never repeat a phrase of this many words (0 = allow)')
    parser.add_argument('--card', metavar='CARD.md', help='a model card, written beside the model as --card_as')
    parser.add_argument('--card_as', default='README.md', help="the model card's file name in --output_dir")
    parser.add_argument('--fp32', action='store_true', help='keep float32 weights')
    args = parser.parse_args(argv)
    try:
        size = export(args)
    except InputError as e:
        sys.exit(f'error: {e}')
    print(f'wrote {args.output_dir}: {size / 1e6:.1f} MB, beam {args.beam_size}, length penalty {args.length_penalty}, '
          f'no_repeat {args.no_repeat}')


if __name__ == '__main__':
    main()
