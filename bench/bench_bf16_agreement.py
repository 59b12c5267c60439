"""How many captions `--precision bf16` leaves identical to fp32 ones, for a trained model on real
photos: bfloat16 autocast alone against autocast with the bias correction (EncoderCNN.use_bf16),
with the model's own decoding settings and with greedy decoding.

    python bench/bench_bf16_agreement.py        # the shipped model, the first 1,000 Flickr8k dev photos
"""
import argparse
import copy
import os

import torch

from timing import machine
import sample


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model_dir', default='models/flickr8k',
                        help='holds encoder.ckpt, decoder.ckpt and vocab.pkl')
    parser.add_argument('--image_dir', default='../shared/data/flickr8k/Images')
    parser.add_argument('--image_list', help='file names to caption, one per line (default: '
                        'Flickr_8k.devImages.txt beside --image_dir)')
    parser.add_argument('--images', type=int, default=1000, help='caption the first this many')
    args = parser.parse_args()
    image_list = args.image_list or os.path.join(os.path.dirname(args.image_dir), 'Flickr_8k.devImages.txt')
    with open(image_list) as f:
        paths = [os.path.join(args.image_dir, line.strip()) for line in f if line.strip()][:args.images]
    device = torch.device('cpu')
    if not sample.native_bf16(device):
        raise SystemExit('this CPU has no native bfloat16: nothing to compare')
    model_parser = argparse.ArgumentParser()
    sample.add_model_args(model_parser)
    files = [os.path.join(args.model_dir, name) for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')]
    vocab, encoder, decoder, config = sample.load_model(model_parser.parse_args(
        ['--encoder_path', files[0], '--decoder_path', files[1], '--vocab_path', files[2]]), device)
    autocast_only = copy.deepcopy(encoder)
    autocast_only.bf16 = True
    corrected = copy.deepcopy(encoder)
    corrected.use_bf16()
    print(f'{machine()}\n{args.model_dir} ({config["cnn"]}, {config.get("decoder", "lstm")} decoder): captions of '
          f'{len(paths)} photos from {image_list} identical to fp32')
    default = f'beam {config.get("beam_size", 1)}, length penalty {config.get("length_penalty", 0.0)}'
    for name, decoding in ((f'its own decoding ({default})', config), ('greedy', dict(config, beam_size=1))):
        captions = {}
        for precision, model in (('fp32', encoder), ('autocast', autocast_only), ('corrected', corrected)):
            captions[precision] = dict(sample.caption_files(paths, vocab, model, decoder, decoding, device,
                                                            progress=False))
        print(f'  {name}')
        for precision, label in (('autocast', 'bf16 autocast alone'), ('corrected', 'bf16 with the bias correction')):
            same = sum(captions[precision][p] == captions['fp32'][p] for p in paths)
            print(f'    {label:<40} {same:5d} ({same / len(paths):.1%})')


if __name__ == '__main__':
    main()
