import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageDraw

import build_vocab
import sample
import train
from conftest import ROOT
from model import load_captioner

SCENES = {'red.png': ('red', 'a red square on a white wall'), 'blue.png': ('blue', 'two blue birds in the sky'),
          'green.png': ('green', 'a green field with a tree'), 'yellow.png': ('yellow', 'a yellow taxi on the road')}


def make_scenes(folder, size=72):
    """Generated images, each with its own caption (given twice), in COCO format."""
    (folder / 'images').mkdir(parents=True)
    images, annotations = [], []
    for i, (name, (color, caption)) in enumerate(SCENES.items(), 1):
        image = Image.new('RGB', (size, size), color)
        ImageDraw.Draw(image).ellipse((size // 4, size // 4, size // 2, size // 2), fill='black')
        image.save(folder / 'images' / name)
        images.append({'id': i, 'file_name': name})
        annotations += [{'id': 2 * i, 'image_id': i, 'caption': caption},
                        {'id': 2 * i + 1, 'image_id': i, 'caption': caption.upper()}]
    (folder / 'captions.json').write_text(json.dumps({'images': images, 'annotations': annotations}))
    build_vocab.main(['--caption_path', str(folder / 'captions.json'), '--vocab_path', str(folder / 'vocab.pkl'),
                      '--threshold', '1'])
    return folder


def train_args(folder, model_path, *extra):
    return ['--cnn', 'efficientnet-lite0', '--image_dir', str(folder / 'images'),
            '--caption_path', str(folder / 'captions.json'), '--vocab_path', str(folder / 'vocab.pkl'),
            '--model_path', str(model_path), '--crop_size', '64', '--embed_size', '32', '--hidden_size', '64',
            '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--seed', '3', *extra]


def test_tiny_model_learns_its_captions(tmp_path):
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    assert train.main(train_args(folder, models, '--num_epochs', '60', '--learning_rate', '0.01',
                                 '--log_step', '2', '--save_step', '1000')) == 0
    vocab = build_vocab.load_vocab(str(folder / 'vocab.pkl'))
    encoder, decoder, config = load_captioner(str(models / 'encoder-60-2.ckpt'), str(models / 'decoder-60-2.ckpt'),
                                              len(vocab), {}, 'cpu')
    assert config['cnn'] == 'efficientnet-lite0' and config['image_size'] == 64
    images = [Image.open(folder / 'images' / name).convert('RGB') for name in SCENES]
    captions = sample.caption_images(images, vocab, encoder, decoder, config, 'cpu')
    assert captions == [caption for _, caption in SCENES.values()]

    log = [json.loads(line) for line in open(models / 'train_log.jsonl')]
    assert len(log) == 60 and set(log[0]) == {'epoch', 'step', 'loss', 'perplexity', 'seconds'}
    assert log[-1]['loss'] < 0.2 * log[0]['loss']
    assert abs(log[-1]['perplexity'] - torch.tensor(log[-1]['loss']).exp().item()) < 1e-3
    assert (models / 'loss.png').stat().st_size > 5000
    # efficientnet-lite0's weights come from its package: the encoder file holds only the head.
    saved = torch.load(models / 'encoder-60-2.ckpt', weights_only=True)
    assert sorted(saved['model']) == ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var',
                                      'bn.weight', 'linear.bias', 'linear.weight']
    assert (models / 'decoder-1-2.ckpt').exists() and (models / 'encoder-1-2.ckpt').exists()


def final_weights(model_path, name):
    return torch.load(model_path / name, weights_only=True)['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_resume_from_epoch_end_matches_an_uninterrupted_run(tmp_path):
    folder = make_scenes(tmp_path)
    assert train.main(train_args(folder, tmp_path / 'whole', '--num_epochs', '3', '--batch_size', '3')) == 0
    assert train.main(train_args(folder, tmp_path / 'parts', '--num_epochs', '1', '--batch_size', '3')) == 0
    assert train.main(train_args(folder, tmp_path / 'parts', '--num_epochs', '3', '--batch_size', '3',
                                 '--resume', 'latest')) == 0
    for name in ('decoder-3-3.ckpt', 'encoder-3-3.ckpt'):
        assert_same_weights(final_weights(tmp_path / 'whole', name), final_weights(tmp_path / 'parts', name))


def test_resume_refuses_other_model_settings(tmp_path, capsys):
    folder = make_scenes(tmp_path)
    assert train.main(train_args(folder, tmp_path / 'm', '--num_epochs', '1')) == 0
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(folder, tmp_path / 'm', '--num_epochs', '2', '--hidden_size', '80',
                              '--resume', 'latest'))
    assert "trained with other settings" in str(stop.value) and "'hidden_size': (64, 80)" in str(stop.value)
    with pytest.raises(SystemExit, match='encoder-9-9.ckpt: no such checkpoint'):
        train.main(train_args(folder, tmp_path / 'm', '--resume', str(tmp_path / 'm' / 'decoder-9-9.ckpt')))
    # 'latest' with nothing saved yet starts afresh, so a job script can always pass it.
    assert train.main(train_args(folder, tmp_path / 'new', '--num_epochs', '1', '--resume', 'latest')) == 0
    assert 'starting afresh' in capsys.readouterr().err
    assert train.saved_checkpoints(str(tmp_path / 'new'))


def test_keep_last_prunes_old_step_checkpoints(tmp_path):
    folder = make_scenes(tmp_path)
    models = tmp_path / 'm'
    assert train.main(train_args(folder, models, '--num_epochs', '3', '--batch_size', '2', '--save_step', '1',
                                 '--keep_last', '2')) == 0
    assert sorted(p for p in os.listdir(models) if p.endswith('.ckpt')) == [
        'decoder-3-3.ckpt', 'decoder-3-4.ckpt', 'encoder-3-3.ckpt', 'encoder-3-4.ckpt']


def train_in_subprocess(folder, model_path, *extra):
    return subprocess.Popen([sys.executable, 'train.py', *train_args(folder, model_path, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f'{path} never appeared'
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    """A run killed with SIGKILL mid-epoch and resumed ends with the uninterrupted run's weights."""
    folder = make_scenes(tmp_path)
    common = ('--num_epochs', '3', '--batch_size', '2', '--save_step', '3', '--log_step', '2')
    whole = train_in_subprocess(folder, tmp_path / 'whole', *common)
    assert whole.wait(300) == 0, whole.communicate()
    killed = train_in_subprocess(folder, tmp_path / 'parts', *common)
    wait_for(tmp_path / 'parts' / 'decoder-2-3.ckpt', killed)  # mid-epoch: an epoch has 4 steps
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    # The kill may land a little later; make (epoch 2, step 3) the newest checkpoint, as if it had not.
    for path in train.saved_checkpoints(str(tmp_path / 'parts')):
        if os.path.basename(path) not in ('decoder-1-3.ckpt', 'decoder-1-4.ckpt', 'decoder-2-3.ckpt'):
            for old in train.checkpoint_pair(path):
                os.remove(old)
    resumed = train_in_subprocess(folder, tmp_path / 'parts', *common, '--resume', 'latest')
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert '(epoch 2, step 3 done)' in err
    for name in ('decoder-3-4.ckpt', 'encoder-3-4.ckpt'):
        assert_same_weights(final_weights(tmp_path / 'whole', name), final_weights(tmp_path / 'parts', name))
    logs = [[json.loads(line) for line in open(tmp_path / run / 'train_log.jsonl')] for run in ('whole', 'parts')]
    assert [(r['epoch'], r['step']) for r in logs[1]] == [(e, s) for e in (1, 2, 3) for s in (2, 4)]
    assert [r['loss'] for r in logs[1]] == pytest.approx([r['loss'] for r in logs[0]], abs=1e-5)


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    folder = make_scenes(tmp_path)
    process = train_in_subprocess(folder, tmp_path / 'm', '--num_epochs', '50', '--batch_size', '2',
                                  '--save_step', '1000', '--log_step', '1')
    wait_for(tmp_path / 'm' / 'train_log.jsonl', process)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert 'Traceback' not in err and 'continue with --resume latest' in err
    assert train.saved_checkpoints(str(tmp_path / 'm'))
