"""The attention figure: the weights of the caption printed, and the figure drawn from them."""
import os

import pytest
import torch
from PIL import Image

import sample
from captioner import Captioner
from conftest import ROOT, TEST_DATA, run_script
from figures import attention_figure
from decoding import Decoding

PHOTOS = [os.path.join(ROOT, 'png', 'example.png')] + sorted(
    os.path.join(TEST_DATA, 'images', n) for n in os.listdir(os.path.join(TEST_DATA, 'images')))


def teacher_forced_attention(captioner, image, words):
    """The attention weights of each word of `words`, feeding the caption back in step by step."""
    vocab, decoder = captioner.vocab, captioner.decoder
    with torch.inference_mode():
        features = captioner.encoder(captioner.transform(image)[None])
        _, state = decoder.start(features)
        weights = []
        for word in ['<start>'] + words[:-1]:
            _, state = decoder.step(torch.tensor([vocab(word)]), state)
            weights.append(decoder.attention(state)[0])
    return torch.stack(weights)


def test_weights_are_those_of_the_printed_beam_caption():
    """On a photo where beam 3 and greedy disagree, the weights returned are the beam caption's own."""
    captioner = Captioner.load(device='cpu')  # the shipped attention model
    assert captioner.has_attention
    for path in PHOTOS:
        image = Image.open(path).convert('RGB')
        captioner.decoding = Decoding(beam_size=1, length_penalty=1)
        greedy = captioner.caption(image)
        captioner.decoding = Decoding(beam_size=3, length_penalty=1)
        attended = captioner.attend(image)
        caption, weights = attended.caption, attended.weights
        if caption != greedy:
            break
    else:
        pytest.fail('beam 3 and greedy agree on every photo: nothing to tell them apart')
    assert caption == captioner.caption(image)  # the caption printed without the figure
    words = caption.split()
    side = int(weights.shape[1])
    assert weights.shape == (len(words), side, side) and side == 7  # one 7x7 map per word (224 px, Lite1)
    assert torch.allclose(weights.sum((1, 2)), torch.ones(len(words)), atol=1e-5)
    expected = teacher_forced_attention(captioner, image, words).view(len(words), side, side)
    assert torch.allclose(weights, expected, atol=1e-5)
    found = captioner.describe(image)  # the demo's one search
    beams, described, described_weights = found.beams, found.caption, found.weights
    assert len(beams) == 3 and beams[0][0] == described == caption and beams[1][0] != caption
    assert beams[0][1] >= beams[1][1] >= beams[2][1] and torch.equal(described_weights, weights)
    figure = attention_figure(image, words, weights)
    assert len(figure.axes) == len(words) + 1
    assert [ax.get_title() for ax in figure.axes[1:]] == words


def test_sample_writes_figures_and_refuses_a_model_without_attention(tmp_path, tiny_model):
    result = run_script('sample.py', '--image', PHOTOS[0], '--attention', str(tmp_path / 'fig.png'))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / 'fig.png').width > 800 and len(result.stdout.splitlines()) == 1
    result = run_script('sample.py', '--image', *PHOTOS[1:3], '--attention', str(tmp_path / 'figures'))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / 'figures')) == sorted(
        os.path.splitext(os.path.basename(p))[0] + '.png' for p in PHOTOS[1:3])
    result = run_script('sample.py', '--image', PHOTOS[0], '--attention', str(tmp_path / 'no.png'),
                        '--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder'],
                        '--vocab_path', tiny_model['vocab'])
    assert result.returncode == 2 and result.stdout == '' and not (tmp_path / 'no.png').exists()
    assert result.stderr.strip().splitlines() == [
        "error: --attention: this model has no attention (its decoder is 'lstm'; train with --decoder attention)"]


def test_attention_for_several_photos_asks_for_a_folder(tmp_path):
    with pytest.raises(SystemExit) as refused:
        sample.main(['--image', *PHOTOS[1:3], '--attention', str(tmp_path / 'fig.png')])
    assert str(refused.value) == (f'error: --attention {tmp_path / "fig.png"}: 2 images need a folder, which gets one '
                                  'figure each (e.g. --attention figures/)')
    assert not (tmp_path / 'fig.png').exists()
