import json
import os
import pickle

import pytest
import torch
from PIL import Image

import sample
from captioner import Captioner
from conftest import ROOT, TEST_DATA, run_script
from odd_images import write_broken_images, write_odd_images


def model_flags(tiny_model):
    return ['--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder'],
            '--vocab_path', tiny_model['vocab'], '--device', 'cpu']


def caption_of(image, tiny_model, capsys, *extra):
    sample.main(['--image', str(image), *model_flags(tiny_model), *extra])
    return capsys.readouterr()


def test_prints_only_the_caption(tiny_model, capsys):
    out = caption_of(os.path.join(ROOT, 'png', 'example.png'), tiny_model, capsys).out
    assert out.endswith('\n') and out.count('\n') == 1
    words = out.split()
    assert words and out.strip() == ' '.join(words) and out == out.lower()
    assert not {'<start>', '<end>', '<pad>', '<unk>'} & set(words)


def test_captions_every_odd_image(tiny_model, tmp_path, capsys):
    for name in write_odd_images(tmp_path):
        result = caption_of(tmp_path / name, tiny_model, capsys)
        assert result.out.count('\n') == 1 and result.out.strip(), name


def test_cli_is_silent_on_stdout_except_for_the_caption(tiny_model):
    """In a real process, nothing (package loaders included) may print to stdout but the caption."""
    result = run_script('sample.py', '--image', os.path.join(ROOT, 'png', 'example.png'), *model_flags(tiny_model))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and result.stdout.strip()


def error_of(*args):
    """Run sample.main in-process; return the one-line error it exits with."""
    with pytest.raises(SystemExit) as stop:
        sample.main(list(args))
    message = str(stop.value.code)
    assert message.startswith('error: ') and '\n' not in message
    return message


def test_bad_images_give_one_line_errors(tiny_model, tmp_path, capsys):
    problems = write_broken_images(tmp_path)
    problems.update({'absent.jpg': 'no such file'})
    for name, problem in problems.items():
        message = error_of('--image', str(tmp_path / name), *model_flags(tiny_model))
        assert message.startswith(f'error: {tmp_path / name}: ') and problem in message, message
    assert capsys.readouterr().out == ''


def test_bad_model_files_give_one_line_errors(tiny_model, tmp_path, capsys):
    example = os.path.join(ROOT, 'png', 'example.png')

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path}/pwned',))
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(RunsCode()))
    torch.save({'config': RunsCode()}, tmp_path / 'evil.ckpt')
    cases = [
        (['--vocab_path', str(tmp_path / 'evil.pkl')], 'evil.pkl: not a usable vocabulary'),
        (['--decoder_path', str(tmp_path / 'evil.ckpt')], 'evil.ckpt: refused: it holds Python code or objects'),
        (['--encoder_path', str(tmp_path / 'missing.ckpt')], 'missing.ckpt: no such checkpoint'),
        (['--vocab_path', str(tmp_path / 'missing.pkl')], 'missing.pkl: no such vocabulary file'),
        (['--decoder_path', tiny_model['encoder']], 'encoder-2-4.ckpt: no decoder weights (embed.weight, linear.weight)'),
    ]
    for flags, problem in cases:
        assert problem in error_of('--image', example, *model_flags(tiny_model), *flags)
    assert capsys.readouterr().out == ''
    assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('what', ['image', 'vocab'])
def test_errors_exit_non_zero_without_traceback(tiny_model, tmp_path, what):
    write_broken_images(tmp_path)
    flags = ['--image', str(tmp_path / 'bomb.png')] if what == 'image' else \
        ['--image', os.path.join(ROOT, 'png', 'example.png'), '--vocab_path', str(tmp_path / 'empty.jpg')]
    result = run_script('sample.py', *model_flags(tiny_model), *flags)
    assert result.returncode == 1 and result.stdout == ''
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith('error: ')


def test_save_writes_the_captioned_image(tiny_model, tmp_path, capsys):
    out = tmp_path / 'captioned.png'
    caption_of(os.path.join(ROOT, 'png', 'example.png'), tiny_model, capsys, '--save', str(out))
    with Image.open(out) as image:
        assert image.format == 'PNG' and image.width >= 400


def test_own_checkpoints_need_no_size_flags(tiny_model, capsys):
    """The tiny model is 32/48 wide; the classic size flags (256/512) must not matter for it."""
    default = caption_of(os.path.join(ROOT, 'png', 'example.png'), tiny_model, capsys).out
    other = caption_of(os.path.join(ROOT, 'png', 'example.png'), tiny_model, capsys,
                       '--embed_size', '999', '--hidden_size', '7', '--cnn', 'resnet18').out
    assert default == other


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_captions_on_cuda_like_on_cpu(tiny_model, capsys):
    image = os.path.join(ROOT, 'png', 'example.png')
    cpu = caption_of(image, tiny_model, capsys).out
    sample.main(['--image', image, *model_flags(tiny_model)[:-2], '--device', 'cuda'])
    assert capsys.readouterr().out == cpu


