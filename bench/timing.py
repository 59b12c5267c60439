"""Timing helpers shared by the benchmark scripts: medians of repeated runs, one printed table."""
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLE_PHOTOS = os.path.join(ROOT, 'tests', 'data', 'coco', 'images')  # 12 real COCO photos in the repo
SAMPLE_CAPTIONS = os.path.join(ROOT, 'tests', 'data', 'coco', 'captions.json')


def median_seconds(run, repeats=3, setup=None):
    """Median wall time of `run()` over `repeats` runs (`setup()` before each, untimed)."""
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine():
    """The machine in one line: cores, torch, threads, and whether the CPU computes bfloat16 natively."""
    import torch
    from devices import native_bf16
    bf16 = 'native bfloat16 (AVX-512 BF16 or AMX)' if native_bf16(torch.device('cpu')) else 'no native bfloat16'
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__}, ' \
           f'{torch.get_num_threads()} threads'


def report(title, unit, baseline_name, baseline, new_name, new):
    """Print baseline, new way and their ratio (rates: higher is better)."""
    print(f'{title}\n  {baseline_name:<48} {baseline:10.2f} {unit}\n  {new_name:<48} {new:10.2f} {unit}\n'
          f'  ratio {new / baseline:.2f}x')
