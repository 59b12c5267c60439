"""resize.py (a process per core, JPEG draft decoding) against the classic one-process LANCZOS loop.

    python bench/bench_resize.py --image_dir data/val2014   # default: the 12 COCO photos in tests/data
"""
import argparse
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from timing import SAMPLE_PHOTOS, machine, median_seconds, report
import resize


def classic_loop(paths, out, size):
    """The classic tutorial's resize.py: open, resize with LANCZOS, save, one image after another."""
    for path in paths:
        with Image.open(path) as image:
            image.convert('RGB').resize((size, size), Image.LANCZOS).save(os.path.join(out, os.path.basename(path)))


def compare(paths, work, size, repeats, label):
    src, classic, ours = (os.path.join(work, d) for d in ('src', 'classic', 'ours'))
    reset = lambda folder: lambda: (shutil.rmtree(folder, ignore_errors=True), os.makedirs(folder))
    baseline = median_seconds(lambda: classic_loop(paths, classic, size), repeats, reset(classic))
    new = median_seconds(lambda: resize.resize_images(src, ours, size), repeats, reset(ours))
    report(f'{label}: {len(paths)} photos to {size}x{size}', 'images/s', 'one-process LANCZOS loop',
           len(paths) / baseline, f'resize.py ({os.cpu_count()} processes, draft decoding)', len(paths) / new)
    exact = {p: np.asarray(Image.open(p).convert('RGB').resize((size, size), Image.LANCZOS), np.int16) for p in paths}
    for name, folder in (('classic file (JPEG q75)', classic), ('resize.py file (draft + JPEG q95)', ours)):
        error = np.mean([np.abs(np.asarray(Image.open(os.path.join(folder, os.path.basename(p))), np.int16)
                                - exact[p]).mean() for p in paths])
        print(f'  {name}: mean absolute difference from an exact full-size LANCZOS resize {error:.2f} (of 255)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_dir', default=SAMPLE_PHOTOS, help='a folder of real JPEG photos')
    parser.add_argument('--image_size', type=int, default=256)
    parser.add_argument('--large', type=int, default=40, help='photos upscaled to 1600 px for the second test')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    print(machine())
    names = sorted(n for n in os.listdir(args.image_dir) if n.lower().endswith('.jpg'))
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, 'src'))
        for name in names:
            shutil.copy(os.path.join(args.image_dir, name), os.path.join(work, 'src', name))
        paths = [os.path.join(work, 'src', n) for n in names]
        compare(paths, work, args.image_size, args.repeats, f'the photos of {args.image_dir}')
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, 'src'))
        for name in names[:args.large]:
            with Image.open(os.path.join(args.image_dir, name)) as image:
                image.convert('RGB').resize((1600, 1200), Image.LANCZOS).save(os.path.join(work, 'src', name),
                                                                              quality=90)
        paths = [os.path.join(work, 'src', n) for n in names[:args.large]]
        compare(paths, work, args.image_size, args.repeats, 'the same photos upscaled to 1600x1200 JPEG')


if __name__ == '__main__':
    main()
