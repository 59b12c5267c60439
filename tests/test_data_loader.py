import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from vocabulary import load_vocab, tokenize
from conftest import TEST_DATA
from data_loader import CocoDataset, EpochSampler, collate, train_transform, training_loader
from images import eval_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the classic recipe normalises with


def test_dataset_drops_captions_of_absent_images_with_one_warning(coco_sample, tmp_path, capsys):
    partial = tmp_path / 'images'
    shutil.copytree(coco_sample['images'], partial)
    names = sorted(os.listdir(partial))
    for name in names[:3]:
        os.remove(partial / name)
    vocab = load_vocab(coco_sample['vocab'])
    dataset = CocoDataset(str(partial), coco_sample['captions'], vocab)
    captions = json.load(open(coco_sample['captions']))
    absent_ids = {im['id'] for im in captions['images'] if im['file_name'] in names[:3]}
    kept = [a for a in captions['annotations'] if a['image_id'] not in absent_ids]
    assert len(dataset) == len(kept) < len(captions['annotations'])
    err = capsys.readouterr().err
    assert err.count('warning') == 1
    assert f'{len(captions["annotations"]) - len(kept)} of {len(captions["annotations"])} captions dropped' in err
    assert 'their 3 images are not in' in err


def test_samples_are_images_and_word_ids(coco_sample):
    vocab = load_vocab(coco_sample['vocab'])
    dataset = CocoDataset(coco_sample['images'], coco_sample['captions'], vocab,
                          train_transform(56, IMAGENET_MEAN, IMAGENET_STD))
    image, (caption,), image_id = dataset[0]
    assert image.shape == (3, 56, 56) and caption.dtype == torch.long
    first = json.load(open(coco_sample['captions']))['annotations'][0]
    assert image_id == first['image_id']
    first = first['caption']
    assert caption.tolist() == [1] + [vocab(w) for w in tokenize(first)] + [2]


def test_collate_sorts_pads_and_drops_unreadable():
    images = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    batch = [(images[0], [torch.tensor([1, 5, 2])], 10), None, (images[1], [torch.tensor([1, 5, 6, 7, 2])], 11),
             (images[2], [torch.tensor([1, 2])], 12)]
    found = collate(batch)
    assert found.lengths == [5, 3, 2]
    assert found.captions.tolist() == [[1, 5, 6, 7, 2], [1, 5, 2, 0, 0], [1, 2, 0, 0, 0]]
    assert found.inputs[:, 0, 0, 0].tolist() == [1.0, 0.0, 2.0] and found.image_ids == [11, 10, 12]
    assert found.owners.tolist() == [0, 1, 2]  # each input row is its own caption's
    assert collate([None, None]) is None


def test_corrupt_image_is_skipped_and_reported_once(coco_sample, tmp_path, capsys):
    shutil.copytree(coco_sample['images'], tmp_path / 'images')
    victim = sorted(os.listdir(tmp_path / 'images'))[0]
    (tmp_path / 'images' / victim).write_bytes(b'\xff\xd8 broken jpeg')
    vocab = load_vocab(coco_sample['vocab'])
    dataset = CocoDataset(str(tmp_path / 'images'), coco_sample['captions'], vocab,
                          train_transform(56, IMAGENET_MEAN, IMAGENET_STD))
    loader = training_loader(dataset, batch_size=64, seed=0, num_workers=0)
    for _ in range(2):
        batch = next(iter(loader))
        assert len(batch.lengths) == len(loader.dataset) - 5  # one image, five captions
    assert capsys.readouterr().err.count(victim) == 1


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    dataset = list(range(10))
    a, b = EpochSampler(dataset, seed=1), EpochSampler(dataset, seed=1)
    assert list(a) == list(b) and sorted(a) == dataset
    b.epoch = 2
    assert list(a) != list(b)
    a.epoch, a.start = 2, 4
    assert list(a) == list(b)[4:] and len(a) == 6


def test_eval_transform_is_the_classic_lanczos_square():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    tensor = eval_transform(224, IMAGENET_MEAN, IMAGENET_STD)(image)
    expected = np.asarray(image.resize([224, 224], Image.LANCZOS), dtype=np.float32) / 255
    expected = (expected - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(tensor.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_test_data_is_real_coco():
    captions = json.load(open(os.path.join(TEST_DATA, 'captions.json')))
    assert len(captions['images']) == 12 and len(captions['annotations']) >= 60
    sizes = [Image.open(os.path.join(TEST_DATA, 'images', im['file_name'])).size for im in captions['images']]
    assert max(max(s) for s in sizes) == 320


def test_a_crop_larger_than_the_resized_image_is_never_padded():
    """EfficientNet-Lite2 crops 260 px; from a 256 px image that would need black padding."""
    image = Image.fromarray(np.full((256, 256, 3), 200, dtype=np.uint8))
    for _ in range(5):
        crop = train_transform(260, (0, 0, 0), (1, 1, 1))(image)
        assert crop.shape == (3, 260, 260) and crop.min() > 0.7  # no black (0) border
