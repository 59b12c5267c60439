"""The README recipe, run as a user runs it: one script after another, as subprocesses."""
import os
import shutil

from PIL import Image

from captioner import Captioner
from conftest import ROOT, TEST_DATA, run_script


def test_readme_recipe_on_real_coco_photos(tmp_path):
    data, models = tmp_path / 'data', tmp_path / 'models'
    shutil.copytree(os.path.join(TEST_DATA, 'images'), data / 'train2014')
    shutil.copy(os.path.join(TEST_DATA, 'captions.json'), data / 'captions.json')
    steps = [
        ['build_vocab.py', '--caption_path', str(data / 'captions.json'), '--vocab_path', str(data / 'vocab.pkl'),
         '--threshold', '2'],
        ['resize.py', '--image_dir', str(data / 'train2014'), '--output_dir', str(data / 'resized2014'),
         '--image_size', '72'],
        ['train.py', '--cnn', 'efficientnet-lite0', '--model_path', str(models), '--crop_size', '64',
         '--vocab_path', str(data / 'vocab.pkl'), '--image_dir', str(data / 'resized2014'),
         '--caption_path', str(data / 'captions.json'), '--num_epochs', '2', '--batch_size', '20',
         '--embed_size', '64', '--hidden_size', '64', '--num_workers', '2', '--log_step', '1'],
    ]
    for step in steps:
        result = run_script(*step)
        assert result.returncode == 0, f'{step[0]} failed:\n{result.stderr[-3000:]}'
    assert 'Total vocabulary size' in run_script(*steps[0]).stdout
    assert sorted(os.listdir(data / 'resized2014')) == sorted(os.listdir(data / 'train2014'))
    assert {Image.open(data / 'resized2014' / n).size for n in os.listdir(data / 'resized2014')} == {(72, 72)}
    assert (models / 'loss.png').exists() and len((models / 'train_log.jsonl').read_text().splitlines()) == 6
    photo = os.path.join(ROOT, 'png', 'example.png')
    result = run_script('sample.py', '--image', photo, '--encoder_path', str(models / 'encoder-2-3.ckpt'),
                        '--decoder_path', str(models / 'decoder-2-3.ckpt'), '--vocab_path', str(data / 'vocab.pkl'))
    assert result.returncode == 0, result.stderr
    files = [str(models / 'encoder-2-3.ckpt'), str(models / 'decoder-2-3.ckpt'), str(data / 'vocab.pkl')]
    assert result.stdout == Captioner.load(*files, device='cpu').caption(photo) + '\n'


def test_the_scripts_defaults_are_the_classic_recipes(monkeypatch, tmp_path):
    """Flags left out give the classic tutorial's recipe: 256 px squares, words seen 4 times, ResNet-152
    + LSTM (embedding 256, hidden 512), batches of 128 captions, Adam at 0.001, 5 epochs, crops of 224."""
    import build_vocab
    import resize
    import train
    args = train.parse_args([])
    assert (args.cnn, args.decoder, args.embed_size, args.hidden_size, args.num_layers, args.batch_size,
            args.learning_rate, args.num_epochs, args.crop_size, args.dropout, args.label_smoothing, args.grad_clip) == \
        ('resnet152', 'lstm', 256, 512, 1, 128, 0.001, 5, 224, 0, 0.0, 0)
    assert (args.image_dir, args.caption_path, args.vocab_path, args.model_path) == (
        'data/resized2014', 'data/annotations/captions_train2014.json', 'data/vocab.pkl', 'models/')
    calls = []
    monkeypatch.setattr(resize, 'resize_images', lambda *a: calls.append(a) or (0, 0, 0))
    monkeypatch.setattr(resize.os.path, 'isdir', lambda path: True)
    resize.main([])
    monkeypatch.setattr(build_vocab, 'build_vocab', lambda *a: calls.append(a) or build_vocab.Vocabulary())
    monkeypatch.setattr(build_vocab, 'save_vocab', lambda vocab, path: calls.append(path))
    build_vocab.main([])
    assert calls == [('data/train2014/', 'data/resized2014/', 256, 0),
                     ('data/annotations/captions_train2014.json', 4, None), 'data/vocab.pkl']
