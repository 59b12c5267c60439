"""COCO-format captions as PyTorch data sets: from image files, or from cached backbone features.

A caption data set holds `samples`, one (input key, caption, image id) per caption; the key
is an image path (CocoDataset) or a row of the feature cache (FeatureDataset), and
`load_input(key)` turns it into the encoder's input. Unreadable images yield None,
which the collate functions drop, so one bad file never stops a long run.
"""
import functools
import json
import os
import sys

import numpy as np
import torch
import torch.utils.data as data

from build_vocab import tokenize
from captions import read_captions
from errors import InputError
from images import ImageError, open_image, square

CACHE_FORMAT = 2  # caches of this repo's earlier layouts are no longer read


def eval_transform(image_size, mean, std):
    """PIL image -> normalised tensor (3, size, size): the whole image squared with LANCZOS, as the
    classic sample.py does (torchvision's Resize, ToTensor and Normalize, without importing it)."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def transform(image):
        pixels = torch.from_numpy(np.asarray(square(image, image_size), dtype=np.uint8).copy())
        return pixels.permute(2, 0, 1).float().div(255).sub(mean).div(std)
    return transform


def at_least(size, image):
    """The image, or squared to `size` when a side is smaller (so a crop never needs black padding,
    and a thin image never grows to a square of its long side)."""
    return image if min(image.size) >= size else square(image, size)


def train_transform(crop_size, mean, std):
    """The classic augmentation: a random crop of the resized image and a random mirror."""
    from torchvision import transforms
    return transforms.Compose([
        functools.partial(at_least, crop_size),
        transforms.RandomCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])


class CaptionDataset(data.Dataset):
    """What both data sets share: caption word ids, and dropping captions whose image is absent."""

    def __init__(self, caption_path, vocab, where):
        annotations, images = read_captions(caption_path)
        available = self.available(images)  # image id -> input key
        self.samples = [(available[a['image_id']], a['caption'], a['image_id']) for a in annotations
                        if a['image_id'] in available]
        dropped = len(annotations) - len(self.samples)
        if dropped:
            print(f'warning: {caption_path}: {dropped} of {len(annotations)} captions dropped, their '
                  f'{len(images) - len(available)} images are not in {where}', file=sys.stderr)
        self.vocab = vocab

    def word_ids(self, caption):
        return torch.tensor([self.vocab('<start>')] + [self.vocab(w) for w in tokenize(caption)]
                            + [self.vocab('<end>')], dtype=torch.long)

    def __getitem__(self, index):
        key, caption, _ = self.samples[index]
        inputs = self.load_input(key)
        return None if inputs is None else (inputs, self.word_ids(caption))

    def __len__(self):
        return len(self.samples)


class CocoDataset(CaptionDataset):
    """(image, caption word ids) for every caption whose image file is present (one sample per caption)."""

    def __init__(self, root, caption_path, vocab, transform=None):
        self.root, self.transform, self.reported = root, transform, set()
        super().__init__(caption_path, vocab, root)

    def available(self, images):
        paths = {image_id: os.path.join(self.root, name) for image_id, name in images.items()}
        return {image_id: path for image_id, path in paths.items() if os.path.isfile(path)}

    def load_input(self, path):
        """The transformed image, or None (reported once) when it cannot be read."""
        try:
            image = open_image(path)
        except ImageError as e:
            if path not in self.reported:
                self.reported.add(path)
                print(f'warning: skipping {e}', file=sys.stderr)
            return None
        return self.transform(image) if self.transform is not None else image


def read_feature_index(folder, cnn=None, spatial=None):
    """The index of a complete feature cache written by extract_features.py, checked against the
    backbone `cnn` and (for the attention decoder) `spatial` when they are given."""
    path = os.path.join(folder, 'index.json')
    if not os.path.exists(path):
        hint = ' (extraction did not finish: run extract_features.py again to complete it)' \
            if os.path.exists(path + '.partial') else ''
        raise InputError(f'{folder}: no complete feature cache{hint}')
    try:
        with open(path) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f'{path}: damaged (not valid JSON); delete the cache folder and run extract_features.py '
                         f'again') from None
    if not isinstance(index, dict) or index.get('format') != CACHE_FORMAT:
        raise InputError(f'{path}: written by an earlier version of this repo; its format is no longer read')
    if cnn is not None and index['cnn'] != cnn:
        raise InputError(f'{folder}: cached with --cnn {index["cnn"]}, not {cnn}')
    if spatial is not None and index['spatial'] != spatial:
        kind = 'attention' if spatial else 'lstm'
        raise InputError(f'{folder}: --decoder {kind} needs a cache built ' +
                         ('with' if spatial else 'without') + ' extract_features.py --spatial')
    return index


class FeatureDataset(CaptionDataset):
    """(cached backbone features, caption word ids) for every caption whose image is cached.

    With `flip`, each sample uses the horizontally flipped image's features half of the time
    (when the cache holds them): the feature-space version of the classic random mirror.
    """

    def __init__(self, folder, caption_path, vocab, flip=False, cnn=None, spatial=None):
        self.index = read_feature_index(folder, cnn, spatial)
        super().__init__(caption_path, vocab, folder)
        self.features = self.open_rows(os.path.join(folder, 'features.npy'))
        flipped = os.path.join(folder, 'features_flip.npy')
        self.flipped = self.open_rows(flipped) if flip and os.path.exists(flipped) else None

    def open_rows(self, path):
        """The cached array, memory-mapped, with one row per file of the index; InputError if it is not."""
        try:
            rows = np.load(path, mmap_mode='r')
        except (OSError, ValueError) as e:
            raise InputError(f'{path}: missing or damaged ({e}); delete the cache folder and run '
                             f'extract_features.py again') from None
        if rows.shape[0] != len(self.index['files']):
            raise InputError(f'{path}: {rows.shape[0]} rows for {len(self.index["files"])} files; delete the cache '
                             f'folder and run extract_features.py again')
        return rows

    def available(self, images):
        rows = {name: row for row, name in enumerate(self.index['files']) if name not in self.index['broken']}
        return {image_id: rows[name] for image_id, name in images.items() if name in rows}

    def load_input(self, row):
        source = self.features
        if self.flipped is not None and torch.rand(()) < 0.5:
            source = self.flipped
        return torch.from_numpy(source[row].astype(np.float32))


class GroupedDataset(data.Dataset):
    """One sample per image with `k` of its captions, so one backbone forward serves k captions.

    Like neuraltalk2's seq_per_img: an image with more than k captions gets a random k of
    them each time, one with fewer repeats them.
    """

    def __init__(self, dataset, k):
        self.dataset, self.k = dataset, k
        groups = {}
        for key, caption, _ in dataset.samples:
            groups.setdefault(key, []).append(caption)
        self.groups = list(groups.items())

    def __getitem__(self, index):
        key, captions = self.groups[index]
        inputs = self.dataset.load_input(key)
        if inputs is None:
            return None
        order = torch.randperm(len(captions)).tolist()
        chosen = [captions[order[i % len(captions)]] for i in range(self.k)]
        return inputs, [self.dataset.word_ids(c) for c in chosen]

    def __len__(self):
        return len(self.groups)


class ImageSet(data.Dataset):
    """The distinct images of a caption data set (the first `limit`), as (image id, encoder input or
    None): for captioning a validation split, and for self-critical training."""

    def __init__(self, dataset, limit=None):
        seen = {}
        for key, _, image_id in dataset.samples:
            if key not in seen and (limit is None or len(seen) < limit):
                seen[key] = image_id
        self.dataset, self.items = dataset, list(seen.items())

    def __getitem__(self, index):
        key, image_id = self.items[index]
        return image_id, self.dataset.load_input(key)

    def __len__(self):
        return len(self.items)

    @staticmethod
    def collate(batch):
        """(image ids, stacked inputs), unreadable images dropped; None when none is left."""
        batch = [(i, x) for i, x in batch if x is not None]
        return ([i for i, _ in batch], torch.stack([x for _, x in batch])) if batch else None


class ImageFiles(data.Dataset):
    """Image files for captioning: (index, tensor), or (index, ImageError) for an unreadable file."""

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
        good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
        errors = [(i, x) for i, x in batch if not isinstance(x, torch.Tensor)]
        images = torch.stack([x for _, x in good]) if good else None
        return [i for i, _ in good], images, errors


def _pad(captions):
    lengths = [len(c) for c in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for i, caption in enumerate(captions):
        targets[i, :len(caption)] = caption
    return targets, lengths


def collate_fn(batch):
    """Drop unreadable samples, sort by caption length (longest first), pad with 0 (<pad>).

    Returns images (B, 3, H, W) (or features), targets (B, longest) and the caption lengths,
    or None when no sample of the batch could be read.
    """
    batch = sorted((s for s in batch if s is not None), key=lambda s: len(s[1]), reverse=True)
    if not batch:
        return None
    inputs, captions = zip(*batch)
    return (torch.stack(inputs, 0), *_pad(captions))


def collate_grouped(batch):
    """Like collate_fn for GroupedDataset: inputs (one per image), targets, lengths, and
    `owners`, the input row of each caption."""
    batch = [s for s in batch if s is not None]
    if not batch:
        return None
    pairs = sorted(((caption, owner) for owner, (_, captions) in enumerate(batch) for caption in captions),
                   key=lambda p: len(p[0]), reverse=True)
    targets, lengths = _pad([c for c, _ in pairs])
    return torch.stack([inputs for inputs, _ in batch]), targets, lengths, torch.tensor([o for _, o in pairs])


class EpochSampler(data.DistributedSampler):
    """DistributedSampler (one process by default) that can start an epoch part-way through.

    The shuffle is a function of (seed, epoch), so a resumed run sees the same order; `start`
    skips this process's first samples of the epoch (those already trained on).
    """

    def __init__(self, dataset, seed, num_replicas=1, rank=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return super().__len__() - self.start


def training_loader(dataset, batch_size, seed, num_workers, collate, num_replicas=1, rank=0):
    """A shuffling DataLoader whose order comes from an EpochSampler (loader.sampler), and whose
    workers' seeds from a private generator, so that starting an epoch does not draw from the
    global RNG (which the augmentation uses, and a resumed run restores)."""
    return data.DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(dataset, seed, num_replicas, rank),
                           generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                           collate_fn=collate, persistent_workers=num_workers > 0,
                           pin_memory=torch.cuda.is_available())
