"""COCO-format captions as PyTorch data sets: from image files, or from cached backbone features.

A caption data set holds `samples`, one (input key, caption, image id) per caption; the key
is an image path (CocoDataset) or a row of the feature cache (FeatureDataset), and
`load_input(key)` turns it into the encoder's input. Unreadable images yield None,
which the collate functions drop, so one bad file never stops a long run. Every loader here
gives Batch objects, whichever the data set and whatever the training objective.
"""
import functools
import json
import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.utils.data as data
from tqdm import tqdm

from caption_files import group_captions, read_captions
from errors import InputError, check_format
from images import ImageError, open_image, square

CACHE_FORMAT = 2  # caches of this repo's earlier layouts are no longer read


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

    cached = False  # whether inputs are cached backbone features rather than images

    def word_ids(self, caption):
        return torch.tensor(self.vocab.encode(caption), dtype=torch.long)

    def captions_by_image(self):
        """{image id: [caption, ...]}, in file order."""
        return group_captions((image_id, caption) for _, caption, image_id in self.samples)

    def __getitem__(self, index):
        key, caption, image_id = self.samples[index]
        inputs = self.load_input(key)
        return None if inputs is None else (inputs, [self.word_ids(caption)], image_id)

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
                tqdm.write(f'warning: skipping {e}', file=sys.stderr)  # on a line of its own, not the bar's
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
    check_format(path, index.get('format') if isinstance(index, dict) else None, CACHE_FORMAT)
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

    cached = True

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
        keys = {image_id: key for key, _, image_id in dataset.samples}
        self.groups = [(keys[image_id], captions, image_id) for image_id, captions in dataset.captions_by_image().items()]

    def __getitem__(self, index):
        key, captions, image_id = self.groups[index]
        inputs = self.dataset.load_input(key)
        if inputs is None:
            return None
        order = torch.randperm(len(captions)).tolist()
        chosen = [captions[order[i % len(captions)]] for i in range(self.k)]
        return inputs, [self.dataset.word_ids(c) for c in chosen], image_id

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
        inputs = self.dataset.load_input(key)
        return None if inputs is None else (inputs, [], image_id)

    def __len__(self):
        return len(self.items)


@dataclass
class Batch:
    """A batch of images (or their cached features) and, for teacher forcing, their captions."""
    inputs: torch.Tensor  # (B, 3, H, W) images, or cached backbone features, one row per image
    image_ids: list  # the image of each row
    captions: torch.Tensor = None  # (N, longest) word ids, padded with 0 (<pad>), longest first; None: no captions
    lengths: list = None  # the length of each caption
    owners: torch.Tensor = None  # the input row of each caption

    def to(self, device):
        return self.map_tensors(lambda t: t.to(device))

    def pin_memory(self):  # DataLoader(pin_memory=True) calls it
        return self.map_tensors(lambda t: t.pin_memory())

    def map_tensors(self, change):
        """This batch with `change` applied to each of its tensors."""
        apply = lambda t: None if t is None else change(t)
        return replace(self, inputs=apply(self.inputs), captions=apply(self.captions), owners=apply(self.owners))


def collate(samples):
    """A Batch of (inputs, [word ids of its captions], image id) samples, unreadable ones (None)
    dropped; None when none is left. Captions are sorted by length, longest first, and padded;
    `owners` says which input each belongs to. Samples of one caption each are themselves sorted
    so, and each input row is then its caption's (as the classic collate_fn)."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    if all(len(captions) == 1 for _, captions, _ in samples):
        samples.sort(key=lambda s: len(s[1][0]), reverse=True)
    inputs = torch.stack([inputs for inputs, _, _ in samples])
    image_ids = [image_id for _, _, image_id in samples]
    pairs = sorted(((caption, owner) for owner, (_, captions, _) in enumerate(samples) for caption in captions),
                   key=lambda p: len(p[0]), reverse=True)
    if not pairs:  # images alone
        return Batch(inputs, image_ids)
    lengths = [len(caption) for caption, _ in pairs]
    captions = torch.zeros(len(pairs), max(lengths), dtype=torch.long)
    for i, (caption, _) in enumerate(pairs):
        captions[i, :len(caption)] = caption
    owners = torch.tensor([owner for _, owner in pairs])
    return Batch(inputs, image_ids, captions, lengths, owners)


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


def image_batches(dataset, limit=None, batch_size=64, num_workers=0):
    """Batches of the distinct images of a caption data set (the first `limit`), in order: for
    captioning a validation split."""
    return data.DataLoader(ImageSet(dataset, limit), batch_size=batch_size, num_workers=num_workers,
                           collate_fn=collate)


def caption_batches(dataset, batch_size=64, num_workers=0):
    """Batches of every caption of a data set with its image, in order: for the validation loss."""
    return data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def training_loader(dataset, batch_size, seed, num_workers, per_image=1, images_only=False, num_replicas=1, rank=0):
    """A shuffling DataLoader of Batches: of images with one caption each, of images with `per_image`
    captions each, or of images alone (`images_only`). Its order comes from an EpochSampler
    (loader.sampler) and its workers' seeds from a private generator, so that starting an epoch does
    not draw from the global RNG (which the augmentation uses, and a resumed run restores)."""
    if images_only:
        dataset = ImageSet(dataset)
    elif per_image > 1:
        dataset = GroupedDataset(dataset, per_image)
    return data.DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(dataset, seed, num_replicas, rank),
                           generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                           collate_fn=collate, persistent_workers=num_workers > 0,
                           pin_memory=torch.cuda.is_available())