def test_many_images_folders_and_globs(tiny_model, coco_sample, tmp_path, capsys):
    folder = coco_sample['images']
    names = sorted(os.listdir(folder))
    write_broken_images(tmp_path)
    args = ['--image', folder, os.path.join(folder, names[0]), str(tmp_path / '*.jpg'), *model_flags(tiny_model),
            '--batch_size', '5', '--num_workers', '0', '--output', str(tmp_path / 'results.json'),
            '--sheet', str(tmp_path / 'sheet.png')]
    with pytest.raises(SystemExit, match=r'3 of 15 images could not be read'):  # empty, text, truncated .jpg
        sample.main(args)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split('\t')[0] for line in lines] == [os.path.join(folder, n) for n in names]
    assert all(len(line.split('\t')) == 2 and line.split('\t')[1] for line in lines)
    assert captured.err.count('warning: skipped') == 3
    results = json.load(open(tmp_path / 'results.json'))
    assert [r['file_name'] for r in results] == [line.split('\t')[0] for line in lines]
    assert [r['caption'] for r in results] == [line.split('\t')[1] for line in lines]
    with Image.open(tmp_path / 'sheet.png') as sheet:
        assert sheet.width > 800 and sheet.height > 600


def test_batched_beam_one_equals_one_by_one_greedy(capsys):
    """The shipped model (its captions differ from photo to photo): batches of 7 photos, one by one."""
    folder = os.path.join(TEST_DATA, 'images')
    sample.main(['--image', folder, '--batch_size', '7', '--beam_size', '1', '--num_workers', '0'])
    batched = capsys.readouterr().out.splitlines()
    assert len(batched) == 12 and len({line.split('\t')[1] for line in batched}) > 6
    for line in batched[5:9]:  # the second batch's first photos and the first's last
        path, caption = line.split('\t')
        sample.main(['--image', path, '--beam_size', '1'])
        assert capsys.readouterr().out.strip() == caption


def test_decoding_and_precision_flags_reach_the_model(tiny_model, monkeypatch, capsys):
    """Each flag must change what runs: the beam search's arguments, and the encoder's precision."""
    import devices
    import captioner
    calls = []
    real_search = captioner.beam_search
    monkeypatch.setattr(captioner, 'beam_search', lambda *a, **k: calls.append(a[3:6]) or real_search(*a, **k))
    monkeypatch.setattr(devices, 'native_bf16', lambda device: True)
    image = os.path.join(ROOT, 'png', 'example.png')
    recorded = (1, 20, 0.0)  # what the tiny model's checkpoint records: greedy, 20 words, no penalty
    for flags, expected in ((['--beam_size', '3'], (3, 20, 0.0)), (['--length_penalty', '0.7'], (1, 20, 0.7)),
                            (['--max_length', '3'], (1, 3, 0.0)), (['--precision', 'bf16'], recorded)):
        out = caption_of(image, tiny_model, capsys, *flags).out
        assert out.count('\n') == 1 and calls[-1] == expected, flags
    files = tiny_model['encoder'], tiny_model['decoder'], tiny_model['vocab']
    assert out == Captioner.load(*files, device='cpu', precision='bf16').caption(image) + '\n'
    assert caption_of(image, tiny_model, capsys, '--max_length', '3').out == \
        Captioner.load(*files, device='cpu', max_length=3).caption(image) + '\n'
    encoders = []
    monkeypatch.setattr(captioner, 'use_bf16', lambda encoder, device: encoders.append(encoder))
    caption_of(image, tiny_model, capsys, '--precision', 'bf16')
    caption_of(image, tiny_model, capsys)
    assert len(encoders) == 1


def test_bf16_switches_the_encoder_only_where_bf16_is_native(tiny_model, monkeypatch, capsys):
    import devices
    from captioner import Captioner
    files = tiny_model['encoder'], tiny_model['decoder'], tiny_model['vocab']
    cpu = torch.device('cpu')
    if devices.native_bf16(cpu):
        assert Captioner.load(*files, 'cpu', 'bf16').encoder.bf16
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    assert not devices.native_bf16(cpu)
    assert not Captioner.load(*files, 'cpu', 'bf16').encoder.bf16
    assert 'warning: no native bfloat16 on this cpu device; using fp32' in capsys.readouterr().err


def test_no_images_in_a_folder_is_an_error(tiny_model, tmp_path):
    assert 'no images there' in error_of('--image', str(tmp_path), *model_flags(tiny_model))
