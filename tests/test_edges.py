"""The edges a careless or unlucky user meets: resumes past an epoch's end, kills and full disks
while a model or cache is written, huge and odd images, huge captions, bad numbers typed or
recorded, NaN scores, a rerun into an earlier run's folder, CPUs without bfloat16."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import build_vocab
import checkpoints
import evaluate
import export_model
import extract_features
import resize
import sample
import train
from captioner import SHIPPED_FILES, Captioner
from checkpoints import read_model, write_model
from conftest import ROOT, TEST_DATA, make_scenes, train_args
from data_loader import FeatureDataset, at_least
from errors import InputError
from images import ImageError, open_image
from decoding import ARTICLES, CaptionGuard, Decoding, beam_search, caption_guard, has_hole
from model import ModelConfig
from vocabulary import load_vocab

NO_PROCESS = 4194304  # above any Linux pid_max: no process has this id


def run_train(*args, env=None, timeout=900):
    """train.py in a process of its own (a hang fails the test instead of stalling the suite)."""
    return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def test_a_resume_past_the_end_of_this_runs_epoch_goes_on_with_the_next(tmp_path):
    """Saved at step 3 of 4 with batches of 2, resumed with batches of 8 (one step an epoch): the
    epoch ends at once with a note, the next one trains, and nothing prints in a loop."""
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    first = run_train(*train_args(folder, models, '--num_epochs', '1', '--batch_size', '2', '--save_step', '3'))
    assert first.returncode == 0, first.stderr[-2000:]
    for path in checkpoints.model_files(str(models / 'decoder-1-4.ckpt')):
        os.remove(path)  # as if killed after step 3
    resumed = run_train(*train_args(folder, models, '--num_epochs', '2', '--batch_size', '8', '--resume', 'latest'))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epoch 1: the checkpoint resumed stopped at step 3, and this run's epoch has 1 steps: the epoch ends " \
           "here" in resumed.stderr
    assert (models / 'decoder-2-1.ckpt').exists() and len(resumed.stderr) < 20_000


def small_model(folder, name, seed):
    """A tiny model's two files written by write_model; returns their paths."""
    torch.manual_seed(seed)
    config = ModelConfig(cnn='efficientnet-lite0', embed_size=4, hidden_size=6, vocab_size=7, image_size=32)
    state = lambda *shape: {'embed.weight': torch.randn(7, 4), 'linear.weight': torch.randn(*shape)}
    paths = str(folder / f'encoder-{name}.ckpt'), str(folder / f'decoder-{name}.ckpt')
    write_model(*paths, config, Decoding(), {'linear.weight': torch.randn(4, 1280)}, state(7, 6))
    return paths


def test_a_model_is_written_as_one_unit(tmp_path, monkeypatch):
    """A kill between the two files' renames leaves a pair that is refused, naming both files; a full
    disk says so in one line and leaves the old pair as it was; a killed writer's temporary is
    removed by the next write into its folder."""
    leftover = tmp_path / f'.decoder-x.ckpt.{NO_PROCESS}.tmp'
    leftover.write_bytes(b'half a checkpoint')
    paths = small_model(tmp_path, 'x', seed=0)
    assert not leftover.exists()
    before = [open(p, 'rb').read() for p in paths]
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(InputError, match=r'decoder-x.ckpt: no space left on the device \(the files there before '
                                         r'are unchanged\)'):
        small_model(tmp_path, 'x', seed=1)
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert [open(p, 'rb').read() for p in paths] == before
    assert sorted(os.listdir(tmp_path)) == ['decoder-x.ckpt', 'encoder-x.ckpt']
    real_replace, renamed = os.replace, []

    def killed_after_one(src, dst):
        if renamed:
            raise KeyboardInterrupt  # the process dies between the encoder's rename and the decoder's
        renamed.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        small_model(tmp_path, 'x', seed=2)
    monkeypatch.setattr(os, 'replace', real_replace)
    with pytest.raises(InputError) as refused:
        read_model(*paths)
    assert str(refused.value) == f'{paths[0]} and {paths[1]}: not written together (an interrupted write, or ' \
                                 'files of two models): write the model again, or name the right pair'


