"""Resize every image under a folder to a square of --image_size pixels.

The classic recipe squares images (aspect ratio not kept) to 256x256 before
training crops 224x224 from them. This script also holds `open_image`, the one
place where any image Pillow can read is turned into an upright RGB picture.
Sub-folders are kept, outputs that already exist are skipped, and broken files
are reported and skipped.
"""
import argparse
import os
import sys
import warnings
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm


class ImageError(ValueError):
    """An image that cannot be read; the message names the file and the problem."""


def _to_rgb(image):
    """Convert any Pillow mode to RGB: transparency over white, 16-bit and float scaled to 8 bits."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
        if image.mode.startswith('I;16') or (low >= 0 and 255 < high <= 65535):
            pixels = pixels / 257  # 16-bit
        elif image.mode == 'F' and low >= 0 and high <= 1:
            pixels = pixels * 255  # floats in [0, 1]
        elif high > low and (low < 0 or high > 255):
            pixels = (pixels - low) * (255 / (high - low))  # any other range: stretch it
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), 'L')
    if image.mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')
    if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        image = image.convert('RGBA')
        background = Image.new('RGBA', image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image if image.mode == 'RGB' else image.convert('RGB')


def open_image(path, min_size=None):
    """Open any image Pillow reads as an upright RGB picture (first frame of an animation).

    With min_size, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (much faster), but never
    below min_size on either side. A missing, empty, broken or too-large (decompression bomb)
    file raises ImageError.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                if min_size:
                    image.draft('RGB', (min_size, min_size))
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise ImageError(f'{path}: is a folder, not an image') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f'{path}: refused as a possible decompression bomb ({e})') from None
    except Image.UnidentifiedImageError:
        if os.path.getsize(path) == 0:
            raise ImageError(f'{path}: empty file') from None
        raise ImageError(f'{path}: not an image Pillow can read') from None
    except PermissionError:
        raise ImageError(f'{path}: permission denied') from None
    except Exception as e:  # noqa: BLE001 -- Pillow's decoders raise many kinds of error on broken files
        raise ImageError(f'{path}: broken image ({type(e).__name__}: {e})') from None


def resize_image(image, size):
    """Square an RGB image to size x size with LANCZOS, as the classic recipe does."""
    return image.resize((size, size), Image.LANCZOS)


def _resize_file(job):
    """Resize one file; returns an error message, or None when it worked."""
    src, dst, size = job
    try:
        # Decoding at reduced scale down to twice the target keeps LANCZOS quality.
        image = resize_image(open_image(src, min_size=2 * size), size)
    except ImageError as e:
        return str(e)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + '.tmp'
    # Keep the file name (caption files refer to it); JPEG stays JPEG, anything else is stored losslessly.
    with open(tmp, 'wb') as f:
        if dst.lower().endswith(('.jpg', '.jpeg')):
            image.save(f, 'JPEG', quality=95)
        else:
            image.save(f, 'PNG')
    os.replace(tmp, dst)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_dir', default='data/train2014/', help='folder of images to resize')
    parser.add_argument('--output_dir', default='data/resized2014/', help='folder for the resized images')
    parser.add_argument('--image_size', type=int, default=256, help='side of the square output')
    parser.add_argument('--num_workers', type=int, default=0, help='processes (0 = one per core)')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.image_dir):
        sys.exit(f'error: {args.image_dir}: no such folder')
    resized, skipped, failed = resize_images(args.image_dir, args.output_dir, args.image_size, args.num_workers)
    print(f"Resized {resized} images into '{args.output_dir}' ({skipped} already there, {failed} unreadable)")


if __name__ == '__main__':
    main()
