"""Writers of unusual but valid images, and of broken ones, for the image-handling tests."""
import struct
import zlib

import numpy as np
from PIL import Image


def _gradient(size=(40, 30)):
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return np.stack([x, x[::-1, ::-1], np.full_like(x, 90)], -1)


def write_odd_images(folder):
    """Write valid images in many modes and formats; returns {name: expected (width, height) once upright}."""
    rgb = Image.fromarray(_gradient())
    expected = {}

    def save(name, image, size=None, **kw):
        image.save(folder / name, **kw)
        expected[name] = size or image.size

    save('grey.png', rgb.convert('L'))
    rgba = rgb.convert('RGBA')
    rgba.putalpha(Image.fromarray(np.tile(np.array([0, 255], np.uint8), (30, 20))))
    save('rgba.png', rgba)
    palette = rgb.convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    save('palette_transparent.png', palette, transparency=0)
    save('cmyk.jpg', rgb.convert('CMYK'))
    save('grey16.png', Image.fromarray((np.asarray(rgb.convert('L'), np.uint16) * 257)))
    frames = [Image.new('RGB', (20, 10), c) for c in ('red', 'blue', 'green')]
    frames[0].save(folder / 'animated.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected['animated.gif'] = (20, 10)
    save('photo.webp', rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    save('exif_rotated.jpg', rgb, size=(30, 40), exif=exif)
    save('tiny.png', Image.new('RGB', (1, 1), 'white'))
    save('very_wide.png', Image.new('RGB', (2000, 2), 'red'))
    save('very_tall.jpg', Image.new('RGB', (3, 900), 'blue'))
    save('bilevel.bmp', rgb.convert('1'))
    save('la.png', rgb.convert('LA'))
    save('float.tif', Image.fromarray(np.asarray(rgb.convert('L'), np.float32)))
    save('float01.tif', Image.fromarray(np.asarray(rgb.convert('L'), np.float32) / 255))
    save('int32_wide_range.tif', Image.fromarray(np.asarray(rgb.convert('L'), np.int32) * 40 - 9000))
    return expected


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def write_bomb_png(path, side=50000):
    """A few hundred bytes claiming side x side pixels: Pillow must refuse it as a decompression bomb."""
    header = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header)
                     + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + _png_chunk(b'IEND', b''))


def write_broken_images(folder):
    """Files that are not usable images; returns {name: the problem the error must mention}."""
    (folder / 'empty.jpg').write_bytes(b'')
    (folder / 'text.jpg').write_text('this is not an image\n')
    buffer = folder / 'truncated.jpg'
    Image.fromarray(_gradient((200, 200))).save(buffer, quality=90)
    data = buffer.read_bytes()
    buffer.write_bytes(data[:len(data) // 3])
    write_bomb_png(folder / 'bomb.png')
    return {'empty.jpg': 'empty file', 'text.jpg': 'not an image', 'truncated.jpg': 'broken image',
            'bomb.png': 'decompression bomb'}
