"""Reading images: the one place where any file Pillow can open becomes an upright RGB picture,
and the model's input made from it.

torch is imported only by the functions that make tensors, so resize.py and prepro_csv.py start quickly.
"""
import glob
import math
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from errors import InputError

IMAGE_EXTENSIONS = tuple(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class ImageError(InputError):
    """An image that cannot be read (data sets skip these instead of stopping)."""


# What one image may cost: its decoded pixels. No photo of Flickr8k or COCO comes near it (COCO's
# largest are 640 px a side); a larger JPEG is decoded at a reduced scale instead (Pillow's draft mode,
# 1/2 to 1/8) so that it fits; other formats are refused before they are decoded.
MAX_PIXELS = 50_000_000


def _to_8bit(image):
    """A 16-bit, 32-bit integer or float image as 8-bit grey ('L'), a block of rows at a time in
    float32 (never a float64 copy of the whole image): 16-bit scaled by 1/257, floats in [0, 1] by
    255, any other range stretched to 0..255."""
    pixels = np.asarray(image)
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
    if image.mode.startswith('I;16') or (low >= 0 and 255 < high <= 65535):
        scale, offset = np.float32(1 / 257), 0
    elif image.mode == 'F' and low >= 0 and high <= 1:
        scale, offset = np.float32(255), 0
    elif high > low and (low < 0 or high > 255):
        scale, offset = np.float32(255 / (float(high) - float(low))), low
    else:
        scale, offset = np.float32(1), 0
    out = np.empty(pixels.shape, np.uint8)
    rows = max(1, 1_000_000 // max(1, pixels.shape[1]))
    for top in range(0, pixels.shape[0], rows):
        block = (pixels[top:top + rows].astype(np.float32) - np.float32(offset)) * scale
        out[top:top + rows] = np.clip(np.rint(block), 0, 255)
    return Image.fromarray(out, 'L')


def _to_rgb(image, name):
    """Convert any Pillow mode to RGB: transparency over white, 16-bit and float scaled to 8 bits."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        image = _to_8bit(image)
    if image.mode == 'P' and 'transparency' in image.info:
        image = image.convert('RGBA')
    if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        image = image.convert('RGBA')
        if image.getchannel('A').getextrema()[1] == 0:
            raise ImageError(f'{name}: fully transparent: there is nothing to see in it')
        background = Image.new('RGBA', image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image if image.mode == 'RGB' else image.convert('RGB')


def _within_budget(image, name, min_size):
    """Check the image's size before decoding: over MAX_PIXELS (once a JPEG is drafted down) raises
    ImageError; `min_size` lets a JPEG be decoded at reduced scale (see open_image)."""
    width, height = image.size
    if width * height > MAX_PIXELS and image.format == 'JPEG':
        scale = 2 ** math.ceil(math.log2((width * height / MAX_PIXELS) ** 0.5))  # draft decodes at 1/2, 1/4 or 1/8
        image.draft('RGB', (max(min_size or 1, -(-width // scale)), max(min_size or 1, -(-height // scale))))
    elif min_size:
        image.draft('RGB', (min_size, min_size))
    if image.size[0] * image.size[1] > MAX_PIXELS:
        raise ImageError(f'{name}: refused: {width}x{height} is over {MAX_PIXELS // 10 ** 6} megapixels')


def open_image(path, min_size=None):
    """Open any image Pillow reads as an upright RGB picture (first frame of an animation).

    `path` may also be an open binary file. With min_size, a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale (much faster), but never below min_size on either side. A missing, empty, broken or
    too-large (over MAX_PIXELS, or a decompression bomb) file, and anything but a regular file (a
    FIFO, a device), raises ImageError before it is decoded.
    """
    name = getattr(path, 'name', path)
    try:
        if isinstance(path, (str, os.PathLike)) and os.path.exists(path) and not os.path.isdir(path) \
                and not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError(f'{name}: not a regular file (a FIFO, socket or device)')
        with warnings.catch_warnings():  # MAX_PIXELS is the budget; Pillow's bomb error (twice its own limit) stays
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                _within_budget(image, name, min_size)
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb(image, name)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f'{name}: no such file') from None
    except IsADirectoryError:
        raise ImageError(f'{name}: is a folder, not an image') from None
    except Image.DecompressionBombError as e:
        raise ImageError(f'{name}: refused as a possible decompression bomb ({e})') from None
    except Image.UnidentifiedImageError:
        empty = os.path.getsize(path) == 0 if isinstance(path, (str, os.PathLike)) else False
        raise ImageError(f'{name}: empty file' if empty else f'{name}: not an image Pillow can read') from None
    except PermissionError:
        raise ImageError(f'{name}: permission denied') from None
    except MemoryError:
        raise ImageError(f'{name}: not enough memory to decode it') from None
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


def eval_transform(image_size, mean, std):
    """PIL image -> normalised tensor (3, size, size): the whole image squared with LANCZOS, as the
    classic sample.py does (torchvision's Resize, ToTensor and Normalize, without importing it)."""
    import torch
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def transform(image):
        pixels = torch.from_numpy(np.asarray(square(image, image_size), dtype=np.uint8).copy())
        return pixels.permute(2, 0, 1).float().div(255).sub(mean).div(std)
    return transform


class ImageFiles:
    """Image files for captioning (a map-style data set for a DataLoader): (index, tensor), or
    (index, ImageError) for an unreadable file."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __getitem__(self, index):
        try:
            return index, self.transform(open_image(self.paths[index]))
        except ImageError as e:
            return index, e

    def __len__(self):
        return len(self.paths)

    @staticmethod
    def collate(batch):
        """(indices, stacked images or None, [(index, error)]) for a batch."""
        import torch
        good = [(i, x) for i, x in batch if not isinstance(x, ImageError)]
        errors = [(i, x) for i, x in batch if isinstance(x, ImageError)]
        images = torch.stack([x for _, x in good]) if good else None
        return [i for i, _ in good], images, errors
