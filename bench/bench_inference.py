"""Captioning speed: sample.py on a folder against one sample.py process per image, the bf16
encoder against fp32, and sample.py's cold start against importing torch alone.

    python bench/bench_inference.py      # or --image_dir data/val2014
Folder and bf16 speeds use a ResNet-152 captioner with random weights (speed does not depend on
the weights); the cold start uses the shipped model, as `python sample.py --image PHOTO` does.
bench_bf16_agreement.py counts the captions bf16 changes, with a trained model.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import pickle
import tempfile
import time

import torch

from timing import ROOT, SAMPLE_PHOTOS, machine, median_seconds, report
from devices import native_bf16, use_bf16
from captioner import Captioner
from checkpoints import write_model
from decoding import Decoding
from model import ModelConfig, build_networks
from vocabulary import Vocabulary


def random_resnet152_model(folder):
    """Checkpoint files of a ResNet-152 captioner with random weights and a 10,000-word vocabulary."""
    vocab = Vocabulary()
    for word in ['<pad>', '<start>', '<end>', '<unk>'] + [f'w{i}' for i in range(9996)]:
        vocab.add_word(word)
    config = ModelConfig(vocab_size=len(vocab))
    encoder, decoder = build_networks(config, pretrained=False)
    paths = [os.path.join(folder, n) for n in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')]
    write_model(paths[0], paths[1], config, Decoding(), encoder.state_dict(), decoder.state_dict())
    with open(paths[2], 'wb') as f:
        pickle.dump(vocab, f)
    return paths


def run(*args):
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def cold_start(photo, repeats):
    """Median seconds of `sample.py --image PHOTO` (shipped model) and of `python -c "import torch"`,
    interleaved, each run on a fresh copy of the photo outside the repo."""
    times = {'sample': [], 'torch': []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            copy = shutil.copy(photo, work)
            times['sample'].append(run('sample.py', '--image', copy, '--device', 'cpu'))
            times['torch'].append(run('-c', 'import torch'))
    return statistics.median(times['sample']), statistics.median(times['torch'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_dir', default=SAMPLE_PHOTOS, help='a folder of real photos')
    parser.add_argument('--process_images', type=int, default=4, help='images captioned one process each')
    parser.add_argument('--cold_starts', type=int, default=7, help='cold-start runs (median)')
    args = parser.parse_args()
    print(machine())
    names = sorted(n for n in os.listdir(args.image_dir) if n.lower().endswith(('.jpg', '.jpeg', '.png')))
    images = [os.path.join(args.image_dir, n) for n in names]
    sample_time, torch_time = cold_start(images[0], args.cold_starts)
    print(f'cold start (median of {args.cold_starts}, interleaved): sample.py on one photo {sample_time:.2f} s, '
          f'python -c "import torch" {torch_time:.2f} s: ratio {sample_time / torch_time:.2f}')
    with tempfile.TemporaryDirectory() as work:
        model = random_resnet152_model(work)
        flags = ['--encoder_path', model[0], '--decoder_path', model[1], '--vocab_path', model[2], '--device', 'cpu']
        one_each = median_seconds(lambda: [run('sample.py', '--image', p, *flags) for p in images[:args.process_images]], 1)
        whole = median_seconds(lambda: run('sample.py', '--image', args.image_dir, *flags), 1)
        report('captioning real photos (ResNet-152 captioner, random weights)', 'images/s',
               'one sample.py process per image', args.process_images / one_each,
               f'sample.py on a folder of {len(images)} (batched)', len(images) / whole)
        device = torch.device('cpu')
        if not native_bf16(device):
            print('bf16: this CPU has no native bfloat16; skipped')
            return
        encoder = Captioner.load(*model, device='cpu').encoder
        batch = torch.randn(8, 3, 224, 224).to(memory_format=torch.channels_last)
        def forward():
            with torch.inference_mode():
                encoder.backbone_features(batch)
        rates = {}
        for precision in ('fp32', 'bf16'):
            if precision == 'bf16':
                use_bf16(encoder, device)
            forward()
            rates[precision] = 8 / median_seconds(forward, 5)
        report('encoder (resnet152) forward, batch 8, median of 5', 'images/s', 'fp32', rates['fp32'],
               'bf16 (--precision bf16)', rates['bf16'])


if __name__ == '__main__':
    main()
