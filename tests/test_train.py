import json
import os

import pytest
import torch

import devices
import train
from checkpoints import step_checkpoints
from vocabulary import tokenize
from captioner import Captioner
from conftest import SCENES, assert_same_weights, final_weights, make_scenes, train_args
from metrics import CiderD

def test_tiny_model_learns_its_captions(tmp_path):
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    assert train.main(train_args(folder, models, '--num_epochs', '60', '--learning_rate', '0.01',
                                 '--log_step', '2', '--save_step', '1000')) == 0
    captioner = Captioner.load(str(models / 'encoder-60-2.ckpt'), str(models / 'decoder-60-2.ckpt'),
                               str(folder / 'vocab.pkl'), 'cpu')
    assert captioner.config.cnn == 'efficientnet-lite0' and captioner.config.image_size == 64
    paths = [str(folder / 'images' / name) for name in SCENES]
    captions = [c for _, c in captioner.caption_files(paths, num_workers=0)]
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


def test_label_smoothing_keeps_the_loss_above_its_floor(tmp_path, capsys):
    # With smoothing 0.2 over this vocabulary's 23 words (19 + 4 special) the target keeps 0.2/23 on
    # every word, so the loss cannot fall below that target's entropy, 1.08; plain cross-entropy
    # goes towards 0 on these captions (the test above).
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    with pytest.raises(SystemExit):
        train.main(train_args(folder, models, '--label_smoothing', '1'))
    assert 'argument --label_smoothing: it must be a number from 0 to 0.99, not 1.0' in capsys.readouterr().err
    assert train.main(train_args(folder, models, '--num_epochs', '60', '--learning_rate', '0.01',
                                 '--log_step', '2', '--save_step', '1000', '--label_smoothing', '0.2')) == 0
    captioner = Captioner.load(str(models / 'encoder-60-2.ckpt'), str(models / 'decoder-60-2.ckpt'),
                               str(folder / 'vocab.pkl'), 'cpu')
    assert len(captioner.vocab) == 23
    paths = [str(folder / 'images' / name) for name in SCENES]
    assert [c for _, c in captioner.caption_files(paths, num_workers=0)] == [c for _, c in SCENES.values()]
    log = [json.loads(line) for line in open(models / 'train_log.jsonl')]
    assert 1.08 < log[-1]['loss'] < 1.5


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
    assert f'--resume latest: no checkpoint of this run in {tmp_path / "new"} yet, so it starts from scratch' \
        in capsys.readouterr().err
    assert step_checkpoints(str(tmp_path / 'new'))


def test_keep_last_prunes_old_step_checkpoints(tmp_path):
    folder = make_scenes(tmp_path)
    models = tmp_path / 'm'
    assert train.main(train_args(folder, models, '--num_epochs', '3', '--batch_size', '2', '--save_step', '1',
                                 '--keep_last', '2')) == 0
    assert sorted(p for p in os.listdir(models) if p.endswith('.ckpt')) == [
        'decoder-3-3.ckpt', 'decoder-3-4.ckpt', 'encoder-3-3.ckpt', 'encoder-3-4.ckpt']