def test_export_checks_the_vocabulary_and_refuses_its_own_folder(tiny_model, tmp_path):
    flags = ['--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder']]
    hostile = tmp_path / 'hostile.pkl'
    hostile.write_bytes(pickle.dumps(os.system))
    vocab = load_vocab(tiny_model['vocab'])
    vocab.add_word('zebra')
    pickle.dump(vocab, open(tmp_path / 'bigger.pkl', 'wb'))
    cases = [(str(hostile), tmp_path / 'a', 'hostile.pkl: not a usable vocabulary (refusing to load posix.system'),
             (str(tmp_path / 'bigger.pkl'), tmp_path / 'b', 'but ' + str(tmp_path / 'bigger.pkl') + ' has')]
    for vocab_path, output, message in cases:
        with pytest.raises(SystemExit) as refused:
            export_model.main(flags + ['--vocab_path', vocab_path, '--output_dir', str(output)])
        assert message in str(refused.value)
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    export_model.main(flags + ['--vocab_path', tiny_model['vocab'], '--output_dir', str(tmp_path / 'out')])
    assert sorted(os.listdir(tmp_path / 'out')) == ['decoder.ckpt', 'encoder.ckpt', 'vocab.pkl']
    with pytest.raises(SystemExit, match='holds the model being exported'):  # exporting onto its own input
        export_model.main(['--encoder_path', str(tmp_path / 'out' / 'encoder.ckpt'), '--decoder_path',
                           str(tmp_path / 'out' / 'decoder.ckpt'), '--vocab_path', str(tmp_path / 'out' / 'vocab.pkl'),
                           '--output_dir', str(tmp_path / 'out')])
    swapped = load_vocab(tiny_model['vocab'])  # the same size, two words swapped
    a, b = swapped.idx2word[5], swapped.idx2word[6]
    swapped.idx2word[5], swapped.idx2word[6], swapped.word2idx[a], swapped.word2idx[b] = b, a, 6, 5
    pickle.dump(swapped, open(tmp_path / 'out' / 'vocab.pkl', 'wb'))
    with pytest.raises(InputError, match='trained with another vocabulary than .* \\(same size, other words\\)'):
        Captioner.load(str(tmp_path / 'out' / 'encoder.ckpt'), str(tmp_path / 'out' / 'decoder.ckpt'),
                       str(tmp_path / 'out' / 'vocab.pkl'), 'cpu')


