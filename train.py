"""Train the captioner on COCO-format captions, the classic Show-and-Tell recipe.

Checkpoints `encoder-{epoch}-{step}.ckpt` / `decoder-{epoch}-{step}.ckpt` go to
--model_path every --save_step batches and at each epoch's end, written atomically;
the decoder file also holds the optimizer, RNG states and arguments, so
`--resume latest` continues exactly where a killed run stopped. Ctrl-C or SIGTERM
saves and exits. A JSONL log and a loss-curve PNG are written beside them.
With --val_caption_path, each epoch ends with the validation loss and greedy
BLEU-4 and CIDEr, and the best model by CIDEr is kept as `*-best.ckpt`.
`--features DIR` trains from a cache made by extract_features.py; `torchrun
--nproc_per_node=N train.py ...` trains on N processes (DistributedDataParallel).
"""
import argparse
import contextlib
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
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm import tqdm

from build_vocab import CaptionFileError, VocabularyError, ids_to_caption, load_vocab
from data_loader import (CocoDataset, FeatureCacheError, FeatureDataset, FirstImages, GroupedDataset, collate_fn,
                         eval_transform, get_loader, read_feature_index, train_transform)
from model import (CNN_CHOICES, CheckpointError, EncoderCNN, WeightsError, build_decoder, encoder_state,
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
    parser.add_argument('--num_layers', type=int, default=1, help='LSTM layers (lstm decoder only)')
    parser.add_argument('--decoder', default='lstm', choices=('lstm', 'attention'),
                        help="lstm: the classic Show-and-Tell decoder; attention: Show, Attend and Tell's soft "
                             "attention over the backbone's feature map (needs an extract_features.py --spatial cache)")
    parser.add_argument('--num_epochs', type=int, default=5)
    parser.add_argument('--batch_size', type=int, default=128, help='captions per batch (per process)')
    parser.add_argument('--num_workers', type=int, default=2, help='data loading processes')
    parser.add_argument('--learning_rate', type=float, default=0.001)
    parser.add_argument('--lr_decay_every', type=int, default=0, help='multiply the learning rate by --lr_decay '
                        'every this many epochs (0 = constant, as the classic recipe)')
    parser.add_argument('--lr_decay', type=float, default=0.5)
    parser.add_argument('--grad_clip', type=float, default=0, help='clip the gradient norm (0 = off)')
    parser.add_argument('--dropout', type=float, default=0, help='decoder dropout (0 = classic)')
    parser.add_argument('--seed', type=int, default=0, help='seeds the weights, the shuffle and the augmentation')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu, cuda:1")
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction,
                        help='mixed precision (default: on with CUDA, off elsewhere)')
    parser.add_argument('--resume', help="a checkpoint to continue from, or 'latest' in --model_path")
    parser.add_argument('--keep_last', type=int, default=0,
                        help='keep only the newest N step checkpoints (0 = keep all)')
    speed = parser.add_argument_group('speed')
    speed.add_argument('--features', help='train from this feature cache (extract_features.py) instead of images')
    speed.add_argument('--captions_per_image', type=int, default=1,
                       help='batch k captions of an image so one backbone forward (or, from a cache, one '
                            'projection) serves them (1 = classic: one sample per caption)')
    val = parser.add_argument_group('validation')
    val.add_argument('--val_caption_path', help='COCO-format validation captions (none: no validation)')
    val.add_argument('--val_image_dir', default='data/val2014', help='validation images')
    val.add_argument('--val_features', help='validation feature cache (default: --features)')
    val.add_argument('--val_images', type=int, default=500, help='images captioned for BLEU-4 and CIDEr')
    args = parser.parse_args(argv)
    if args.decoder == 'attention' and args.num_layers != 1:
        parser.error('--decoder attention has one LSTM layer: leave out --num_layers')
    return args


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


