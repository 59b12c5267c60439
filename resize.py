"""Resize every image under a folder to a square of --image_size pixels.

The classic recipe squares images (aspect ratio not kept) to 256x256 before training crops
224x224 from them. Sub-folders are kept, outputs that already exist are skipped, and broken
files are reported and skipped.
"""
import os
import sys
from multiprocessing import Pool

from tqdm import tqdm

from files import atomic_write
from errors import InputError, integer, script_parser
from images import ImageError, open_image, square


def _resize_file(job):
    """Resize one file; returns an error message, or None when it worked."""
    src, dst, size = job
    try:
        # Decoding at reduced scale down to twice the target keeps LANCZOS quality.
        image = square(open_image(src, min_size=2 * size), size)
    except ImageError as e:
        return str(e)
    except MemoryError:
        return f'{src}: not enough memory to resize it'

    # Keep the file name (caption files refer to it); JPEG stays JPEG, anything else is stored losslessly.
    # An interrupted run leaves no half-written image (a rerun skips existing files); fsync per image
    # would cost more than the resize.
    with atomic_write(dst, durable=False) as f:
        if dst.lower().endswith(('.jpg', '.jpeg')):
            image.save(f, 'JPEG', quality=95)
        else:
            image.save(f, 'PNG')
    return None


def resize_images(image_dir, output_dir, size, num_workers=None):
    """Resize every file under image_dir into output_dir; returns (resized, skipped, failed) counts."""
    jobs, skipped = [], 0
    output = os.path.realpath(output_dir)
    for root, dirs, files in os.walk(image_dir):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != output)  # not our output
        for name in sorted(files):
            if name.startswith('.'):
                continue
            src = os.path.join(root, name)
            dst = os.path.join(output_dir, os.path.relpath(src, image_dir))
            if os.path.exists(dst):
                skipped += 1
            else:
                jobs.append((src, dst, size))
    failed = 0
    num_workers = num_workers or os.cpu_count() or 1
    with Pool(num_workers) if num_workers > 1 else _Inline() as pool:
        results = pool.imap(_resize_file, jobs, chunksize=8)
        for error in tqdm(results, total=len(jobs), desc='resizing', unit='image', file=sys.stderr):
            if error:
                failed += 1
                tqdm.write(f'warning: skipped {error}', file=sys.stderr)
    return len(jobs) - failed, skipped, failed


class _Inline:
    """Stands in for a process pool when one worker is asked for."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--image_dir', default='data/train2014/', help='folder of images to resize')
    parser.add_argument('--output_dir', default='data/resized2014/', help='folder for the resized images')
    parser.add_argument('--image_size', type=integer(1, 8192), default=256, help='side of the square output')
    parser.add_argument('--num_workers', type=integer(0), default=0, help='processes (0 = one per core)')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.image_dir):
        sys.exit(f'error: {args.image_dir}: no such folder (bash download.sh gets COCO\'s images, or name yours with '
                 f'--image_dir)')
    try:
        resized, skipped, failed = resize_images(args.image_dir, args.output_dir, args.image_size, args.num_workers)
    except InputError as e:  # a full disk: what was resized stays, and a rerun goes on from there
        sys.exit(f'error: {e}')
    print(f"Resized {resized} images into '{args.output_dir}' ({skipped} already there, {failed} unreadable)")


if __name__ == '__main__':
    main()
