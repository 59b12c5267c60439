"""Reading images: the one place where any file Pillow can open becomes an upright RGB picture.

No torch here, so resize.py starts quickly.
"""
import glob
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from errors import InputError

IMAGE_EXTENSIONS = tuple(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class ImageError(InputError):
    """An image that cannot be read (data sets skip these instead of stopping)."""


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

    `path` may also be an open binary file. With min_size, a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale (much faster), but never below min_size on either side. A missing, empty, broken or
    too-large (decompression bomb) file raises ImageError.
    """
    name = getattr(path, 'name', path)
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
        raise ImageError(f'{name}: no such file') from None
    except IsADirectoryError:
        raise ImageError(f'{name}: is a folder, not an image') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f'{name}: refused as a possible decompression bomb ({e})') from None
    except Image.UnidentifiedImageError:
        empty = os.path.getsize(path) == 0 if isinstance(path, (str, os.PathLike)) else False
        raise ImageError(f'{name}: empty file' if empty else f'{name}: not an image Pillow can read') from None
    except PermissionError:
        raise ImageError(f'{name}: permission denied') from None
    except Exception as e:  # noqa: BLE001 -- Pillow's decoders raise many kinds of error on broken files
        raise ImageError(f'{name}: broken image ({type(e).__name__}: {e})') from None


def square(image, size):
    """Square an RGB image to size x size with LANCZOS (aspect ratio not kept), as the classic recipe."""
    return image.resize((size, size), Image.LANCZOS)


def find_images(values):
    """Files named directly, the images in named folders, and glob matches, in order, once each."""
    paths = []
    for value in values:
        if os.path.isdir(value):
            found = sorted(os.path.join(value, name) for name in os.listdir(value)
                           if name.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(value):
            found = sorted(p for p in glob.glob(value) if os.path.isfile(p))
        else:
            found = [value]
        if not found:
            raise InputError(f'{value}: no images there')
        paths += [p for p in found if p not in paths]
    return paths
