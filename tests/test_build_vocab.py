import json
import os
import pickle
from collections import Counter

import pytest

import build_vocab
import vocabulary
from build_vocab import save_vocab
from vocabulary import Vocabulary, load_vocab, tokenize
from caption_files import read_captions
from errors import InputError
from conftest import ROOT, TEST_DATA, run_script, shared_path

TRICKY = ['A man riding a wave on top of a surfboard.', 'Two dogs. One cat.', "The dog's \"ball\" isn't red!",
          'A sign reads: St. Louis 5.5 mi., U.S.A.', '  ', '', 'Café au lait... (with foam) — yum?',
          'a  b\tc\nd', "people's 'quoted' text, ok?", 'mr. smith. dr. who. etc.']


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_tokenize_matches_nltk_word_tokenize(nltk_reference):
    annotations, _ = read_captions(os.path.join(TEST_DATA, 'captions.json'))
    for caption in TRICKY + [a['caption'] for a in annotations]:
        assert tokenize(caption) == nltk_reference(caption.lower()), caption


def test_vocab_counts_match_nltk_on_official_val2017(nltk_reference, tmp_path):
    caption_path = shared_path('data', 'coco', 'annotations', 'captions_val2017.json')
    build_vocab.main(['--caption_path', caption_path, '--vocab_path', str(tmp_path / 'v.pkl')])
    counter = Counter()
    for ann in json.load(open(caption_path))['annotations']:
        counter.update(nltk_reference(ann['caption'].lower()))
    expected = list(vocabulary.SPECIAL_TOKENS) + [w for w, c in counter.items() if c >= 4]
    vocab = load_vocab(str(tmp_path / 'v.pkl'))
    assert [vocab.idx2word[i] for i in range(len(vocab))] == expected


def test_vocabulary_ids_threshold_and_order(tmp_path):
    """'cat' is seen exactly --threshold (2) times and kept; '.' and 'bird' once and dropped."""
    captions = {'images': [{'id': 1, 'file_name': 'a.jpg'}],
                'annotations': [{'id': i, 'image_id': 1, 'caption': c} for i, c in
                                enumerate(['Zebra dog.', 'zebra cat', 'dog zebra', 'dog bird', 'Cat'])]}
    vocab = build_vocab.build_vocab(write_json(tmp_path / 'c.json', captions), threshold=2)
    assert [vocab.idx2word[i] for i in range(len(vocab))] == ['<pad>', '<start>', '<end>', '<unk>', 'zebra', 'dog',
                                                              'cat']
    assert vocab('dog') == 5 and vocab('bird') == vocab('<unk>') == 3 and len(vocab) == 7
    assert vocab.words([1, 4, 3, 5, 0, 2, 4]) == ['zebra', '<unk>', 'dog']  # up to <end>, no <start>/<pad>


def test_main_writes_a_vocabulary(tmp_path, capsys):
    out = tmp_path / 'sub' / 'vocab.pkl'
    build_vocab.main(['--caption_path', os.path.join(TEST_DATA, 'captions.json'), '--vocab_path', str(out),
                      '--threshold', '1'])
    vocab = load_vocab(str(out))
    assert 'Total vocabulary size: %d' % len(vocab) in capsys.readouterr().out
    annotations, _ = read_captions(os.path.join(TEST_DATA, 'captions.json'))
    words = {w for a in annotations for w in tokenize(a['caption'])}
    assert set(vocab.word2idx) == words | set(vocabulary.SPECIAL_TOKENS)
    assert not [p for p in os.listdir(tmp_path / 'sub') if p.endswith('.tmp')]


def test_crash_while_saving_a_vocabulary_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'vocab.pkl')
    old = Vocabulary()
    for word in vocabulary.SPECIAL_TOKENS + ('giraffe',):
        old.add_word(word)
    save_vocab(old, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b'half a pickle')
        raise OSError('disk full')
    monkeypatch.setattr(pickle, 'dump', crash)
    with pytest.raises(OSError):
        save_vocab(Vocabulary(), path)
    assert load_vocab(path)('giraffe') == 4 and os.listdir(tmp_path) == ['vocab.pkl']


