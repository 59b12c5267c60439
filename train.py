"""Train the captioner on COCO-format captions, the classic Show-and-Tell recipe.

Checkpoints `encoder-{epoch}-{step}.ckpt` / `decoder-{epoch}-{step}.ckpt` go to
--model_path every --save_step batches and at each epoch's end, written atomically;
the decoder file also holds the optimizer, RNG states and arguments, so
`--resume latest` continues exactly where a killed run stopped. Ctrl-C or SIGTERM
saves and exits. A JSONL log and a loss-curve PNG are written beside them.
"""
import argparse
import glob
import json
import math
import os
import random
import re
import signal
import sys
import time

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm import tqdm

from build_vocab import CaptionFileError, VocabularyError, load_vocab
from data_loader import get_loader, train_transform
from model import (CNN_CHOICES, CheckpointError, DecoderRNN, EncoderCNN, WeightsError, encoder_state,
                   load_checkpoint, pick_device, save_checkpoint)

CHECKPOINT_NAME = re.compile(r'decoder-(\d+)-(\d+)\.ckpt$')
LOG_NAME, PLOT_NAME = 'train_log.jsonl', 'loss.png'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model_path', default='models/', help='folder for checkpoints, log and plot')
    parser.add_argument('--crop_size', type=int, default=224, help='size of the random crop')
    parser.add_argument('--vocab_path', default='data/vocab.pkl', help='vocabulary from build_vocab.py')
    parser.add_argument('--image_dir', default='data/resized2014', help='resized training images')
    parser.add_argument('--caption_path', default='data/annotations/captions_train2014.json',
                        help='COCO-format training captions')
    parser.add_argument('--log_step', type=int, default=10, help='batches between log lines')
    parser.add_argument('--save_step', type=int, default=1000, help='batches between checkpoints')
    parser.add_argument('--cnn', default='resnet152', choices=CNN_CHOICES, help='pretrained backbone')
    parser.add_argument('--embed_size', type=int, default=256, help='word and image embedding size')
    parser.add_argument('--hidden_size', type=int, default=512, help='LSTM hidden size')
    parser.add_argument('--num_layers', type=int, default=1, help='LSTM layers')
    parser.add_argument('--num_epochs', type=int, default=5)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--num_workers', type=int, default=2, help='data loading processes')
    parser.add_argument('--learning_rate', type=float, default=0.001)
    parser.add_argument('--seed', type=int, default=0, help='seeds the weights, the shuffle and the augmentation')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu, cuda:1")
    parser.add_argument('--resume', help="a checkpoint to continue from, or 'latest' in --model_path")
    parser.add_argument('--keep_last', type=int, default=0,
                        help='keep only the newest N step checkpoints (0 = keep all)')
    return parser.parse_args(argv)


def checkpoint_pair(path):
    """The (encoder, decoder) file names for a checkpoint named by either of its two files."""
    folder, name = os.path.split(path)
    suffix = name.split('-', 1)[1] if '-' in name else name
    return os.path.join(folder, 'encoder-' + suffix), os.path.join(folder, 'decoder-' + suffix)


