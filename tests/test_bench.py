"""The bf16 agreement benchmark runs as the README says, on a few real photos."""
import re

import pytest
import torch

import sample
from conftest import run_script, shared_path


def test_bf16_agreement_bench_counts_identical_captions():
    if not sample.native_bf16(torch.device('cpu')):
        pytest.skip('this CPU has no native bfloat16')
    shared_path('data', 'flickr8k', 'Images')
    result = run_script('bench/bench_bf16_agreement.py', '--images', '6')
    assert result.returncode == 0, result.stderr
    assert 'attention decoder): captions of 6 photos' in result.stdout
    counts = [int(n) for n in re.findall(r'(\d+) \(\d+\.\d%\)', result.stdout)]
    assert len(counts) == 4 and all(0 <= n <= 6 for n in counts)
