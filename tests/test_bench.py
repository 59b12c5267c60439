"""The benchmarks run as bench/README.md says, on the photos in the repo."""
import re

import pytest
import torch

import bf16
from conftest import run_script


def test_bf16_agreement_bench_counts_identical_captions():
    if not bf16.native_bf16(torch.device('cpu')):
        pytest.skip('this CPU has no native bfloat16')
    result = run_script('bench/bench_bf16_agreement.py', '--images', '6')
    assert result.returncode == 0, result.stderr
    assert 'attention decoder): captions of 6 photos' in result.stdout
    counts = [int(n) for n in re.findall(r'(\d+) \(\d+\.\d%\)', result.stdout)]
    assert len(counts) == 4 and all(0 <= n <= 6 for n in counts)