def saved_checkpoints(model_path):
    """Decoder checkpoints in model_path, oldest first, by (epoch, step)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(model_path), 'decoder-*-*.ckpt')):
        match = CHECKPOINT_NAME.search(os.path.basename(path))
        if match:
            found.append((int(match[1]), int(match[2]), path))
    return [path for _, _, path in sorted(found)]


def find_resume(resume, model_path):
    """Resolve --resume to an (encoder, decoder) pair; 'latest' is the newest complete pair, or None."""
    if resume != 'latest':
        return checkpoint_pair(resume)
    for path in reversed(saved_checkpoints(model_path)):
        encoder_path, decoder_path = checkpoint_pair(path)
        if os.path.exists(encoder_path):
            return encoder_path, decoder_path
    return None


def prune_checkpoints(model_path, keep_last):
    """Delete all but the newest `keep_last` step checkpoints (best checkpoints are named otherwise)."""
    for path in saved_checkpoints(model_path)[:-keep_last]:
        for old in checkpoint_pair(path)[::-1]:  # decoder first: an encoder alone is never picked up
            os.remove(old)


def model_config(args, vocab_size, encoder):
    """What sample.py needs to rebuild the model and read images the way it was trained."""
    return {'cnn': args.cnn, 'embed_size': args.embed_size, 'hidden_size': args.hidden_size,
            'num_layers': args.num_layers, 'vocab_size': vocab_size, 'image_size': args.crop_size,
            'mean': list(encoder.mean), 'std': list(encoder.std)}


def rng_state():
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def read_log(path):
    """The records of a JSONL log; a line cut short by a crash is ignored."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def plot_log(log_path, png_path):
    """Draw the loss curve of a JSONL training log."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records = read_log(log_path)
    if not records:
        return
    steps_per_epoch = max(r['step'] for r in records)
    x = [r['epoch'] - 1 + r['step'] / steps_per_epoch for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r['loss'] for r in records])
    ax.set_xlabel('epoch')
    ax.set_ylabel('training loss (cross-entropy)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class StopRequest:
    """While active, SIGINT and SIGTERM ask training to save and stop after the current step."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = [signal.signal(signum, self.handle) for signum in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for signum, handler in zip(self.SIGNALS, self.previous):
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data loader worker: the main process does the saving
            return
        self.signum = signum
        tqdm.write(f'{signal.Signals(signum).name}: saving a checkpoint after this step', file=sys.stderr)