def model_config(args, vocab_size, encoder, image_size):
    """What sample.py needs to rebuild the model and read images the way it was trained."""
    return {'cnn': args.cnn, 'decoder': args.decoder, 'embed_size': args.embed_size, 'hidden_size': args.hidden_size,
            'num_layers': args.num_layers, 'vocab_size': vocab_size, 'image_size': image_size,
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
    """Draw the loss curves (training, and validation when there is one) of a JSONL training log."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records = [r for r in read_log(log_path) if 'loss' in r]
    validation = [r for r in read_log(log_path) if 'val_loss' in r]
    if not records:
        return
    steps_per_epoch = max(r['step'] for r in records)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r['epoch'] - 1 + r['step'] / steps_per_epoch for r in records], [r['loss'] for r in records],
            label='training')
    if validation:
        ax.plot([r['epoch'] for r in validation], [r['val_loss'] for r in validation], 'o-', label='validation')
        ax.legend()
    ax.set_xlabel('epoch')
    ax.set_ylabel('loss (cross-entropy)')
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


class Captioner(nn.Module):
    """Encoder and decoder as one module (one DistributedDataParallel wrapper for both)."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, inputs, from_features=False):
        """Image embeddings from images, or from cached backbone features."""
        return self.encoder.project(inputs) if from_features else self.encoder(inputs)

    def forward(self, inputs, captions, lengths, owners=None, from_features=False):
        features = self.encode(inputs, from_features)
        if owners is not None:  # several captions per image: each caption takes its image's row
            features = features[owners]
        return self.decoder(features, captions, lengths)


def distributed():
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1, 0
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank(), world, int(os.environ.get('LOCAL_RANK', 0))


def datasets(args, vocab, encoder):
    """The training set, the validation set (or None), and the input size the model will see."""
    if args.features:
        train_set = FeatureDataset(args.features, args.caption_path, vocab, flip=True)
        image_size = train_set.index['image_size']
    else:
        train_set = CocoDataset(args.image_dir, args.caption_path, vocab,
                                train_transform(args.crop_size, encoder.mean, encoder.std))
        image_size = args.crop_size
    if args.captions_per_image > 1:
        train_set = GroupedDataset(train_set, args.captions_per_image)
    if len(train_set) == 0:
        raise CaptionFileError(f'{args.caption_path}: no caption has its image in {args.features or args.image_dir}')
    val_set = None
    if args.val_caption_path:
        val_features = args.val_features or args.features
        if val_features:
            val_set = FeatureDataset(val_features, args.val_caption_path, vocab)
        else:
            val_set = CocoDataset(args.val_image_dir, args.val_caption_path, vocab,
                                  eval_transform(image_size, encoder.mean, encoder.std))
    return train_set, val_set, image_size


@torch.inference_mode()
def validate(model, val_set, vocab, args, device, from_features):
    """Validation loss over every caption, and greedy BLEU-4 and CIDEr on the first --val_images images."""
    from evaluate import score
    model.eval()
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=collate_fn)
    for batch in tqdm(loader, desc='validation loss', unit='batch', file=sys.stderr, leave=False):
        if batch is not None:
            inputs, captions, lengths = (batch[0].to(device), batch[1].to(device), batch[2])
            targets = pack_padded_sequence(captions, lengths, batch_first=True).data
            outputs = model(inputs, captions, lengths, from_features=from_features)
            total += nn.functional.cross_entropy(outputs, targets, reduction='sum').item()
            count += targets.numel()
    predictions = {}
    images = FirstImages(val_set, args.val_images)
    for ids, inputs in torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.num_workers,
                                                   collate_fn=FirstImages.collate):
        if ids:
            inputs = inputs.to(device)
            features = model.encode(inputs, from_features)
            for image_id, row in zip(ids, model.decoder.sample(features).cpu()):
                predictions[image_id] = ids_to_caption(vocab, row)
    references = {}
    for _, caption, image_id in val_set.samples:
        references.setdefault(image_id, []).append(caption)
    scores = score(references, predictions, metrics=('Bleu_4', 'CIDEr'))
    model.train()
    return {'val_loss': total / max(count, 1), 'Bleu_4': scores['Bleu_4'], 'CIDEr': scores['CIDEr']}


