"""Shared fixtures: paths, a tiny trained model, subprocess helpers. Everything runs offline on CPU."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

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


SCENES = {'red.png': ('red', 'a red square on a white wall'), 'blue.png': ('blue', 'two blue birds in the sky'),
          'green.png': ('green', 'a green field with a tree'), 'yellow.png': ('yellow', 'a yellow taxi on the road')}


def make_scenes(folder, size=72):
    """Generated images, each with its own caption (given twice), in COCO format."""
    import build_vocab
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


def final_weights(model_path, name):
    return torch.load(model_path / name, weights_only=True)['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def tiny_decoder(kind, embed_size, hidden_size, vocab_size, dropout=0.0):
    """A decoder of any kind (in eval mode), and a function making (B, ...) image features it takes."""
    from model import AttentionDecoder, DecoderRNN
    if kind.startswith('attention'):
        decoder = AttentionDecoder(embed_size, hidden_size, vocab_size, dropout, deep_output=kind == 'attention-deep')
        return decoder.eval(), lambda b: torch.randn(b, 5, embed_size)
    return DecoderRNN(embed_size, hidden_size, vocab_size, 1, dropout).eval(), lambda b: torch.randn(b, embed_size)
