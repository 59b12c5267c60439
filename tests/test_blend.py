"""blend_checkpoints.py: weight-space blends of two checkpoints of one model."""
import os

import pytest
import torch

import blend_checkpoints
import sample
from checkpoints import read_model, write_model
from conftest import ROOT
from model import ModelConfig


def weights(path):
    return torch.load(path, weights_only=True)


def test_blend_is_the_weighted_mean_and_captions(tiny_model, tmp_path, capsys):
    first, second = str(tiny_model['models'] / 'decoder-1-4.ckpt'), tiny_model['decoder']
    out = tmp_path / 'decoder-blend.ckpt'
    assert blend_checkpoints.main(['--first', first, '--second', second, '--weight', '0.25', '--output', str(out)]) == 0
    blend, a, b = weights(out), weights(first), weights(second)
    assert 'train_state' not in blend and blend['decoding'] == b['decoding'] and blend['config'] == b['config']
    assert not torch.equal(a['model']['embed.weight'], b['model']['embed.weight'])
    encoders = [weights(path) for path in (tmp_path / 'encoder-blend.ckpt', tiny_model['models'] / 'encoder-1-4.ckpt',
                                           tiny_model['encoder'])]
    for blended, one, two in ((blend, a, b), encoders):  # every tensor of both files, BatchNorm statistics too
        for key, value in two['model'].items():
            expected = 0.75 * one['model'][key] + 0.25 * value if value.is_floating_point() else value
            torch.testing.assert_close(blended['model'][key], expected)
    for weight, same_as in (('0', a), ('1', b)):  # the ends are the two models themselves
        blend_checkpoints.main(['--first', first, '--second', second, '--weight', weight, '--output', str(out)])
        assert all(torch.equal(v, same_as['model'][k]) for k, v in weights(out)['model'].items())
    captions = []
    for encoder, decoder in ((tmp_path / 'encoder-blend.ckpt', out), (tiny_model['encoder'], second)):
        capsys.readouterr()
        sample.main(['--image', os.path.join(ROOT, 'png', 'example.png'), '--encoder_path', str(encoder),
                     '--decoder_path', str(decoder), '--vocab_path', tiny_model['vocab'], '--device', 'cpu'])
        captions.append(capsys.readouterr().out)
    assert captions[0].strip() and captions[0] == captions[1]  # weight 1 captions as the second model does


def test_first_side_may_be_the_mean_of_several_checkpoints(tiny_model, tmp_path, capsys):
    first = str(tiny_model['models'] / 'decoder-1-4.ckpt')
    saved = read_model(tiny_model['encoder'], tiny_model['decoder'])
    config, decoding, encoder, decoder = saved.config, saved.decoding, saved.encoder_state, saved.decoder_state
    doubled = lambda state: {k: 2 * v if v.is_floating_point() else v for k, v in state.items()}
    other = str(tmp_path / 'decoder-doubled.ckpt')  # a third model: the second's weights times two
    write_model(str(tmp_path / 'encoder-doubled.ckpt'), other, config, decoding, doubled(encoder), doubled(decoder))
    out = tmp_path / 'decoder-blend.ckpt'
    assert blend_checkpoints.main(['--first', first, other, '--second', tiny_model['decoder'], '--weight', '0.25',
                                   '--output', str(out)]) == 0
    assert 'the mean of' in capsys.readouterr().out
    one, two, second = (weights(path)['model'] for path in (first, other, tiny_model['decoder']))
    for key, value in second.items():
        expected = 0.75 * (one[key] + two[key]) / 2 + 0.25 * value if value.is_floating_point() else value
        torch.testing.assert_close(weights(out)['model'][key], expected)


def test_blend_refuses_bad_input_and_keeps_the_models(tiny_model, tmp_path, capsys):
    first, second = str(tiny_model['models'] / 'decoder-1-4.ckpt'), tiny_model['decoder']
    before = open(second, 'rb').read()
    saved = read_model(tiny_model['encoder'], second)
    config, decoding, encoder, decoder = saved.config, saved.decoding, saved.encoder_state, saved.decoder_state
    wider = ModelConfig(**{**config.__dict__, 'image_size': config.image_size + 8})  # same tensors, another model
    write_model(str(tmp_path / 'encoder-wide.ckpt'), str(tmp_path / 'decoder-wide.ckpt'), wider, decoding, encoder, decoder)
    cases = [(['--weight', '0.5', '--output', tiny_model['encoder']], 'would overwrite one of the models blended'),
             (['--weight', '0.5', '--output', str(tmp_path / 'decoder-x.ckpt'), '--second', str(tmp_path / 'decoder-wide.ckpt')],
              'decoder-wide.ckpt: a different model from'),
             (['--weight', '0.5', '--output', str(tmp_path / 'decoder-x.ckpt'), '--first', first,
               str(tmp_path / 'decoder-wide.ckpt')], 'decoder-wide.ckpt: a different model from')]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            blend_checkpoints.main(['--first', first, '--second', second, *extra])
        assert message in str(exit_.value) and str(exit_.value).startswith('error: ')
    with pytest.raises(SystemExit):  # argparse: 'argument --weight: it must be a number from 0 to 1, not 1.5'
        blend_checkpoints.main(['--first', first, '--second', second, '--weight', '1.5', '--output',
                                str(tmp_path / 'decoder-x.ckpt')])
    assert 'argument --weight: it must be a number from 0 to 1, not 1.5' in capsys.readouterr().err
    assert open(second, 'rb').read() == before and not (tmp_path / 'decoder-x.ckpt').exists()