def test_loads_classic_vocab_pickled_from_main(tmp_path):
    """The published vocab.pkl was pickled by a script: its class is __main__.Vocabulary."""
    path = tmp_path / 'vocab.pkl'
    script = ('import pickle\n'
              'class Vocabulary(object):\n'
              '    def __init__(self): self.word2idx = {}; self.idx2word = {}; self.idx = 0\n'
              'v = Vocabulary()\n'
              "for w in ['<pad>', '<start>', '<end>', '<unk>', 'a', 'giraffe']:\n"
              '    v.word2idx[w] = v.idx; v.idx2word[v.idx] = w; v.idx += 1\n'
              f'pickle.dump(v, open({str(path)!r}, "wb"), protocol=PROTOCOL)\n')
    for protocol in (0, 2, 4):
        result = run_script('-c', script.replace('PROTOCOL', str(protocol)))
        assert result.returncode == 0, result.stderr
        vocab = load_vocab(str(path))
        assert isinstance(vocab, Vocabulary) and len(vocab) == 6 and vocab('giraffe') == 5 and vocab('zzz') == 3


class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_vocab_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(InputError, match='evil.pkl.*refusing to load posix.system'):
        load_vocab(str(path))
    assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('content, problem', [
    (b'not a pickle', 'not a usable vocabulary'),
    (pickle.dumps({'word2idx': {}}), 'not a usable vocabulary'),
    (b'', 'not a usable vocabulary'),
])
def test_bad_vocab_files(tmp_path, content, problem):
    path = tmp_path / 'vocab.pkl'
    path.write_bytes(content)
    with pytest.raises(InputError, match=problem):
        load_vocab(str(path))
    with pytest.raises(InputError, match='no such vocabulary file'):
        load_vocab(str(tmp_path / 'absent.pkl'))


@pytest.mark.parametrize('data, problem', [
    ('{not json', 'not valid JSON'),
    ('[]', 'not a COCO caption file'),
    ('{"images": []}', 'not a COCO caption file'),
    ('{"images": 3, "annotations": []}', 'not a COCO caption file'),
    ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] lacks a 'file_name'"),
    ('{"images": [{"file_name": "a.jpg"}], "annotations": []}', "not a COCO caption file \\(an entry lacks 'id'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1}]}',
     r"annotations\[0\] lacks a 'caption' string"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "caption": "x"}]}',
     "an entry lacks 'image_id'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 2, "caption": "x"}]}',
     'names image_id 2'),
    ('{"images": [{"id": 1, "file_name": "../etc/passwd"}], "annotations": []}', 'outside the image folder'),
    ('{"images": [{"id": 1, "file_name": "/etc/passwd"}], "annotations": []}', 'outside the image folder'),
])
def test_bad_caption_files_are_refused_up_front(tmp_path, data, problem):
    path = tmp_path / 'captions.json'
    path.write_text(data)
    with pytest.raises(InputError, match=problem):
        read_captions(str(path))


def test_bad_caption_file_gives_one_line_error(tmp_path):
    path = tmp_path / 'captions.json'
    path.write_text('{"images": 3}')
    result = run_script('build_vocab.py', '--caption_path', str(path), '--vocab_path', str(tmp_path / 'v.pkl'))
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {path}: not a COCO caption file (needs 'images' and 'annotations' lists)"
    assert not (tmp_path / 'v.pkl').exists()


def test_empty_and_non_ascii_captions(tmp_path):
    captions = {'images': [{'id': 1, 'file_name': 'a.jpg'}],
                'annotations': [{'id': i, 'image_id': 1, 'caption': c}
                                for i, c in enumerate(['', 'Ein Café', 'ein café', '日本の 猫'])]}
    vocab = build_vocab.build_vocab(write_json(tmp_path / 'c.json', captions), threshold=2)
    assert vocab('café') == 5 and vocab('ein') == 4


def test_repo_has_no_nltk_data_dependency():
    """The tokenizer must work without NLTK's downloadable punkt data (users rarely have it)."""
    result = run_script('-c', 'import nltk, build_vocab; nltk.data.path[:] = ["/nonexistent"]; '
                        'print(build_vocab.tokenize("Two dogs. A cat."))', cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['two', 'dogs', '.', 'a', 'cat', '.']"