def train(args):
    rank, world, local_rank = distributed()
    device = torch.device('cuda', local_rank) if world > 1 and torch.cuda.is_available() else pick_device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    use_amp = args.amp if args.amp is not None else device.type == 'cuda'
    amp_dtype = torch.bfloat16 if device.type != 'cuda' or torch.cuda.is_bf16_supported() else torch.float16
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    vocab = load_vocab(args.vocab_path)
    attention = args.decoder == 'attention'
    for cache in {args.features, args.val_features} - {None}:  # before the backbone is built (or downloaded)
        index = read_feature_index(cache)
        if index['cnn'] != args.cnn:
            raise FeatureCacheError(f'{cache}: cached with --cnn {index["cnn"]}, not {args.cnn}')
        if index.get('spatial', False) != attention:
            raise FeatureCacheError(f'{cache}: --decoder {args.decoder} needs a cache built ' +
                                    ('with' if attention else 'without') + ' extract_features.py --spatial')
    encoder = EncoderCNN(args.embed_size, args.cnn, spatial=attention)
    decoder = build_decoder(vars(args), len(vocab), dropout=args.dropout)
    train_set, val_set, image_size = datasets(args, vocab, encoder)
    config = model_config(args, len(vocab), encoder, image_size)
    model = Captioner(encoder, decoder).to(device)
    params = list(decoder.parameters()) + list(encoder.linear.parameters()) + list(encoder.bn.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    scaler = torch.amp.GradScaler(enabled=use_amp and amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    from_features = args.features is not None
    main_process = rank == 0

    os.makedirs(args.model_path, exist_ok=True)
    log_path = os.path.join(args.model_path, LOG_NAME)
    # Where training stands; saved in every checkpoint so that a resumed run carries on exactly.
    progress = args.resume and resume(args, config, encoder, decoder, optimizer, log_path, main_process)
    if not progress:
        progress = {'epoch': 1, 'step': 0, 'window': [], 'skipped': 0, 'seconds': 0.0, 'best_cider': None}
        if main_process:
            open(log_path, 'w').close()  # a fresh run starts a fresh log
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == 'cuda' else None) \
        if world > 1 else model

    # A batch holds --batch_size captions: with --captions_per_image k, that is batch_size // k images.
    per_batch = max(1, args.batch_size // args.captions_per_image) if isinstance(train_set, GroupedDataset) \
        else args.batch_size
    loader = get_loader(None, None, vocab, None, per_batch, shuffle=True, num_workers=args.num_workers,
                        seed=args.seed, dataset=train_set, num_replicas=world, rank=rank)
    sampler = loader.sampler
    total_steps = math.ceil(sampler.num_samples / per_batch)

    def save(name, with_state=True):
        progress['seconds'] = time.time() - started
        train_state = {'optimizer': optimizer.state_dict(), 'progress': progress, 'rng': rng_state(),
                       'args': vars(args)}
        save_checkpoint({'config': config, 'model': encoder_state(encoder, args.cnn)},
                        os.path.join(args.model_path, f'encoder-{name}.ckpt'))
        save_checkpoint({'config': config, 'model': decoder.state_dict(),
                         **({'train_state': train_state} if with_state else {})},
                        os.path.join(args.model_path, f'decoder-{name}.ckpt'))
        if args.keep_last:
            prune_checkpoints(args.model_path, args.keep_last)

    def log(record):
        log_file.write(json.dumps({**record, 'seconds': round(time.time() - started, 2)}) + '\n')
        log_file.flush()

    started = time.time() - progress['seconds']
    model.train()
    with StopRequest() as stop, open(log_path, 'a') if main_process else contextlib.nullcontext() as log_file:
        while progress['epoch'] <= args.num_epochs:
            epoch = progress['epoch']
            sampler.set_epoch(epoch)
            sampler.start = progress['step'] * per_batch
            if args.lr_decay_every:
                for group in optimizer.param_groups:
                    group['lr'] = args.learning_rate * args.lr_decay ** ((epoch - 1) // args.lr_decay_every)
            bar = tqdm(loader, desc=f'epoch {epoch}/{args.num_epochs}', total=total_steps, initial=progress['step'],
                       unit='batch', file=sys.stderr, dynamic_ncols=True, disable=not main_process)
            for batch in bar:
                progress['step'] = step = progress['step'] + 1
                expected = min(per_batch, sampler.num_samples - (step - 1) * per_batch)
                progress['skipped'] += expected - (len(batch[0]) if batch else 0)
                if batch is not None and len(batch[0]) < 2:
                    tqdm.write(f'step {step}: skipped a batch of one sample (BatchNorm needs two)', file=sys.stderr)
                elif batch is not None:
                    inputs, captions, lengths = batch[0].to(device), batch[1].to(device), batch[2]
                    owners = batch[3].to(device) if len(batch) == 4 else None
                    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss = criterion(ddp(inputs, captions, lengths, owners, from_features).float(), targets)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if args.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(params, args.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    progress['window'].append(loss.item())
                    bar.set_postfix(loss=f'{loss.item():.3f}', perplexity=f'{math.exp(loss.item()):.1f}')
                if step % args.log_step == 0 and progress['window']:
                    mean_loss = sum(progress['window']) / len(progress['window'])
                    if main_process:
                        log({'epoch': epoch, 'step': step, 'loss': mean_loss, 'perplexity': math.exp(mean_loss)})
                    progress['window'] = []
                if step == total_steps:  # the epoch is done: validate; its checkpoint resumes at the next one
                    if progress['skipped']:
                        tqdm.write(f"epoch {epoch}: skipped {progress['skipped']} unreadable images", file=sys.stderr)
                    if val_set is not None and main_process:
                        scores = validate(model, val_set, vocab, args, device, from_features)
                        log({'epoch': epoch, 'step': step, **scores})
                        tqdm.write(f"epoch {epoch}: validation loss {scores['val_loss']:.4f}, "
                                   f"BLEU-4 {scores['Bleu_4']:.4f}, CIDEr {scores['CIDEr']:.4f}", file=sys.stderr)
                        if progress['best_cider'] is None or scores['CIDEr'] > progress['best_cider']:
                            progress['best_cider'] = scores['CIDEr']
                            save('best', with_state=False)
                    progress.update(epoch=epoch + 1, step=0, skipped=0)
                if main_process and (step % args.save_step == 0 or step == total_steps or stop.signum):
                    save(f'{epoch}-{step}')
                if stop.signum:
                    bar.close()
                    print(f'stopped by {signal.Signals(stop.signum).name} at epoch {epoch} step {step}; '
                          f"continue with --resume latest", file=sys.stderr)
                    return 128 + stop.signum
            bar.close()
            if world > 1:
                dist.barrier()
    if main_process:
        plot_log(log_path, os.path.join(args.model_path, PLOT_NAME))
    if world > 1:
        dist.destroy_process_group()
    return 0


def resume(args, config, encoder, decoder, optimizer, log_path, main_process=True):
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
    saved = {'decoder': 'lstm', **dec['config']}  # checkpoints from before --decoder were all lstm
    if saved != config:
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        raise CheckpointError(f'{decoder_path}: was trained with other settings (saved, now): {changed}')
    encoder.load_state_dict(enc['model'], strict=False)
    decoder.load_state_dict(dec['model'])
    state = dec['train_state']
    optimizer.load_state_dict(state['optimizer'])
    set_rng_state(state['rng'])
    progress = state['progress']
    position = (progress['epoch'], progress['step'])
    if main_process:
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
    except (CaptionFileError, VocabularyError, CheckpointError, WeightsError, FeatureCacheError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    sys.exit(main())
