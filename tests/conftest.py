"""Shared fixtures: paths, a tiny trained model, subprocess helpers. Everything runs offline on CPU."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEST_DATA = os.path.join(ROOT, 'tests', 'data', 'coco')
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')

torch.set_num_threads(2)


def shared_path(*parts):
    """A path under ../shared, or skip the test when that data is not on this machine."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'needs the shared data {path}, absent here')
    return path


def run_script(*args, cwd=ROOT, timeout=600):
    """Run a repo script as a user would; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def coco_sample(tmp_path_factory):
    """The real COCO photos of tests/data, resized to 64 px squares, with their captions and a vocabulary."""
    import build_vocab
    import resize
    out = tmp_path_factory.mktemp('coco')
    resize.resize_images(os.path.join(TEST_DATA, 'images'), str(out / 'resized'), 64, num_workers=1)
    build_vocab.main(['--caption_path', os.path.join(TEST_DATA, 'captions.json'),
                      '--vocab_path', str(out / 'vocab.pkl'), '--threshold', '2'])
    return {'images': str(out / 'resized'), 'captions': os.path.join(TEST_DATA, 'captions.json'),
            'vocab': str(out / 'vocab.pkl'), 'dir': out}


@pytest.fixture(scope='session')
def tiny_model(coco_sample):
    """A small efficientnet-lite0 captioner trained for two epochs; returns its file paths."""
    import train
    models = coco_sample['dir'] / 'models'
    code = train.main(['--cnn', 'efficientnet-lite0', '--image_dir', coco_sample['images'],
                       '--caption_path', coco_sample['captions'], '--vocab_path', coco_sample['vocab'],
                       '--model_path', str(models), '--crop_size', '56', '--embed_size', '32',
                       '--hidden_size', '48', '--batch_size', '16', '--num_epochs', '2', '--num_workers', '0',
                       '--log_step', '1', '--device', 'cpu'])
    assert code == 0
    return {'encoder': str(models / 'encoder-2-4.ckpt'), 'decoder': str(models / 'decoder-2-4.ckpt'),
            'vocab': coco_sample['vocab'], 'models': models}


@pytest.fixture
def nltk_reference(tmp_path):
    """NLTK's real word_tokenize with the shared English Punkt tables (a private go-w copy)."""
    source = shared_path('nltk_data')
    data = tmp_path / 'nltk_data'
    shutil.copytree(source, data)
    for folder, dirs, files in os.walk(data):
        for name in dirs + files:
            os.chmod(os.path.join(folder, name), 0o755 if name in dirs else 0o644)
    os.chmod(data, 0o755)
    import nltk
    nltk.data.path.insert(0, str(data))
    yield nltk.word_tokenize
    nltk.data.path.remove(str(data))
