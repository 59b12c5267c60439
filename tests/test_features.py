"""The speed paths: feature cache, captions grouped per image, multi-process training."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import extract_features
import train
from vocabulary import load_vocab
from captioner import Captioner
from data_loader import CocoDataset, FeatureDataset, GroupedDataset, collate
from images import eval_transform
from images import open_image
from decoding import Decoding
from model import AttentionDecoder, EncoderCNN
from odd_images import write_broken_images

LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3  # EfficientNet-Lite's (pixel - 127) / 128
from conftest import ROOT, make_scenes, train_args


def extract(folder, out, *extra):
    extract_features.main(['--image_dir', str(folder / 'images'), '--caption_path', str(folder / 'captions.json'),
                           '--output_dir', str(out), '--cnn', 'efficientnet-lite0', '--image_size', '64',
                           '--batch_size', '3', '--num_workers', '0', '--device', 'cpu', *extra])


def test_cache_holds_the_backbone_features_of_whole_images(tmp_path):
    folder = make_scenes(tmp_path)
    write_broken_images(folder / 'images')
    captions = json.load(open(folder / 'captions.json'))
    captions['images'].append({'id': 99, 'file_name': 'truncated.jpg'})
    (folder / 'captions.json').write_text(json.dumps(captions))
    extract(folder, tmp_path / 'cache', '--flip')
    index = json.load(open(tmp_path / 'cache' / 'index.json'))
    assert index['files'] == ['blue.png', 'green.png', 'red.png', 'truncated.jpg', 'yellow.png']
    assert index['broken'] == ['truncated.jpg'] and index['cnn'] == 'efficientnet-lite0'
    features = np.load(tmp_path / 'cache' / 'features.npy')
    flipped = np.load(tmp_path / 'cache' / 'features_flip.npy')
    assert features.dtype == np.float16 and features.shape == (5, 1280)
    encoder = EncoderCNN(8, 'efficientnet-lite0').eval()
    transform = eval_transform(64, LITE_MEAN, LITE_STD)
    image = transform(open_image(str(folder / 'images' / 'red.png')))[None]
    expected = encoder.backbone_features(image)[0].numpy()
    assert np.allclose(features[2], expected, rtol=1e-2, atol=1e-2)
    assert np.allclose(flipped[2], encoder.backbone_features(image.flip(3))[0].numpy(), rtol=1e-2, atol=1e-2)
    assert not [f for f in os.listdir(tmp_path / 'cache') if f.endswith('.partial')]


def test_extraction_resumes_and_refuses_another_backbone(tmp_path, monkeypatch, capsys):
    folder = make_scenes(tmp_path)
    cache = tmp_path / 'cache'
    calls = []
    real = EncoderCNN.backbone_features

    def dies_on_second_batch(self, images, layers=None):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images, layers)
    monkeypatch.setattr(EncoderCNN, 'backbone_features', dies_on_second_batch)

    class FastClock:  # progress is saved every 10 s: make every batch take 11
        now = 0.0

        @classmethod
        def time(cls):
            cls.now += 11
            return cls.now
    monkeypatch.setattr(extract_features, 'time', FastClock)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, cache)
    assert not (cache / 'index.json').exists() and not (cache / 'features.npy').exists()
    assert json.load(open(cache / 'index.json.partial'))['done'] == 3  # the first batch of 3 was kept
    with pytest.raises(SystemExit, match='no complete feature cache.*run extract_features.py again'):
        train.main(train_args(folder, tmp_path / 'm', '--features', str(cache)))
    calls.clear()
    monkeypatch.setattr(EncoderCNN, 'backbone_features', dies_on_second_batch)
    extract(folder, cache)  # resumes: only one more batch is needed
    assert calls == [1]
    monkeypatch.setattr(EncoderCNN, 'backbone_features', real)
    assert json.load(open(cache / 'index.json'))['files'] == ['blue.png', 'green.png', 'red.png', 'yellow.png']
    extract(folder, tmp_path / 'fresh')
    assert np.array_equal(np.load(cache / 'features.npy'), np.load(tmp_path / 'fresh' / 'features.npy'))
    extract(folder, cache)
    assert 'already complete' in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"built with image_size=64 \(asked: 96\)"):
        extract(folder, cache, '--image_size', '96')
    with pytest.raises(SystemExit, match=r"built with cnn='efficientnet-lite0' \(asked: 'resnet18'\)"):
        extract_features.main(['--image_dir', str(folder / 'images'), '--caption_path', str(folder / 'captions.json'),
                               '--output_dir', str(cache), '--cnn', 'resnet18', '--image_size', '64'])


def test_training_from_the_cache_learns_and_its_checkpoints_caption_images(tmp_path, monkeypatch):
    folder = make_scenes(tmp_path)
    extract(folder, tmp_path / 'cache', '--flip')
    models = tmp_path / 'models'
    assert train.main(train_args(folder, models, '--features', str(tmp_path / 'cache'), '--num_epochs', '60',
                                 '--learning_rate', '0.01', '--log_step', '2')) == 0
    captioner = Captioner.load(str(models / 'encoder-60-2.ckpt'), str(models / 'decoder-60-2.ckpt'),
                               str(folder / 'vocab.pkl'), 'cpu')
    assert captioner.config.image_size == 64 and captioner.config.cnn == 'efficientnet-lite0'
    paths = [str(folder / 'images' / name) for name in ('red.png', 'blue.png', 'green.png', 'yellow.png')]
    captions = [c for _, c in captioner.caption_files(paths, num_workers=0)]
    assert captions == ['a red square on a white wall', 'two blue birds in the sky', 'a green field with a tree',
                        'a yellow taxi on the road']
    # The cache is checked before any backbone is built (a ResNet would need a download).
    monkeypatch.setattr(train, 'build_networks', lambda *a, **k: pytest.fail('built a network first'))
    with pytest.raises(SystemExit, match='cached with --cnn efficientnet-lite0, not resnet18'):
        train.main(train_args(folder, models, '--features', str(tmp_path / 'cache'), '--cnn', 'resnet18'))


def test_attention_decoder_learns_from_a_spatial_cache_and_captions_images(tmp_path, monkeypatch, capsys):
    folder = make_scenes(tmp_path)
    cache = tmp_path / 'cache'
    extract(folder, cache, '--flip', '--spatial')
    features = np.load(cache / 'features.npy')
    assert features.shape == (4, 4, 1280)  # 64x64 images: a 2x2 feature map
    encoder = EncoderCNN(8, 'efficientnet-lite0', spatial=True).eval()
    image = eval_transform(64, LITE_MEAN, LITE_STD)(open_image(str(folder / 'images' / 'red.png')))[None]
    assert np.allclose(features[2], encoder.backbone_features(image)[0].numpy(), rtol=1e-2, atol=1e-2)
    with pytest.raises(SystemExit, match='--decoder lstm needs a cache built without extract_features.py --spatial'):
        train.main(train_args(folder, tmp_path / 'lstm', '--features', str(cache)))

    models = tmp_path / 'models'
    projected = []  # cached rows projected: with --captions_per_image 2, once per image (4), not per caption (8)
    real = EncoderCNN.project
    monkeypatch.setattr(EncoderCNN, 'project', lambda self, x: projected.append(len(x)) or real(self, x))
    assert train.main(train_args(folder, models, '--decoder', 'attention', '--features', str(cache),
                                 '--captions_per_image', '2', '--num_epochs', '60', '--learning_rate', '0.01',
                                 '--log_step', '2', '--deep_output')) == 0
    assert sum(projected) == 60 * 4
    monkeypatch.undo()
    files = str(folder / 'vocab.pkl'), 'cpu'
    captioner = Captioner.load(str(models / 'encoder-60-2.ckpt'), str(models / 'decoder-60-2.ckpt'), *files)
    assert captioner.config.decoder == 'attention' and isinstance(captioner.decoder, AttentionDecoder)
    assert captioner.encoder.spatial and captioner.config.deep_output and captioner.decoder.context_out is not None
    paths = [str(folder / 'images' / name) for name in ('red.png', 'blue.png', 'green.png', 'yellow.png')]
    for beam_size in (1, 3):
        captioner.decoding = Decoding(beam_size=beam_size)
        captions = [c for _, c in captioner.caption_files(paths, num_workers=0)]
        assert captions == ['a red square on a white wall', 'two blue birds in the sky', 'a green field with a tree',
                            'a yellow taxi on the road']
    # End to end from the images, the same model trains and its checkpoints load the same way.
    assert train.main(train_args(folder, tmp_path / 'images', '--decoder', 'attention', '--num_epochs', '1')) == 0
    captioner = Captioner.load(str(tmp_path / 'images' / 'encoder-1-2.ckpt'),
                               str(tmp_path / 'images' / 'decoder-1-2.ckpt'), *files)
    assert captioner.config.decoder == 'attention' and isinstance(captioner.decoder, AttentionDecoder)
    assert not captioner.config.deep_output and captioner.decoder.context_out is None
    with pytest.raises(SystemExit):
        train.main(train_args(folder, tmp_path / 'lstm', '--deep_output'))
    assert '--deep_output is for --decoder attention' in capsys.readouterr().err


def test_captions_grouped_per_image(coco_sample):
    vocab = load_vocab(coco_sample['vocab'])
    dataset = CocoDataset(coco_sample['images'], coco_sample['captions'], vocab,
                          eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    grouped = GroupedDataset(dataset, 5)
    assert len(grouped) == 12 and len(dataset) == 60
    batch = collate([grouped[0], grouped[1], None])
    images, targets, lengths, owners = batch.inputs, batch.captions, batch.lengths, batch.owners
    assert images.shape == (2, 3, 32, 32) and targets.shape[0] == 10 and sorted(owners.tolist()) == [0] * 5 + [1] * 5
    assert lengths == sorted(lengths, reverse=True)
    first_image_captions = {tuple(dataset.word_ids(c).tolist()) for k, c, _ in dataset.samples if k == grouped.groups[0][0]}
    assert {tuple(targets[i, :lengths[i]].tolist()) for i in range(10) if owners[i] == 0} == first_image_captions


def test_grouped_training_runs_fewer_backbone_forwards(tmp_path, monkeypatch):
    folder = make_scenes(tmp_path)
    forwards = []
    real = EncoderCNN.backbone_features
    monkeypatch.setattr(EncoderCNN, 'backbone_features', lambda self, x: forwards.append(len(x)) or real(self, x))
    assert train.main(train_args(folder, tmp_path / 'plain', '--num_epochs', '1')) == 0
    plain, forwards[:] = sum(forwards), []
    assert train.main(train_args(folder, tmp_path / 'grouped', '--num_epochs', '1', '--captions_per_image', '2')) == 0
    assert plain == 8 and sum(forwards) == 4  # 8 captions of 4 images


def test_torchrun_two_gloo_processes(tmp_path):
    """DistributedDataParallel on CPU: two processes share the data; only rank 0 logs and saves."""
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
                             'train.py', *train_args(folder, models, '--num_epochs', '2', '--batch_size', '2',
                                                     '--log_step', '1')],
                            cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    # 8 captions over 2 processes at 2 per batch: 2 steps per epoch.
    assert sorted(p for p in os.listdir(models) if p.endswith('.ckpt')) == [
        'decoder-1-2.ckpt', 'decoder-2-2.ckpt', 'encoder-1-2.ckpt', 'encoder-2-2.ckpt']
    log = [json.loads(line) for line in open(models / 'train_log.jsonl')]
    assert [(r['epoch'], r['step']) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_training_from_a_cache_uses_the_mirrored_features_half_of_the_time(tmp_path):
    """With --flip in the cache, FeatureDataset(flip=True) returns the mirrored image's features for
    about half the draws (the feature-space random mirror), the plain ones otherwise; flip=False never."""
    folder = make_scenes(tmp_path, size=40)
    extract_features.main(['--image_dir', str(folder / 'images'), '--caption_path', str(folder / 'captions.json'),
                           '--output_dir', str(tmp_path / 'cache'), '--cnn', 'efficientnet-lite0', '--image_size', '32',
                           '--flip', '--num_workers', '0', '--device', 'cpu'])
    plain = np.load(tmp_path / 'cache' / 'features.npy').astype(np.float32)
    mirrored = np.load(tmp_path / 'cache' / 'features_flip.npy').astype(np.float32)
    vocab = load_vocab(str(folder / 'vocab.pkl'))
    for flip, expected in ((True, (80, 120)), (False, (0, 0))):
        dataset = FeatureDataset(str(tmp_path / 'cache'), str(folder / 'captions.json'), vocab, flip=flip)
        row = dataset.samples[0][0]
        assert not np.array_equal(plain[row], mirrored[row])
        torch.manual_seed(0)
        draws = [dataset.load_input(row).numpy() for _ in range(200)]
        assert all(np.array_equal(d, plain[row]) or np.array_equal(d, mirrored[row]) for d in draws)
        flipped = sum(np.array_equal(d, mirrored[row]) for d in draws)
        assert expected[0] <= flipped <= expected[1], (flip, flipped)
