"""Training speed: from the feature cache against the classic ResNet-per-caption step, and
captions grouped per image against one sample per caption.

    python bench/bench_training.py
"""
import argparse
import json
import os
import tempfile

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from timing import machine, median_seconds, report
import train
from build_vocab import build_vocab, save_vocab
from model import DecoderRNN, EncoderCNN


def caption_batch(batch_size, vocab_size, generator):
    """Captions with COCO-like lengths (8 to 18 words plus <start>/<end>), longest first."""
    lengths = sorted(torch.randint(10, 21, (batch_size,), generator=generator).tolist(), reverse=True)
    return torch.randint(4, vocab_size, (batch_size, lengths[0]), generator=generator), lengths


def step_rate(encoder, decoder, inputs, captions, lengths, from_features, repeats):
    """Captions per second of full training steps (forward, backward, Adam)."""
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data

    def step():
        features = encoder.project(inputs) if from_features else encoder(inputs)
        loss = nn.functional.cross_entropy(decoder(features, captions, lengths), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step()  # warm-up
    return len(lengths) / median_seconds(step, repeats)


def features_vs_classic(args):
    g = torch.Generator().manual_seed(0)
    encoder = EncoderCNN(256, 'resnet152', pretrained=False).train()  # speed does not depend on the weights
    decoder = DecoderRNN(256, 512, args.vocab_size, 1).train()
    captions, lengths = caption_batch(args.classic_batch, args.vocab_size, g)
    classic = step_rate(encoder, decoder, torch.randn(args.classic_batch, 3, 224, 224), captions, lengths, False, 3)
    captions, lengths = caption_batch(128, args.vocab_size, g)
    cached = step_rate(encoder, decoder, torch.randn(128, 2048), captions, lengths, True, 5)
    report(f'training step, ResNet-152 + LSTM 512, vocabulary {args.vocab_size}', 'captions/s',
           f'classic: ResNet-152 forward per caption (batch {args.classic_batch})', classic,
           'train.py --features: cached features (batch 128)', cached)


def grouped_vs_plain(args):
    """Backbone forwards in one epoch, counted while really training on real COCO photos and captions."""
    with tempfile.TemporaryDirectory() as work:
        vocab = build_vocab(args.caption_path, 4)
        save_vocab(vocab, os.path.join(work, 'vocab.pkl'))
        results = {}
        for k in (1, 5):
            forwards = []
            real = EncoderCNN.backbone_features
            EncoderCNN.backbone_features = lambda self, x: forwards.append(len(x)) or real(self, x)
            try:
                assert train.main(['--cnn', 'efficientnet-lite0', '--image_dir', args.image_dir,
                                   '--caption_path', args.caption_path, '--vocab_path', os.path.join(work, 'vocab.pkl'),
                                   '--model_path', os.path.join(work, f'k{k}'), '--crop_size', '224',
                                   '--batch_size', '50', '--num_epochs', '1', '--num_workers', '1',
                                   '--captions_per_image', str(k), '--log_step', '5', '--device', 'cpu']) == 0
            finally:
                EncoderCNN.backbone_features = real
            log = [json.loads(line) for line in open(os.path.join(work, f'k{k}', 'train_log.jsonl'))]
            results[k] = (sum(forwards), [round(r['loss'], 2) for r in log], log[-1]['seconds'])
    report('one epoch on the real COCO val2017 photos present, efficientnet-lite0', 'forwards',
           'one sample per caption: images through the backbone', results[1][0],
           '--captions_per_image 5', results[5][0])
    print(f'  ({results[1][0] / results[5][0]:.2f}x fewer forwards; epoch time {results[1][2]:.0f} s vs '
          f'{results[5][2]:.0f} s)')
    print(f'  loss every 5 steps, plain:   {results[1][1]}\n  loss every 5 steps, grouped: {results[5][1]}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--vocab_size', type=int, default=9956, help="the classic COCO vocabulary's size")
    parser.add_argument('--classic_batch', type=int, default=16, help='batch of the classic step (time)')
    parser.add_argument('--image_dir', default='../shared/data/coco/val2017')
    parser.add_argument('--caption_path', default='../shared/data/coco/annotations/captions_val2017.json')
    args = parser.parse_args()
    print(machine())
    features_vs_classic(args)
    grouped_vs_plain(args)


if __name__ == '__main__':
    main()
