"""COCO-format captions as a PyTorch data set: one sample per caption."""
import os
import sys

import torch
import torch.utils.data as data
from torchvision import transforms

from build_vocab import read_captions, tokenize
from resize import ImageError, open_image


class CocoDataset(data.Dataset):
    """(image, caption word ids) pairs for every caption whose image file is present.

    An image that turns out to be unreadable yields None (reported once), so that
    one bad file among thousands never stops training; collate_fn drops it.
    """

    def __init__(self, root, json, vocab, transform=None):
        annotations, images = read_captions(json)
        present = {image_id: os.path.join(root, name) for image_id, name in images.items()
                   if os.path.isfile(os.path.join(root, name))}
        self.samples = [(present[ann['image_id']], ann['caption']) for ann in annotations
                        if ann['image_id'] in present]
        dropped = len(annotations) - len(self.samples)
        if dropped:
            print(f'warning: {json}: {dropped} of {len(annotations)} captions dropped, their '
                  f'{len(images) - len(present)} images are not in {root}', file=sys.stderr)
        self.vocab, self.transform = vocab, transform
        self.reported = set()

    def __getitem__(self, index):
        path, caption = self.samples[index]
        try:
            image = open_image(path)
        except ImageError as e:
            if path not in self.reported:
                self.reported.add(path)
                print(f'warning: skipping {e}', file=sys.stderr)
            return None
        if self.transform is not None:
            image = self.transform(image)
        words = [self.vocab('<start>')] + [self.vocab(w) for w in tokenize(caption)] + [self.vocab('<end>')]
        return image, torch.tensor(words, dtype=torch.long)

    def __len__(self):
        return len(self.samples)


def collate_fn(batch):
    """Drop unreadable samples, sort by caption length (longest first), pad with 0 (<pad>).

    Returns images (B, 3, H, W), targets (B, longest) and the caption lengths, or None
    when no sample of the batch could be read.
    """
    batch = sorted((s for s in batch if s is not None), key=lambda s: len(s[1]), reverse=True)
    if not batch:
        return None
    images, captions = zip(*batch)
    lengths = [len(c) for c in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for i, caption in enumerate(captions):
        targets[i, :len(caption)] = caption
    return torch.stack(images, 0), targets, lengths


class EpochSampler(data.Sampler):
    """A shuffle that is a function of (seed, epoch), so a resumed run sees the same order.

    Set `epoch` before each pass; `start` skips the epoch's first samples (already trained on).
    """

    def __init__(self, dataset, seed):
        self.size, self.seed, self.epoch, self.start = len(dataset), seed, 1, 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.start:].tolist())

    def __len__(self):
        return self.size - self.start


def get_loader(root, json, vocab, transform, batch_size, shuffle, num_workers, seed=None):
    """A DataLoader over CocoDataset yielding (images, targets, lengths) batches.

    With shuffle and a seed, the order comes from an EpochSampler (loader.sampler), and the
    loader's own seeds from a private generator, so that starting an epoch does not draw from
    the global RNG (which the augmentation uses, and a resumed run restores).
    """
    dataset = CocoDataset(root=root, json=json, vocab=vocab, transform=transform)
    sampler = EpochSampler(dataset, seed) if shuffle and seed is not None else None
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return data.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                           sampler=sampler, generator=generator, num_workers=num_workers, collate_fn=collate_fn,
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
