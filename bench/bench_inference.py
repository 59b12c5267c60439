"""Captioning speed: sample.py on a folder against one sample.py process per image, the bf16
encoder against fp32, and sample.py's cold start.

    python bench/bench_inference.py --image_dir ../shared/data/coco/val2017
Speeds are measured on a ResNet-152 captioner with random weights (speed does not depend on the
weights); bench_bf16_agreement.py counts the captions bf16 changes, with a trained model.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from timing import machine, median_seconds, report
import sample
from build_vocab import Vocabulary, save_vocab
from model import DecoderRNN, EncoderCNN, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_resnet152_model(folder):
    """Checkpoint files of a ResNet-152 captioner with random weights and a 10,000-word vocabulary."""
    vocab = Vocabulary()
    for word in ['<pad>', '<start>', '<end>', '<unk>'] + [f'w{i}' for i in range(9996)]:
        vocab.add_word(word)
    config = {'cnn': 'resnet152', 'embed_size': 256, 'hidden_size': 512, 'num_layers': 1, 'vocab_size': len(vocab),
              'image_size': 224, 'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}
    paths = [os.path.join(folder, n) for n in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')]
    save_checkpoint({'config': config, 'model': EncoderCNN(256, 'resnet152', pretrained=False).state_dict()}, paths[0])
    save_checkpoint({'config': config, 'model': DecoderRNN(256, 512, len(vocab), 1).state_dict()}, paths[1])
    save_vocab(vocab, paths[2])
    return paths


def sample_cli(images, model_flags, *extra):
    return subprocess.run([sys.executable, 'sample.py', '--image', *images, *model_flags, *extra], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_dir', default='../shared/data/coco/val2017')
    parser.add_argument('--folder_images', type=int, default=32, help='images captioned as a folder')
    parser.add_argument('--process_images', type=int, default=4, help='images captioned one process each')
    args = parser.parse_args()
    print(machine())
    names = sorted(n for n in os.listdir(args.image_dir) if n.lower().endswith('.jpg'))
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, 'images')
        os.makedirs(folder)
        for name in names[:args.folder_images]:
            os.symlink(os.path.abspath(os.path.join(args.image_dir, name)), os.path.join(folder, name))
        model = random_resnet152_model(work)
        flags = ['--encoder_path', model[0], '--decoder_path', model[1], '--vocab_path', model[2]]
        images = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]

        one_each = median_seconds(lambda: [sample_cli([p], flags) for p in images[:args.process_images]], 1)
        whole = median_seconds(lambda: sample_cli([folder], flags), 1)
        report('captioning real photos (ResNet-152 captioner, random weights)',
               'images/s', 'one sample.py process per image', args.process_images / one_each,
               f'sample.py on a folder of {len(images)} (batched)', len(images) / whole)

        start = time.perf_counter()
        subprocess.run([sys.executable, '-c', 'import torch, torchvision, PIL, nltk'], check=True)
        imports = time.perf_counter() - start
        start = time.perf_counter()
        sample_cli(images[:1], flags)
        print(f'cold start: sample.py on one image {time.perf_counter() - start:.2f} s '
              f'(importing torch, torchvision, PIL and nltk alone: {imports:.2f} s)')

        device = torch.device('cpu')
        model_parser = argparse.ArgumentParser()
        sample.add_model_args(model_parser)
        _, encoder, _, config = sample.load_model(model_parser.parse_args(flags + ['--device', 'cpu']), device)
        batch = torch.randn(8, 3, config['image_size'], config['image_size']).to(memory_format=torch.channels_last)
        def forward():
            with torch.inference_mode():
                encoder.backbone_features(batch)
        rates = {}
        for precision in ('fp32', 'bf16'):
            if precision == 'bf16':
                encoder.use_bf16()
            forward()
            rates[precision] = 8 / median_seconds(forward, 5)
        report(f'encoder ({config["cnn"]}) forward, batch 8, median of 5', 'images/s', 'fp32', rates['fp32'],
               'bf16 (--precision bf16)', rates['bf16'])


if __name__ == '__main__':
    main()
