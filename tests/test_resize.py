import os

import numpy as np
import pytest
from PIL import Image

import resize
from conftest import run_script
from odd_images import write_broken_images, write_odd_images
from resize import ImageError, open_image


def test_open_image_turns_any_mode_into_upright_rgb(tmp_path):
    for name, size in write_odd_images(tmp_path).items():
        image = open_image(str(tmp_path / name))
        assert image.mode == 'RGB' and image.size == size, name


def test_transparency_goes_over_white_and_16_bit_is_scaled(tmp_path):
    write_odd_images(tmp_path)
    rgba = np.asarray(open_image(str(tmp_path / 'rgba.png')))
    assert (rgba[:, 0::2] == 255).all()  # fully transparent columns become white
    grey8 = np.asarray(open_image(str(tmp_path / 'grey.png'))).astype(int)
    grey16 = np.asarray(open_image(str(tmp_path / 'grey16.png'))).astype(int)
    assert np.abs(grey8 - grey16).max() <= 1  # not clipped to white
    for name in ('float.tif', 'float01.tif'):  # not black, not white
        assert np.abs(np.asarray(open_image(str(tmp_path / name))).astype(int) - grey8).max() <= 1, name
    stretched = np.asarray(open_image(str(tmp_path / 'int32_wide_range.tif')))[..., 0].astype(float)
    assert stretched.min() == 0 and stretched.max() == 255  # an unusual range is stretched to 8 bits
    assert np.corrcoef(stretched.ravel(), grey8[..., 0].ravel())[0, 1] > 0.999
    gif = np.asarray(open_image(str(tmp_path / 'animated.gif')))
    assert tuple(gif[0, 0]) == (255, 0, 0)  # the first frame


def test_broken_images_raise_one_clear_error(tmp_path):
    for name, problem in write_broken_images(tmp_path).items():
        with pytest.raises(ImageError) as error:
            open_image(str(tmp_path / name))
        message = str(error.value)
        assert message.startswith(str(tmp_path / name)) and problem in message and '\n' not in message
    with pytest.raises(ImageError, match='no such file'):
        open_image(str(tmp_path / 'absent.jpg'))
    with pytest.raises(ImageError, match='is a folder'):
        open_image(str(tmp_path))


def test_resize_folder_tree_skips_broken_and_existing(tmp_path, capsys):
    src, out = tmp_path / 'src', tmp_path / 'out'
    (src / 'train2014').mkdir(parents=True)
    (src / 'val2014').mkdir()
    odd = write_odd_images(src / 'train2014')
    broken = write_broken_images(src / 'val2014')
    Image.new('RGB', (640, 480), 'green').save(src / 'val2014' / 'photo.jpg')
    resize.main(['--image_dir', str(src), '--output_dir', str(out), '--image_size', '32', '--num_workers', '2'])
    captured = capsys.readouterr()
    good = [f'train2014/{n}' for n in odd] + ['val2014/photo.jpg']
    for name in good:
        with Image.open(out / name) as image:
            assert image.size == (32, 32) and image.mode == 'RGB', name
    for name in broken:
        assert not (out / 'val2014' / name).exists()
        assert f'warning: skipped {src / "val2014" / name}' in captured.err
    assert f'Resized {len(good)} images' in captured.out and f'{len(broken)} unreadable' in captured.out
    assert not [f for _, _, files in os.walk(out) for f in files if f.endswith('.tmp')]
    with Image.open(out / 'val2014' / 'photo.jpg') as image:
        assert image.format == 'JPEG'

    stamp = os.path.getmtime(out / 'val2014' / 'photo.jpg')
    os.remove(out / 'train2014' / 'tiny.png')
    resize.main(['--image_dir', str(src), '--output_dir', str(out), '--image_size', '32', '--num_workers', '1'])
    assert 'Resized 1 images' in capsys.readouterr().out
    assert os.path.getmtime(out / 'val2014' / 'photo.jpg') == stamp


def test_resize_uses_lanczos_like_the_classic_recipe(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    image.save(tmp_path / 'a.png')
    resize.resize_images(str(tmp_path), str(tmp_path / 'out'), 256, num_workers=1)
    expected = np.asarray(image.resize((256, 256), Image.LANCZOS))
    assert (np.asarray(Image.open(tmp_path / 'out' / 'a.png')) == expected).all()


def test_missing_image_dir_is_one_line_error(tmp_path):
    result = run_script('resize.py', '--image_dir', str(tmp_path / 'nope'), '--output_dir', str(tmp_path / 'o'))
    assert result.returncode != 0 and result.stderr.strip() == f'error: {tmp_path / "nope"}: no such folder ' \
        "(bash download.sh gets COCO's images, or name yours with --image_dir)"