@pytest.mark.parametrize('kill_at', ['renames', 'index'])
def test_a_cache_killed_while_it_is_finished_is_finished_by_the_rerun(tmp_path, monkeypatch, kill_at):
    """Killed between renaming the two arrays, or before writing index.json: the rerun completes the cache."""
    folder = make_scenes(tmp_path, size=40)
    flags = ['--image_dir', str(folder / 'images'), '--caption_path', str(folder / 'captions.json'), '--output_dir',
             str(tmp_path / 'cache'), '--cnn', 'efficientnet-lite0', '--image_size', '32', '--flip', '--num_workers',
             '0', '--device', 'cpu']
    real_replace, real_write = os.replace, extract_features.write_json

    def replace_one_then_die(src, dst):
        if dst.endswith('features_flip.npy'):
            raise KeyboardInterrupt
        real_replace(src, dst)

    def die_at_the_index(obj, path):
        if path.endswith('index.json'):
            raise KeyboardInterrupt
        real_write(obj, path)
    if kill_at == 'renames':
        monkeypatch.setattr(extract_features.os, 'replace', replace_one_then_die)
    else:
        monkeypatch.setattr(extract_features, 'write_json', die_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        extract_features.main(flags)
    monkeypatch.undo()
    extract_features.main(flags)
    assert sorted(os.listdir(tmp_path / 'cache')) == ['features.npy', 'features_flip.npy', 'index.json']
    vocab = load_vocab(str(folder / 'vocab.pkl'))
    assert len(FeatureDataset(str(tmp_path / 'cache'), str(folder / 'captions.json'), vocab)) == 8


def test_images_cost_memory_in_proportion_to_what_the_model_needs(tmp_path, tiny_model, capsys):
    Image.new('L', (80_000_000, 1)).save(tmp_path / 'line.png')  # 233 KB on disk
    with pytest.raises(SystemExit) as refused:
        sample.main(['--image', str(tmp_path / 'line.png'), '--encoder_path', tiny_model['encoder'],
                     '--decoder_path', tiny_model['decoder'], '--vocab_path', tiny_model['vocab']])
    assert str(refused.value) == f'error: {tmp_path / "line.png"}: refused: 80000000x1 is over 50 megapixels'
    Image.new('RGB', (20000, 60), 'red').save(tmp_path / 'wide.jpg')
    Image.new('RGB', (50, 40), 'blue').save(tmp_path / 'fine.jpg')
    assert at_least(224, open_image(str(tmp_path / 'wide.jpg'))).size == (224, 224)  # not 20000 x 20000
    assert resize.resize_images(str(tmp_path), str(tmp_path / 'out'), 32, num_workers=1) == (2, 0, 1)
    assert 'skipped ' + str(tmp_path / 'line.png') + ': refused' in capsys.readouterr().err
    pixels = (np.arange(3000 * 3000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(3000, 3000)
    Image.fromarray(pixels).save(tmp_path / 'deep.png')  # 16-bit
    tracemalloc.start()
    grey = open_image(str(tmp_path / 'deep.png'))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3000 * 3000 * 8  # no float64 copy of the whole image
    assert np.asarray(grey)[0, [128, 129, 2570, 2699], 0].tolist() == [0, 1, 10, 11]  # 16-bit values / 257, rounded


def test_only_regular_files_are_opened(tmp_path, tiny_model):
    """A FIFO named like a photo is skipped with a warning; sample.py neither hangs nor stops."""
    os.mkfifo(tmp_path / 'x.jpg')
    Image.new('RGB', (50, 40), 'blue').save(tmp_path / 'y.jpg')
    result = subprocess.run([sys.executable, 'sample.py', '--image', str(tmp_path), '--encoder_path',
                             tiny_model['encoder'], '--decoder_path', tiny_model['decoder'], '--vocab_path',
                             tiny_model['vocab'], '--num_workers', '0'], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert f'warning: skipped {tmp_path / "x.jpg"}: not a regular file (a FIFO, socket or device)' in result.stderr
    assert result.stdout.startswith(f'{tmp_path / "y.jpg"}\t') and 'Traceback' not in result.stderr
    with pytest.raises(ImageError, match='x.jpg: not a regular file'):
        open_image(str(tmp_path / 'x.jpg'))


def test_huge_captions_are_cut_before_tokenising_or_scoring(tmp_path, capsys):
    data = json.load(open(os.path.join(TEST_DATA, 'captions.json')))
    huge = 'a dog runs on the grass . ' * 400_000  # 10 MB
    data['annotations'][0]['caption'] = huge
    json.dump(data, open(tmp_path / 'captions.json', 'w'))
    build_vocab.main(['--caption_path', str(tmp_path / 'captions.json'), '--vocab_path', str(tmp_path / 'v.pkl')])
    assert f'warning: {tmp_path / "captions.json"}: 1 captions over 1000 words or 10000 characters cut to that' \
        in capsys.readouterr().err
    results = [{'image_id': a['image_id'], 'caption': a['caption']} for a in data['annotations'][1:]]
    results = list({r['image_id']: r for r in results}.values())
    results[0]['caption'] = huge
    json.dump(results, open(tmp_path / 'results.json', 'w'))
    evaluate.main(['--caption_path', os.path.join(TEST_DATA, 'captions.json'), '--results',
                   str(tmp_path / 'results.json'), '--scores', str(tmp_path / 'scores.json')])
    scores = json.load(open(tmp_path / 'scores.json'))
    assert 0 < scores['Bleu_1'] <= 1 and ('METEOR' in scores) == (shutil.which('java') is not None)


BAD_NUMBERS = [
    (sample, ['--image', 'x.jpg', '--beam_size', '0'], '--beam_size: it must be an integer from 1 to 1000, not 0'),
    (sample, ['--image', 'x.jpg', '--beam_size', '-3'], '--beam_size: it must be an integer from 1 to 1000, not -3'),
    (sample, ['--image', 'x.jpg', '--no_repeat', '-1'], '--no_repeat: it must be an integer from 0 to 1000, not -1'),
    (sample, ['--image', 'x.jpg', '--max_length', '0'], '--max_length: it must be an integer from 1 to 1000, not 0'),
    (sample, ['--image', 'x.jpg', '--batch_size', '0'], '--batch_size: it must be an integer >= 1, not 0'),
    (sample, ['--image', 'x.jpg', '--length_penalty', 'nan'], '--length_penalty: it must be a number from 0 to 10, '
                                                             'not nan'),
    (evaluate, ['--beam_size', 'two'], "--beam_size: it must be an integer, not 'two'"),
    (train, ['--batch_size', '0'], '--batch_size: it must be an integer >= 1, not 0'),
    (train, ['--learning_rate', '0'], '--learning_rate: it must be a number > 0 and <= 10, not 0.0'),
    (train, ['--samples', '0'], '--samples: it must be an integer from 1 to 100, not 0'),
    (train, ['--num_epochs', '-1'], '--num_epochs: it must be an integer >= 1, not -1'),
    (train, ['--crop_size', '0'], '--crop_size: it must be an integer from 16 to 1024, not 0'),
    (export_model, ['--encoder_path', 'e', '--decoder_path', 'd', '--vocab_path', 'v', '--no_repeat', '-2'],
     '--no_repeat: it must be an integer from 0 to 1000, not -2'),
    (extract_features, ['--batch_size', '0'], '--batch_size: it must be an integer >= 1, not 0'),
    (resize, ['--image_size', '0'], '--image_size: it must be an integer from 1 to 8192, not 0'),
    (build_vocab, ['--threshold', '0'], '--threshold: it must be an integer >= 1, not 0'),
]


@pytest.mark.parametrize('script, flags, message', BAD_NUMBERS, ids=[' '.join(f[-2:]) for _, f, _ in BAD_NUMBERS])
def test_numbers_typed_are_checked_before_work_starts(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f'error: argument {message}' in err and 'Traceback' not in err


def rewritten(tiny_model, tmp_path, change):
    """The tiny model's files with `change(encoder file, decoder file)` applied, saved under tmp_path."""
    enc, dec = (torch.load(p, weights_only=True) for p in (tiny_model['encoder'], tiny_model['decoder']))
    change(enc, dec)
    paths = str(tmp_path / 'encoder-bad.ckpt'), str(tmp_path / 'decoder-bad.ckpt')
    torch.save(enc, paths[0])
    torch.save(dec, paths[1])
    return paths


RECORDED = [
    ('image_size', lambda e, d: d['config'].update(image_size=0), 'image_size must be an integer from 16 to 1024, not 0'),
    ('hidden_size', lambda e, d: d['config'].update(hidden_size=10 ** 6),
     'hidden_size must be an integer from 1 to 8192, not 1000000'),
    ('embed_size', lambda e, d: d['config'].update(embed_size='32'), "embed_size must be an integer from 1 to 8192, "
                                                                     "not '32'"),
    ('negative', lambda e, d: d['config'].update(num_layers=-1), 'num_layers must be an integer from 1 to 8, not -1'),
    ('sizes', lambda e, d: d['config'].update(hidden_size=4096), 'its config records vocab_size, embed_size, '
                                                                 'hidden_size'),
    ('beam', lambda e, d: d['decoding'].update(beam_size='five'), "beam_size must be an integer from 1 to 1000, "
                                                                  "not 'five'"),
    ('no_repeat', lambda e, d: d['decoding'].update(no_repeat=-1), 'no_repeat must be an integer from 0 to 1000, not -1'),
    ('nan', lambda e, d: d['model']['linear.weight'].fill_(float('nan')),
     'linear.weight holds NaN or infinite weights (a diverged or damaged model)'),
]


@pytest.mark.parametrize('name, change, message', RECORDED, ids=[r[0] for r in RECORDED])
def test_numbers_a_checkpoint_records_are_checked_before_anything_is_built(tiny_model, tmp_path, name, change,
                                                                           message):
    paths = rewritten(tiny_model, tmp_path, change)
    with pytest.raises(InputError) as refused:
        Captioner.load(*paths, tiny_model['vocab'], 'cpu')
    assert message in str(refused.value) and 'decoder-bad.ckpt' in str(refused.value)
    assert '\n' not in str(refused.value)


class NaNDecoder:
    """A decoder whose every score is NaN (a broken model) or +inf."""

    def __init__(self, vocab_size, value):
        self.vocab_size, self.value = vocab_size, value

    def start(self, features):
        return torch.full((features.size(0), self.vocab_size), self.value), features

    def step(self, words, state):
        return torch.full((words.size(0), self.vocab_size), self.value), state

    @staticmethod
    def select(state, rows):
        return state[rows]


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_decoding_rules_hold_whatever_the_scores(value):
    vocab = load_vocab(SHIPPED_FILES[2])
    guard = caption_guard(vocab, Decoding())
    for beam_size in (1, 3):
        ids = beam_search(NaNDecoder(len(vocab), value), torch.zeros(2, 1), vocab('<end>'), beam_size, 12, guard=guard).best
        for row in ids.tolist():
            words = vocab.words(row)
            assert '<unk>' not in words and not has_hole(words), words


def test_no_repeat_1_means_no_word_twice():
    captioner = Captioner.load(device='cpu', no_repeat=1)
    words = captioner.caption(os.path.join(ROOT, 'png', 'example.png')).split()
    assert len(words) == len(set(words)) and len(words) >= 3, words
    guard = CaptionGuard(6, no_repeat=1)
    banned = guard(torch.zeros(2, 6), torch.tensor([[1, 4], [2, 2]])).isinf()
    assert banned.tolist() == [[False, True, False, False, True, False], [False, False, True, False, False, False]]


def test_the_guard_forbids_exactly_the_holes_has_hole_reports_after_an_article():
    """Word for word over the shipped vocabulary: after an article the guard bans a word if and only
    if metrics.has_hole calls the caption broken, "a and" included."""
    vocab = load_vocab(SHIPPED_FILES[2])
    guard = caption_guard(vocab, Decoding(no_repeat=0))
    words = [vocab.idx2word[i] for i in range(len(vocab)) if vocab.idx2word[i] not in ('<pad>', '<start>', '<end>')]
    for article in sorted(ARTICLES):
        history = torch.tensor([[vocab('<start>'), vocab('dog'), vocab(article)]])
        banned = guard(torch.zeros(1, len(vocab)), history)[0].isinf()
        disagree = [w for w in words if bool(banned[vocab(w)]) != has_hole(['dog', article, w, 'runs'])]
        assert disagree == [], article
    assert has_hole('a kitchen with a and a table .'.split())


def test_a_new_run_refuses_to_overwrite_an_earlier_one(tmp_path, capsys):
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    flags = train_args(folder, models, '--num_epochs', '1', '--log_step', '1')
    assert train.main(flags) == 0
    log = (models / 'train_log.jsonl').read_text()
    with pytest.raises(SystemExit) as refused:
        train.main(flags)
    assert str(refused.value) == (f'error: {models}: holds an earlier cross-entropy run (1 checkpoints, a log): '
                                  'continue it with --resume latest, start over with --overwrite, or choose another '
                                  '--model_path')
    assert (models / 'train_log.jsonl').read_text() == log
    assert train.main(flags + ['--overwrite', '--num_epochs', '2']) == 0
    assert sorted(p.name for p in models.glob('decoder-*')) == ['decoder-1-2.ckpt', 'decoder-2-2.ckpt']


def test_amp_falls_back_to_float32_where_onednn_has_no_bfloat16(tmp_path):
    """oneDNN limited to AVX2 (as on CPUs without AVX-512 bf16 or AMX) refuses the LSTM under bfloat16
    autocast: --amp says so in one line and trains in float32."""
    folder = make_scenes(tmp_path)
    result = run_train(*train_args(folder, tmp_path / 'models', '--amp', '--num_epochs', '1'),
                       env={'ONEDNN_MAX_CPU_ISA': 'AVX2'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'warning: --amp: this CPU does not compute bfloat16 natively for every layer used (the LSTM included); ' \
           'training in float32' in result.stderr


def test_a_damaged_cache_is_refused_in_one_line(tmp_path):
    """A truncated features.npy or index.json gives one line that names the file and says what to do."""
    folder = make_scenes(tmp_path, size=40)
    cache = tmp_path / 'cache'
    extract_features.main(['--image_dir', str(folder / 'images'), '--caption_path', str(folder / 'captions.json'),
                           '--output_dir', str(cache), '--cnn', 'efficientnet-lite0', '--image_size', '32',
                           '--num_workers', '0', '--device', 'cpu'])
    vocab = load_vocab(str(folder / 'vocab.pkl'))
    data = (cache / 'features.npy').read_bytes()
    (cache / 'features.npy').write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=r'features.npy: missing or damaged .*; delete the cache folder and run '
                                         r'extract_features.py again'):
        FeatureDataset(str(cache), str(folder / 'captions.json'), vocab)
    (cache / 'index.json').write_text((cache / 'index.json').read_text()[:40])
    with pytest.raises(SystemExit) as refused:
        train.main(train_args(folder, tmp_path / 'm', '--features', str(cache)))
    assert str(refused.value) == (f'error: {cache / "index.json"}: damaged (not valid JSON); delete the cache folder '
                                  'and run extract_features.py again')


def test_a_fully_transparent_image_is_refused_not_captioned(tmp_path):
    Image.new('RGBA', (40, 30), (10, 200, 30, 0)).save(tmp_path / 'clear.png')
    with pytest.raises(ImageError) as refused:
        open_image(str(tmp_path / 'clear.png'))
    assert str(refused.value) == f'{tmp_path / "clear.png"}: fully transparent: there is nothing to see in it'
    Image.new('RGBA', (40, 30), (10, 200, 30, 1)).save(tmp_path / 'faint.png')
    assert open_image(str(tmp_path / 'faint.png')).size == (40, 30)


def test_a_list_of_images_gets_a_list_of_captions():
    captioner = Captioner.load(device='cpu')
    paths = [os.path.join(ROOT, 'png', name) for name in ('skateboarder.jpg', 'example.png')]
    assert captioner.caption(paths) == [captioner.caption(path) for path in paths]
    assert len(captioner.caption(paths)) == 2


def test_training_says_how_long_it_will_take(tmp_path, capsys):
    folder = make_scenes(tmp_path)
    assert train.main(train_args(folder, tmp_path / 'models', '--num_epochs', '3')) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('time: ')]
    assert len(lines) == 1 and ' s a step over the first 5: the ' in lines[0], lines
    assert lines[0].endswith(' min (validation not included)')
