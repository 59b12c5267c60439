"""Package a trained model for shipping: weights only, float16, with its decoding settings.

Writes encoder.ckpt, decoder.ckpt and vocab.pkl into --output_dir. The optimizer and
training state are dropped, weights are stored as float16 (loaded back as float32),
and --beam_size / --length_penalty / --no_repeat are recorded so that sample.py and
evaluate.py decode with them by default.
"""
import argparse
import os
import shutil
import sys

import torch

from checkpoints import read_model, write_model
from errors import InputError
from model import Decoding


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--encoder_path', required=True)
    parser.add_argument('--decoder_path', required=True)
    parser.add_argument('--vocab_path', required=True)
    parser.add_argument('--output_dir', default='models/flickr8k')
    parser.add_argument('--beam_size', type=int, default=Decoding.beam_size)
    parser.add_argument('--length_penalty', type=float, default=Decoding.length_penalty)
    parser.add_argument('--no_repeat', type=int, default=Decoding.no_repeat,
                        help='never repeat a phrase of this many words (0 = allow)')
    parser.add_argument('--fp32', action='store_true', help='keep float32 weights')
    args = parser.parse_args(argv)
    try:
        config, _, encoder, decoder, _ = read_model(args.encoder_path, args.decoder_path, None)
        if config is None:
            raise InputError(f'{args.decoder_path}: a plain state_dict, not a train.py checkpoint')
    except InputError as e:
        sys.exit(f'error: {e}')
    dtype = torch.float32 if args.fp32 else torch.float16
    shrink = lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    decoding = Decoding(beam_size=args.beam_size, length_penalty=args.length_penalty, no_repeat=args.no_repeat)
    paths = [os.path.join(args.output_dir, name) for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')]
    write_model(paths[0], paths[1], config, decoding, shrink(encoder), shrink(decoder))
    shutil.copyfile(args.vocab_path, paths[2])
    size = sum(os.path.getsize(p) for p in paths)
    print(f'wrote {args.output_dir}: {size / 1e6:.1f} MB, beam {args.beam_size}, length penalty {args.length_penalty}, '
          f'no_repeat {args.no_repeat}')


if __name__ == '__main__':
    main()
