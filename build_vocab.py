"""Build the word vocabulary from a COCO-format caption file.

Captions are split into words by vocabulary.tokenize (NLTK's word_tokenize, offline). Words
seen at least `--threshold` times are kept; the rest become <unk>.
"""
import pickle
import sys
from collections import Counter

from tqdm import tqdm

from caption_files import read_captions
from errors import InputError, integer, script_parser
from files import atomic_write
from vocabulary import SPECIAL_TOKENS, Vocabulary, load_vocab, tokenize


def build_vocab(caption_path, threshold, extend=None):
    """Count the words of every caption; keep those seen `threshold` times or more, after the words
    of `extend` (a Vocabulary to grow, whose words keep their ids) or the special tokens."""
    annotations, _ = read_captions(caption_path)
    counter = Counter()
    for ann in tqdm(annotations, desc='tokenizing', unit='caption', file=sys.stderr):
        counter.update(tokenize(ann['caption']))
    vocab = Vocabulary()
    for word in [extend.idx2word[i] for i in range(len(extend))] if extend else SPECIAL_TOKENS:
        vocab.add_word(word)
    for word, count in counter.items():  # first-seen order, as the classic script
        if count >= threshold:
            vocab.add_word(word)
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
    parser.add_argument('--extend', metavar='VOCAB', help="grow this vocabulary (a model's, for fine-tuning it with "
                        'train.py --init_vocab): its words keep their ids, new words come after them')
    args = parser.parse_args(argv)
    try:
        extended = load_vocab(args.extend) if args.extend else None
        vocab = build_vocab(args.caption_path, args.threshold, extended)
    except InputError as e:
        sys.exit(f'error: {e}')
    save_vocab(vocab, args.vocab_path)
    print(f'Total vocabulary size: {len(vocab)}' + (f' ({len(vocab) - len(extended)} words added to {args.extend})'
                                                    if extended else ''))
    print(f"Saved the vocabulary to '{args.vocab_path}'")


if __name__ == '__main__':
    main()
