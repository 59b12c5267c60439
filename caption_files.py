"""COCO-format caption files: read with pycocotools and checked, or written; and results files.

A caption file is {"images": [{"id", "file_name"}], "annotations": [{"id", "image_id",
"caption"}]}, as MS-COCO's captions_*.json; prepro_flickr8k.py and prepro_karpathy.py write
other data sets in this format so that every script reads them alike. A results file is
[{"image_id", "file_name", "caption"}]: what sample.py and evaluate.py write and evaluate.py reads.
"""
import contextlib
import io
import json
import os
import sys

from files import atomic_write
from errors import InputError


@contextlib.contextmanager
def _reading(path, what):
    """Turn the ways reading a JSON file fails into one InputError naming the file."""
    try:
        yield
    except FileNotFoundError:
        hint = ' (bash download.sh gets COCO\'s; prepro_*.py convert other sets)' if what == 'caption file' else ''
        raise InputError(f'{path}: no such {what}{hint}') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f'{path}: not valid JSON ({e})') from None
    except OSError as e:
        raise InputError(f'{path}: cannot read ({e.strerror})') from None


def read_json(path, what='caption file'):
    """Load a JSON file; a missing, unreadable or malformed one raises InputError."""
    with _reading(path, what), open(path, encoding='utf-8') as f:
        return json.load(f)


def load_coco(path):
    """pycocotools' COCO index of a caption file; its progress lines are dropped (stdout is for
    results), its errors become one InputError."""
    from pycocotools.coco import COCO
    try:
        with _reading(path, 'caption file'), contextlib.redirect_stdout(io.StringIO()):
            return COCO(path)
    except KeyError as e:
        raise InputError(f'{path}: not a COCO caption file (an entry lacks {e})') from None
    except (AssertionError, TypeError, AttributeError):
        raise InputError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)") from None


MAX_CAPTION_WORDS, MAX_CAPTION_CHARS = 1000, 10_000  # far above any real caption (Flickr8k's and COCO's are < 60 words)


def bounded_captions(path, captions):
    """Cut each caption over MAX_CAPTION_WORDS words or MAX_CAPTION_CHARS characters to that limit, with
    one warning line for the file, before anything tokenises or scores them (a 10 MB caption would
    take the tokenizer and METEOR minutes or fail). Returns the list."""
    cut = 0
    for i, caption in enumerate(captions):
        if len(caption) > MAX_CAPTION_CHARS or len(caption.split(None, MAX_CAPTION_WORDS)) > MAX_CAPTION_WORDS:
            captions[i] = ' '.join(caption[:MAX_CAPTION_CHARS].split()[:MAX_CAPTION_WORDS])
            cut += 1
    if cut:
        print(f'warning: {path}: {cut} captions over {MAX_CAPTION_WORDS} words or {MAX_CAPTION_CHARS} characters '
              f'cut to that', file=sys.stderr)
    return captions


def read_captions(path):
    """Read and check a COCO-format caption file.

    Returns (annotations, images): the list of {'image_id', 'caption', ...} dicts in file
    order, and a dict image id -> file name. Anything malformed raises InputError.
    """
    data = load_coco(path).dataset
    if not isinstance(data.get('annotations'), list) or not isinstance(data.get('images'), list):
        raise InputError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    images = {}
    for i, image in enumerate(data['images']):
        if not isinstance(image.get('file_name'), str):
            raise InputError(f"{path}: images[{i}] lacks a 'file_name'")
        name = image['file_name']
        if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
            raise InputError(f'{path}: images[{i}] file_name {name!r} points outside the image folder')
        images[image['id']] = name
    for i, ann in enumerate(data['annotations']):
        if not isinstance(ann.get('caption'), str):
            raise InputError(f"{path}: annotations[{i}] lacks a 'caption' string")
        if ann['image_id'] not in images:
            raise InputError(f"{path}: annotations[{i}] names image_id {ann['image_id']!r}, which is not in 'images'")
    captions = bounded_captions(path, [ann['caption'] for ann in data['annotations']])
    for ann, caption in zip(data['annotations'], captions):
        ann['caption'] = caption
    return data['annotations'], images


def group_captions(pairs):
    """{image: [caption, ...]} of (image, caption) pairs, images and captions in first-seen order."""
    grouped = {}
    for image, caption in pairs:
        grouped.setdefault(image, []).append(caption)
    return grouped


def write_coco(path, names, captions, image_ids):
    """Write images (file names, in order) and their captions ({name: [caption]}) as a caption file."""
    images, annotations = [], []
    for name in names:
        images.append({'id': image_ids[name], 'file_name': name})
        for caption in captions[name]:
            annotations.append({'id': len(annotations) + 1, 'image_id': image_ids[name], 'caption': caption})
    with atomic_write(path, 'w') as f:
        json.dump({'images': images, 'annotations': annotations}, f)
    return len(images), len(annotations)


def coco_image_id(path):
    """COCO's id of a COCO file name (000000000139.jpg, COCO_val2014_000000000042.jpg), else the file name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    digits = stem.rsplit('_', 1)[-1]
    return int(digits) if digits.isdigit() else os.path.basename(path)


def write_results(path, rows):
    """Write a results file of (image_id, file_name, caption) rows."""
    with atomic_write(path, 'w') as f:
        json.dump([{'image_id': i, 'file_name': name, 'caption': c} for i, name, c in rows], f, indent=1)


def read_results(path, images):
    """A results file -> {image_id: caption}, checked against `images` ({image_id: file_name}).

    Each entry names its image by COCO's "image_id", or by "file_name" (as sample.py --output writes
    it: the annotations' file name, or a path ending in it)."""
    results = read_json(path, 'results file')
    if not isinstance(results, list):
        raise InputError(f'{path}: not a COCO results file (a list of {{"image_id" or "file_name", "caption"}})')
    by_name = {name: i for i, name in images.items()}
    predictions = {}
    for i, result in enumerate(results):
        if not isinstance(result, dict) or not isinstance(result.get('caption'), str) or \
                ('image_id' not in result and not isinstance(result.get('file_name'), str)):
            raise InputError(f"{path}: [{i}] lacks an 'image_id' (or 'file_name') or a 'caption' string")
        named = image_named(result['file_name'], by_name) if isinstance(result.get('file_name'), str) else None
        image_id = named if named is not None else result.get('image_id')  # the file name first: it is unambiguous
        if image_id not in images:
            what = f"image_id {image_id!r}" if 'image_id' in result else f"file_name {result['file_name']!r}"
            raise InputError(f'{path}: [{i}] {what} is not in the annotations')
        if image_id in predictions:
            raise InputError(f'{path}: image_id {image_id!r} has more than one caption')
        predictions[image_id] = result['caption']
    return dict(zip(predictions, bounded_captions(path, list(predictions.values()))))


def image_named(path, by_name):
    """The image id whose annotated file name `path` is, or ends in (a folder before it); None if none."""
    parts = path.replace('\\', '/').split('/')
    return next((by_name[name] for name in ('/'.join(parts[k:]) for k in range(len(parts))) if name in by_name), None)