def train(args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    vocab = load_vocab(args.vocab_path)
    encoder = EncoderCNN(args.embed_size, args.cnn).to(device)
    decoder = DecoderRNN(args.embed_size, args.hidden_size, len(vocab), args.num_layers).to(device)
    config = model_config(args, len(vocab), encoder)
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    criterion = nn.CrossEntropyLoss()

    os.makedirs(args.model_path, exist_ok=True)
    log_path = os.path.join(args.model_path, LOG_NAME)
    # Where training stands; saved in every checkpoint so that a resumed run carries on exactly.
    progress = args.resume and resume(args, config, encoder, decoder, optimizer, log_path)
    if not progress:
        progress = {'epoch': 1, 'step': 0, 'window': [], 'skipped': 0, 'seconds': 0.0}
        open(log_path, 'w').close()  # a fresh run starts a fresh log

    loader = get_loader(args.image_dir, args.caption_path, vocab,
                        train_transform(args.crop_size, encoder.mean, encoder.std),
                        args.batch_size, shuffle=True, num_workers=args.num_workers, seed=args.seed)
    sampler = loader.sampler
    if sampler.size == 0:
        raise CaptionFileError(f'{args.caption_path}: no caption has its image in {args.image_dir}')
    total_steps = math.ceil(sampler.size / args.batch_size)

    def save(epoch, step):
        name = f'{epoch}-{step}.ckpt'
        progress['seconds'] = time.time() - started
        train_state = {'optimizer': optimizer.state_dict(), 'progress': progress, 'rng': rng_state(),
                       'args': vars(args)}
        save_checkpoint({'config': config, 'model': encoder_state(encoder, args.cnn)},
                        os.path.join(args.model_path, 'encoder-' + name))
        save_checkpoint({'config': config, 'model': decoder.state_dict(), 'train_state': train_state},
                        os.path.join(args.model_path, 'decoder-' + name))
        if args.keep_last:
            prune_checkpoints(args.model_path, args.keep_last)

    started = time.time() - progress['seconds']
    encoder.train()
    decoder.train()
    with StopRequest() as stop, open(log_path, 'a') as log:
        while progress['epoch'] <= args.num_epochs:
            epoch = progress['epoch']
            sampler.epoch, sampler.start = epoch, progress['step'] * args.batch_size
            bar = tqdm(loader, desc=f'epoch {epoch}/{args.num_epochs}', total=total_steps, initial=progress['step'],
                       unit='batch', file=sys.stderr, dynamic_ncols=True)
            for batch in bar:
                progress['step'] = step = progress['step'] + 1
                expected = min(args.batch_size, sampler.size - (step - 1) * args.batch_size)
                progress['skipped'] += expected - (len(batch[2]) if batch else 0)
                if batch is not None and len(batch[2]) < 2:
                    tqdm.write(f'step {step}: skipped a batch of one sample (BatchNorm needs two)', file=sys.stderr)
                elif batch is not None:
                    images, captions, lengths = batch
                    images, captions = images.to(device), captions.to(device)
                    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
                    loss = criterion(decoder(encoder(images), captions, lengths), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    progress['window'].append(loss.item())
                    bar.set_postfix(loss=f'{loss.item():.3f}', perplexity=f'{math.exp(loss.item()):.1f}')
                if step % args.log_step == 0 and progress['window']:
                    mean_loss = sum(progress['window']) / len(progress['window'])
                    log.write(json.dumps({'epoch': epoch, 'step': step, 'loss': mean_loss,
                                          'perplexity': math.exp(mean_loss),
                                          'seconds': round(time.time() - started, 2)}) + '\n')
                    log.flush()
                    progress['window'] = []
                if step % args.save_step == 0 or step == total_steps or stop.signum:
                    if step == total_steps:  # the epoch is done: its checkpoint resumes at the next one
                        if progress['skipped']:
                            tqdm.write(f"epoch {epoch}: skipped {progress['skipped']} unreadable images",
                                       file=sys.stderr)
                        progress.update(epoch=epoch + 1, step=0, skipped=0)
                    save(epoch, step)
                if stop.signum:
                    bar.close()
                    print(f'stopped by {signal.Signals(stop.signum).name} at epoch {epoch} step {step}; '
                          f"continue with --resume latest", file=sys.stderr)
                    return 128 + stop.signum
            bar.close()
    plot_log(log_path, os.path.join(args.model_path, PLOT_NAME))
    return 0


def resume(args, config, encoder, decoder, optimizer, log_path):
    """Load a training checkpoint into the models and optimizer; returns its progress.

    Returns None when `--resume latest` finds no checkpoint yet (training starts afresh).
    """
    found = find_resume(args.resume, args.model_path)
    if found is None:
        print(f'no checkpoint in {args.model_path} yet: starting afresh', file=sys.stderr)
        return None
    encoder_path, decoder_path = found
    enc, dec = load_checkpoint(encoder_path), load_checkpoint(decoder_path)
    if not isinstance(dec, dict) or 'train_state' not in dec or not isinstance(enc, dict) or 'model' not in enc:
        raise CheckpointError(f'{decoder_path}: not a train.py checkpoint (no training state to resume)')
    if dec['config'] != config:
        changed = {k: (dec['config'].get(k), v) for k, v in config.items() if dec['config'].get(k) != v}
        raise CheckpointError(f'{decoder_path}: was trained with other settings (saved, now): {changed}')
    encoder.load_state_dict(enc['model'], strict=False)
    decoder.load_state_dict(dec['model'])
    state = dec['train_state']
    optimizer.load_state_dict(state['optimizer'])
    set_rng_state(state['rng'])
    progress = state['progress']
    position = (progress['epoch'], progress['step'])
    kept = [r for r in read_log(log_path) if (r['epoch'], r['step']) <= position]
    with open(log_path, 'w') as f:  # drop log lines written after the checkpoint
        f.writelines(json.dumps(r) + '\n' for r in kept)
    print(f'resuming from {decoder_path} (epoch {progress["epoch"]}, step {progress["step"]} done)',
          file=sys.stderr)
    return progress


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (CaptionFileError, VocabularyError, CheckpointError, WeightsError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    sys.exit(main())
