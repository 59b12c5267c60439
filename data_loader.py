"""COCO-format captions as PyTorch data sets: from image files, or from cached backbone features.

A data set holds `samples`, one (input key, caption, image id) per caption; the key
is an image path (CocoDataset) or a row of the feature cache (FeatureDataset), and
`load_input(key)` turns it into the encoder's input. Unreadable images yield None,
which the collate functions drop, so one bad file never stops a long run.
"""
import json as jsonlib
import os
import sys

import numpy as np
import torch
import torch.utils.data as data
from torchvision import transforms

from build_vocab import read_captions, tokenize
from resize import ImageError, open_image


class CaptionDataset(data.Dataset):
    """What both data sets share: caption word ids, and dropping captions whose image is absent."""

    def __init__(self, json, vocab, available, where):
        """`available` maps the image ids that can be read to their input keys."""
        annotations, images = read_captions(json)
        self.samples = [(available[a['image_id']], a['caption'], a['image_id']) for a in annotations
                        if a['image_id'] in available]
        dropped = len(annotations) - len(self.samples)
        if dropped:
            print(f'warning: {json}: {dropped} of {len(annotations)} captions dropped, their '
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

    def __init__(self, root, json, vocab, transform=None):
        _, images = read_captions(json)
        present = {image_id: os.path.join(root, name) for image_id, name in images.items()
                   if os.path.isfile(os.path.join(root, name))}
        super().__init__(json, vocab, present, root)
        self.transform = transform
        self.reported = set()

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


class FeatureCacheError(ValueError):
    """A feature cache that is missing, incomplete, or built for another model."""


def read_feature_index(folder):
    """The index of a complete feature cache written by extract_features.py."""
    path = os.path.join(folder, 'index.json')
    if not os.path.exists(path):
        hint = ' (extraction did not finish: run extract_features.py again to complete it)' \
            if os.path.exists(path + '.partial') else ''
        raise FeatureCacheError(f'{folder}: no complete feature cache{hint}')
    with open(path) as f:
        return jsonlib.load(f)


class FeatureDataset(CaptionDataset):
    """(cached pooled backbone feature, caption word ids) for every caption whose image is cached.

    With `flip`, each sample uses the horizontally flipped image's features half of the time
    (when the cache holds them): the feature-space version of the classic random mirror.
    """

    def __init__(self, folder, json, vocab, flip=False):
        self.index = read_feature_index(folder)
        rows = {name: row for row, name in enumerate(self.index['files']) if name not in self.index['broken']}
        _, images = read_captions(json)
        super().__init__(json, vocab, {i: rows[name] for i, name in images.items() if name in rows}, folder)
        self.features = np.load(os.path.join(folder, 'features.npy'), mmap_mode='r')
        flipped = os.path.join(folder, 'features_flip.npy')
        self.flipped = np.load(flipped, mmap_mode='r') if flip and os.path.exists(flipped) else None

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


def get_loader(root, json, vocab, transform, batch_size, shuffle, num_workers, seed=None, dataset=None,
               num_replicas=1, rank=0):
    """A DataLoader yielding (images, targets, lengths) batches over CocoDataset (or `dataset`).

    With shuffle and a seed, the order comes from an EpochSampler (loader.sampler), and the
    loader's own seeds from a private generator, so that starting an epoch does not draw from
    the global RNG (which the augmentation uses, and a resumed run restores).
    """
    dataset = dataset or CocoDataset(root=root, json=json, vocab=vocab, transform=transform)
    sampler = EpochSampler(dataset, seed, num_replicas, rank) if shuffle and seed is not None else None
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    collate = collate_grouped if isinstance(dataset, GroupedDataset) else collate_fn
    return data.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                           sampler=sampler, generator=generator, num_workers=num_workers, collate_fn=collate,
                           persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def train_transform(crop_size, mean, std):
    """The classic augmentation: a random crop of the 256x256 image and a random mirror."""
    return transforms.Compose([
        transforms.RandomCrop(crop_size, pad_if_needed=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])


def eval_transform(image_size, mean, std):
    """The whole image squared to image_size with LANCZOS, as the classic sample.py does."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), transforms.InterpolationMode.LANCZOS),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])


class ImageListDataset(data.Dataset):
    """Image files for captioning: (index, tensor), or (index, error message) for an unreadable file."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __getitem__(self, index):
        try:
            return index, self.transform(open_image(self.paths[index]))
        except ImageError as e:
            return index, str(e)

    def __len__(self):
        return len(self.paths)

    @staticmethod
    def collate(batch):
        """(indices, stacked images or None, [(index, error)]) for a batch."""
        good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
        errors = [(i, x) for i, x in batch if not isinstance(x, torch.Tensor)]
        images = torch.stack([x for _, x in good]) if good else None
        return [i for i, _ in good], images, errors


class FirstImages(data.Dataset):
    """The first `limit` distinct images of a caption data set, as (image id, encoder input or None)."""

    def __init__(self, dataset, limit):
        seen = {}
        for key, _, image_id in dataset.samples:
            if key not in seen and len(seen) < limit:
                seen[key] = image_id
        self.dataset, self.items = dataset, list(seen.items())

    def __getitem__(self, index):
        key, image_id = self.items[index]
        return image_id, self.dataset.load_input(key)

    def __len__(self):
        return len(self.items)

    @staticmethod
    def collate(batch):
        batch = [(i, x) for i, x in batch if x is not None]
        return [i for i, _ in batch], torch.stack([x for _, x in batch]) if batch else None