def test_epoch_steps_ends_every_epoch_after_that_many_batches(tmp_path):
    folder = make_scenes(tmp_path)  # 8 captions: 4 batches of 2 an epoch
    models = tmp_path / 'm'
    assert train.main(train_args(folder, models, '--num_epochs', '2', '--batch_size', '2', '--epoch_steps', '3',
                                 '--log_step', '1')) == 0
    assert sorted(p for p in os.listdir(models) if p.endswith('.ckpt')) == [
        'decoder-1-3.ckpt', 'decoder-2-3.ckpt', 'encoder-1-3.ckpt', 'encoder-2-3.ckpt']
    records = [json.loads(line) for line in open(models / 'train_log.jsonl')]
    assert [(r['epoch'], r['step']) for r in records] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def test_validation_scores_each_epoch_against_references_prepared_once(tmp_path, monkeypatch):
    """Every validation captions the same images, so their CIDEr-D scorer is made at the first one
    only; each epoch's logged CIDEr-D is still its own captions' score against a fresh scorer."""
    folder = make_scenes(tmp_path)
    models = tmp_path / 'm'
    made = []
    monkeypatch.setattr(train, 'CiderD', lambda references: made.append(references) or CiderD(references))
    assert train.main(train_args(folder, models, '--num_epochs', '3', '--learning_rate', '0.01',
                                 '--val_caption_path', str(folder / 'captions.json'),
                                 '--val_image_dir', str(folder / 'images'), '--val_images', '3')) == 0
    assert len(made) == 1 and sorted(made[0]) == [1, 2, 3]
    logged = [r['CIDEr-D'] for r in map(json.loads, open(models / 'train_log.jsonl')) if 'CIDEr-D' in r]
    fresh = CiderD({i: [tokenize(c) for c in (caption, caption.upper())]
                    for i, (_, caption) in enumerate(list(SCENES.values())[:3], 1)})
    paths = [str(folder / 'images' / name) for name in list(SCENES)[:3]]
    for epoch, expected in zip((1, 3), (logged[0], logged[2])):
        captioner = Captioner.load(str(models / f'encoder-{epoch}-2.ckpt'), str(models / f'decoder-{epoch}-2.ckpt'),
                                   str(folder / 'vocab.pkl'), 'cpu')
        captions = [c for _, c in captioner.caption_files(paths, num_workers=0)]
        assert sum(fresh.score(i, tokenize(c)) for i, c in enumerate(captions, 1)) / 3 == pytest.approx(expected)
    assert len(set(logged)) > 1  # the captions changed between epochs, and so did their score


@pytest.mark.parametrize('decoder', ['lstm', 'attention'])
def test_mixed_precision_trains_from_images_and_learns(tmp_path, decoder, capsys):
    """--amp (bfloat16 autocast on a CPU): the frozen backbone's maps reach the trained layers in
    a dtype they take, and the model still learns its captions. On a CPU without native bfloat16
    for these layers (oneDNN refuses the LSTM there), it says so in one line and trains in float32."""
    folder = make_scenes(tmp_path)
    models = tmp_path / 'models'
    assert train.main(train_args(folder, models, '--decoder', decoder, '--amp', '--num_epochs', '30',
                                 '--learning_rate', '0.01', '--log_step', '2', '--save_step', '1000')) == 0
    fallback = 'warning: --amp: this CPU does not compute bfloat16 natively'
    assert (fallback in capsys.readouterr().err) == (not devices.native_bf16(torch.device('cpu')))
    log = [json.loads(line) for line in open(models / 'train_log.jsonl')]
    assert log[-1]['loss'] < 0.2 * log[0]['loss']



def test_grad_clip_clips_every_step_at_its_value(tmp_path, monkeypatch):
    """--grad_clip 0.05: every step's gradient norm is clipped to 0.05 before the optimizer steps."""
    folder = make_scenes(tmp_path)
    real_clip, seen = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real_clip(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen.append((max_norm, before.item(), after.item()))
        return before
    monkeypatch.setattr(train.nn.utils, 'clip_grad_norm_', spy)
    assert train.main(train_args(folder, tmp_path / 'm', '--num_epochs', '2', '--grad_clip', '0.05')) == 0
    assert [s[0] for s in seen] == [0.05] * 4  # 2 epochs of 2 steps
    assert all(before > 0.05 and after == pytest.approx(0.05, rel=1e-4) for _, before, after in seen), seen


def test_the_learning_rate_decays_every_n_epochs(tmp_path):
    """--lr_decay_every 2 --lr_decay 0.5 from 0.01: epochs 1-2 at 0.01, 3-4 at 0.005, 5 at 0.0025."""
    folder = make_scenes(tmp_path)
    trainer = train.Trainer(train.parse_args(train_args(folder, tmp_path / 'm', '--learning_rate', '0.01',
                                                        '--lr_decay_every', '2', '--lr_decay', '0.5')))
    rates = []
    for epoch in range(1, 6):
        trainer.state.epoch = epoch
        trainer.set_learning_rate()
        rates.append(trainer.optimizer.param_groups[0]['lr'])
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])
