"""Reliability: kills, interrupts, crashes mid-write, bad data in a long run, memory over many steps.

(Hostile pickles and checkpoints are refused in test_build_vocab.py and test_model.py.)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
from PIL import Image

import checkpoints
import resize
import train
from checkpoints import step_checkpoints
from odd_images import write_broken_images
from conftest import ROOT, assert_same_weights, final_weights, make_scenes, train_args


def train_in_subprocess(folder, model_path, *extra):
    return subprocess.Popen([sys.executable, 'train.py', *train_args(folder, model_path, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


def wait_for(path, process, timeout=600):
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
    assert whole.wait(900) == 0, whole.communicate()
    killed = train_in_subprocess(folder, tmp_path / 'parts', *common)
    wait_for(tmp_path / 'parts' / 'decoder-2-3.ckpt', killed)  # mid-epoch: an epoch has 4 steps
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    # The kill may land a little later; make (epoch 2, step 3) the newest checkpoint, as if it had not.
    for path in step_checkpoints(str(tmp_path / 'parts')):
        if os.path.basename(path) not in ('decoder-1-3.ckpt', 'decoder-1-4.ckpt', 'decoder-2-3.ckpt'):
            for old in checkpoints.model_files(path):
                os.remove(old)
    resumed = train_in_subprocess(folder, tmp_path / 'parts', *common, '--resume', 'latest')
    _, err = resumed.communicate(timeout=900)
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
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signum
    assert 'Traceback' not in err and 'continue with --resume latest' in err
    assert step_checkpoints(str(tmp_path / 'm'))


def test_crash_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / 'decoder-1-1.ckpt'
    checkpoints.save_checkpoint({'x': torch.ones(3)}, str(path))

    def crash(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint({'x': torch.zeros(3)}, str(path))
    assert torch.equal(checkpoints.load_checkpoint(str(path))['x'], torch.ones(3))


def test_interrupted_resize_leaves_no_truncated_image(tmp_path, monkeypatch):
    for i in range(3):
        Image.new('RGB', (50, 40), (80 * i, 0, 0)).save(tmp_path / f'{i}.jpg')
    real_save = Image.Image.save

    def save_half_then_die(self, fp, *args, **kwargs):
        fp.write(b'\xff\xd8\xff')  # the start of a JPEG, then the process "dies"
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, 'save', save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        resize.resize_images(str(tmp_path), str(tmp_path / 'out'), 16, num_workers=1)
    assert not [f for f in os.listdir(tmp_path / 'out') if f.endswith('.jpg')]  # nothing mistaken for done
    monkeypatch.setattr(Image.Image, 'save', real_save)
    assert resize.resize_images(str(tmp_path), str(tmp_path / 'out'), 16, num_workers=1) == (3, 0, 0)
    assert sorted(os.listdir(tmp_path / 'out')) == ['0.jpg', '1.jpg', '2.jpg']


def test_bad_images_and_odd_captions_do_not_stop_training(coco_sample, tmp_path, capsys):
    """Corrupt images mixed into the data set are skipped and counted; empty and non-ASCII captions train."""
    images = tmp_path / 'images'
    shutil.copytree(coco_sample['images'], images)
    broken = write_broken_images(images)
    captions = json.load(open(coco_sample['captions']))
    for i, name in enumerate(broken, 1):
        captions['images'].append({'id': -i, 'file_name': name})
        captions['annotations'].append({'id': -i, 'image_id': -i, 'caption': 'a broken photo'})
    captions['annotations'] += [{'id': -10, 'image_id': captions['images'][0]['id'], 'caption': ''},
                                {'id': -11, 'image_id': captions['images'][1]['id'], 'caption': 'Ein Hund läuft über die Straße'}]
    (tmp_path / 'captions.json').write_text(json.dumps(captions))
    args = ['--cnn', 'efficientnet-lite0', '--image_dir', str(images), '--caption_path', str(tmp_path / 'captions.json'),
            '--vocab_path', coco_sample['vocab'], '--model_path', str(tmp_path / 'm'), '--crop_size', '48',
            '--embed_size', '16', '--hidden_size', '16', '--batch_size', '8', '--num_epochs', '2',
            '--num_workers', '0', '--device', 'cpu']
    assert train.main(args) == 0
    err = capsys.readouterr().err
    for name in broken:
        assert err.count(f'warning: skipping {images / name}') == 1  # reported once, not once per epoch
    assert err.count(f'skipped {len(broken)} unreadable images') == 2  # in each epoch's summary
    assert step_checkpoints(str(tmp_path / 'm'))[-1].endswith('decoder-2-9.ckpt')


def test_memory_stays_flat_over_hundreds_of_steps(tmp_path, monkeypatch):
    """Python-level allocations must not grow with the step count (no losses or graphs kept)."""
    folder = make_scenes(tmp_path)
    traced = []

    class Recording(train.tqdm):
        def __iter__(self):
            for item in super().__iter__():
                traced.append(tracemalloc.get_traced_memory()[0])
                yield item
    monkeypatch.setattr(train, 'tqdm', Recording)
    tracemalloc.start()
    try:
        assert train.main(train_args(folder, tmp_path / 'm', '--num_epochs', '100', '--batch_size', '3',
                                     '--log_step', '5', '--save_step', '100000')) == 0
    finally:
        tracemalloc.stop()
    assert len(traced) == 300
    growth = traced[-1] - traced[50]
    assert growth < 1_000_000, f'traced memory grew by {growth} bytes over 250 steps'
