"""Training speed: the feature cache against the classic ResNet-per-caption step; captions grouped
per image against one sample per caption; and a self-critical step against a cross-entropy step.

    python bench/bench_training.py       # or --image_dir data/val2014 --caption_path ANN.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from timing import ROOT, SAMPLE_CAPTIONS, SAMPLE_PHOTOS, machine, median_seconds, report
from caption_files import read_captions
from metrics import CiderD
from decoding import CaptionGuard, beam_search, sample_captions
from model import AttentionDecoder, DecoderRNN, EncoderCNN
from vocabulary import tokenize


def caption_batch(batch_size, vocab_size, generator):
    """Captions with COCO-like lengths (8 to 18 words plus <start>/<end>), longest first."""
    lengths = sorted(torch.randint(10, 21, (batch_size,), generator=generator).tolist(), reverse=True)
    return torch.randint(4, vocab_size, (batch_size, lengths[0]), generator=generator), lengths


def step_rate(encoder, decoder, inputs, captions, lengths, from_features, repeats):
    """Captions per second of full cross-entropy training steps (forward, backward, Adam)."""
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


def scst_vs_cross_entropy(args, kind):
    """One self-critical step (5 samples of 25 images, mean-of-others and greedy baselines, CIDEr-D
    rewards against real references) against one cross-entropy step on 125 captions, from features."""
    g = torch.Generator().manual_seed(0)
    annotations, _ = read_captions(args.caption_path)
    references = {}
    for ann in annotations:
        references.setdefault(ann['image_id'], []).append(tokenize(ann['caption']) + ['<end>'])
    cider, ids = CiderD(references), sorted(references)
    words = sorted({w for refs in references.values() for ref in refs for w in ref})
    vocab_size = args.vocab_size
    encoder = EncoderCNN(512, 'efficientnet-lite0', pretrained=False).train()
    shape = (25, 49, 1280) if kind == 'attention' else (25, 1280)
    decoder = (AttentionDecoder(512, 512, vocab_size, 0.5) if kind == 'attention'
               else DecoderRNN(512, 512, vocab_size, 1, 0.5)).train()
    features = torch.randn(*shape, generator=g)
    captions, lengths = caption_batch(125, vocab_size, g)
    owners = torch.arange(25).repeat_interleave(5)
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params)
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    # Random ids stand in for words: ban <unk> (3), and the ids 4-40 as the hole rules' words would be.
    guard = CaptionGuard(vocab_size, banned=(3,), after=[(range(4, 12), (2,)), (range(12, 16), range(4, 40))],
                         not_last=range(4, 16), no_repeat=3)

    def ce_step():
        loss = nn.functional.cross_entropy(decoder(encoder.project(features)[owners], captions, lengths), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def scst_step(baseline):
        projected = encoder.project(features)
        samples = sample_captions(decoder, projected.repeat_interleave(5, 0), 2, 20, guard)
        drawn, log_probs, mask = samples.words, samples.log_probs, samples.mask
        to_words = lambda row: [words[i % len(words)] for i in row]  # random ids stand in for real words
        rewards = torch.tensor([cider.score(ids[i // 5 % len(ids)], to_words(r)) for i, r in enumerate(drawn.tolist())])
        if baseline == 'greedy':
            decoder.eval()
            greedy = beam_search(decoder, projected.detach(), 2, 1, 20, guard=guard).best
            decoder.train()
            base = torch.tensor([cider.score(ids[i % len(ids)], to_words(r)) for i, r in enumerate(greedy.tolist())])
            base = base.repeat_interleave(5)
        else:
            by_image = rewards.view(-1, 5)
            base = ((by_image.sum(1, keepdim=True) - by_image) / 4).view(-1)
        loss = -((rewards - base)[:, None] * log_probs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ce_step()
    ce = median_seconds(ce_step, 3)
    for baseline in ('mean', 'greedy'):
        scst_step(baseline)
        report(f'{kind} decoder, 25 images x 5 captions from cached features, vocabulary {vocab_size}',
               'steps/s', 'cross-entropy step (teacher forcing)', 1 / ce,
               f'self-critical step, {baseline} baseline', 1 / median_seconds(lambda: scst_step(baseline), 3))


def grouped_vs_plain(args):
    """One real epoch of train.py from the photos, plain and with --captions_per_image 5."""
    seconds = {}
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, 'build_vocab.py', '--caption_path', args.caption_path, '--vocab_path',
                        os.path.join(work, 'vocab.pkl'), '--threshold', '2'], cwd=ROOT, check=True,
                       capture_output=True)
        for k in (1, 5):
            subprocess.run([sys.executable, 'train.py', '--cnn', 'efficientnet-lite0', '--image_dir', args.image_dir,
                            '--caption_path', args.caption_path, '--vocab_path', os.path.join(work, 'vocab.pkl'),
                            '--model_path', os.path.join(work, f'k{k}'), '--batch_size', '50', '--num_epochs', '1',
                            '--num_workers', '1', '--captions_per_image', str(k), '--log_step', '1',
                            '--device', 'cpu'], cwd=ROOT, check=True, capture_output=True)
            log = [json.loads(line) for line in open(os.path.join(work, f'k{k}', 'train_log.jsonl'))]
            seconds[k] = log[-1]['seconds']
    report(f'one epoch of train.py from the photos of {args.caption_path}, efficientnet-lite0, batch 50',
           'epochs/min', 'one sample per caption (the classic recipe)', 60 / seconds[1],
           '--captions_per_image 5 (one backbone forward per image)', 60 / seconds[5])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--vocab_size', type=int, default=9956, help="the classic COCO vocabulary's size")
    parser.add_argument('--classic_batch', type=int, default=16, help='batch of the classic step (time)')
    parser.add_argument('--image_dir', default=SAMPLE_PHOTOS, help='photos for the grouped-captions test')
    parser.add_argument('--caption_path', default=SAMPLE_CAPTIONS, help='their COCO-format captions')
    args = parser.parse_args()
    print(machine())
    features_vs_classic(args)
    for kind in ('lstm', 'attention'):
        scst_vs_cross_entropy(args, kind)
    grouped_vs_plain(args)


if __name__ == '__main__':
    main()
