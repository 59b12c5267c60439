"""The benchmarks run as bench/README.md says, on the photos in the repo."""
import copy
import os
import re
from dataclasses import replace

import pytest
import torch

import devices
from captioner import Captioner
from conftest import TEST_DATA, run_script


def test_bf16_agreement_bench_counts_identical_captions():
    """The bench's four counts are those of captioning the same 6 photos here, fp32 against bf16
    (autocast alone, and with the bias correction), with the model's decoding and greedily."""
    if not devices.native_bf16(torch.device('cpu')):
        pytest.skip('this CPU has no native bfloat16 for these layers: --precision bf16 stays fp32 here, '
                    'nothing to count (checked in test_sample)')
    result = run_script('bench/bench_bf16_agreement.py', '--images', '6')
    assert result.returncode == 0, result.stderr
    assert 'attention decoder): captions of 6 photos' in result.stdout
    counts = [int(n) for n in re.findall(r'(\d+) \(\d+\.\d%\)', result.stdout)]
    folder = os.path.join(TEST_DATA, 'images')
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))][:6]
    captioner = Captioner.load(device='cpu')
    fp32, autocast = captioner.encoder, copy.deepcopy(captioner.encoder)
    autocast.bf16 = True
    corrected = Captioner.load(device='cpu', precision='bf16').encoder
    expected = []
    for decoding in (captioner.decoding, replace(captioner.decoding, beam_size=1)):
        captioner.decoding, captions = decoding, []
        for encoder in (fp32, autocast, corrected):
            captioner.encoder = encoder
            captions.append(dict(captioner.caption_files(paths, num_workers=0, progress=False)))
        expected += [sum(captions[k][p] == captions[0][p] for p in paths) for k in (1, 2)]
    assert counts == expected
