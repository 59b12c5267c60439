"""How many captions `--precision bf16` leaves identical to fp32 ones, for a trained model on real
photos: bfloat16 autocast alone against autocast with the bias correction (devices.use_bf16),
with the model's own decoding settings and with greedy decoding.

    python bench/bench_bf16_agreement.py --image_dir DATA_DIR/Images --image_list DATA_DIR/Flickr_8k.devImages.txt
    (default: the shipped model on the 12 COCO photos in tests/data)
"""
import argparse
import copy
import os
from dataclasses import replace

import torch

from timing import SAMPLE_PHOTOS, machine
from devices import native_bf16, use_bf16
from captioner import Captioner


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model_dir', default='models/flickr8k', help='holds encoder.ckpt, decoder.ckpt and vocab.pkl')
    parser.add_argument('--image_dir', default=SAMPLE_PHOTOS, help='a folder of photos')
    parser.add_argument('--image_list', help='file names to caption, one per line (default: the folder, sorted)')
    parser.add_argument('--images', type=int, default=1000, help='caption the first this many')
    args = parser.parse_args()
    if args.image_list:
        with open(args.image_list) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = sorted(os.listdir(args.image_dir))
    paths = [os.path.join(args.image_dir, name) for name in names][:args.images]
    device = torch.device('cpu')
    if not native_bf16(device):
        raise SystemExit('this CPU has no native bfloat16: nothing to compare')
    captioner = Captioner.load(*(os.path.join(args.model_dir, n) for n in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')),
                               device='cpu')
    fp32 = captioner.encoder
    autocast_only = copy.deepcopy(fp32)
    autocast_only.bf16 = True
    corrected = copy.deepcopy(fp32)
    use_bf16(corrected, device)
    config, own = captioner.config, captioner.decoding
    print(f'{machine()}\n{args.model_dir} ({config.cnn}, {config.decoder} decoder): captions of '
          f'{len(paths)} photos from {args.image_dir} identical to fp32')
    default = f'beam {own.beam_size}, length penalty {own.length_penalty}'
    for name, decoding in ((f'its own decoding ({default})', own), ('greedy', replace(own, beam_size=1))):
        captioner.decoding, captions = decoding, {}
        for precision, encoder in (('fp32', fp32), ('autocast', autocast_only), ('corrected', corrected)):
            captioner.encoder = encoder
            captions[precision] = dict(captioner.caption_files(paths, progress=False))
        print(f'  {name}')
        for precision, label in (('autocast', 'bf16 autocast alone'), ('corrected', 'bf16 with the bias correction')):
            same = sum(captions[precision][p] == captions['fp32'][p] for p in paths)
            print(f'    {label:<40} {same:5d} ({same / len(paths):.1%})')


if __name__ == '__main__':
    main()
