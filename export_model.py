"""Package a trained model for shipping: weights only, float16, with its decode settings.

Writes encoder.ckpt, decoder.ckpt and vocab.pkl into --output_dir. The optimizer and
training state are dropped, weights are stored as float16 (loaded back as float32),
and --beam_size / --length_penalty are recorded so that sample.py and evaluate.py
decode with them by default.
"""
import argparse
import os
import shutil
import sys

import torch

from model import CheckpointError, load_checkpoint, save_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--encoder_path', required=True)
    parser.add_argument('--decoder_path', required=True)
    parser.add_argument('--vocab_path', required=True)
    parser.add_argument('--output_dir', default='models/flickr8k')
    parser.add_argument('--beam_size', type=int, default=1)
    parser.add_argument('--length_penalty', type=float, default=0.0)
    parser.add_argument('--fp32', action='store_true', help='keep float32 weights')
    args = parser.parse_args(argv)
    try:
        encoder, decoder = load_checkpoint(args.encoder_path), load_checkpoint(args.decoder_path)
        if 'config' not in decoder:
            raise CheckpointError(f'{args.decoder_path}: not a train.py checkpoint (no config)')
    except CheckpointError as e:
        sys.exit(f'error: {e}')
    config = dict(decoder['config'], beam_size=args.beam_size, length_penalty=args.length_penalty)
    dtype = torch.float32 if args.fp32 else torch.float16
    shrink = lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(args.output_dir, exist_ok=True)
    save_checkpoint({'config': config, 'model': shrink(encoder['model'])}, os.path.join(args.output_dir, 'encoder.ckpt'))
    save_checkpoint({'config': config, 'model': shrink(decoder['model'])}, os.path.join(args.output_dir, 'decoder.ckpt'))
    shutil.copyfile(args.vocab_path, os.path.join(args.output_dir, 'vocab.pkl'))
    sizes = sum(os.path.getsize(os.path.join(args.output_dir, n)) for n in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl'))
    print(f'wrote {args.output_dir}: {sizes / 1e6:.1f} MB, beam {args.beam_size}, length penalty {args.length_penalty}')


if __name__ == '__main__':
    main()
