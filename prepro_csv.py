"""Convert your own captioned photos to this repo's caption files, with train / dev / test splits.

The captions come as a CSV file (a header row, then one row per caption; quoted commas and
newlines as CSV allows) or a JSON Lines file (one {"file": ..., "caption": ...} object per line),
UTF-8 with or without a BOM. A photo may have several rows. The columns are found by name: `file`
or `image` for the photo's path inside --image_dir, `caption`, and optionally `split` (train, dev
or test; val counts as dev); the flags name other columns. Without a split column, the photos are
split at random with --seed: --dev and --test photos (a count, or a fraction of the photos), the
rest for training; a photo is never in two splits.

Every bad row is reported with the line its record starts on, and left out: a missing or
unreadable photo, an empty caption, an absolute or `..` path, the same (file, caption) twice, a
split other than train/dev/test or unlike the photo's other rows. Writes captions_train.json,
captions_dev.json and captions_test.json (COCO format) into --output_dir.

    python prepro_csv.py --captions photos.csv --image_dir photos/ --output_dir data/mine
"""
import csv
import json
import os
import random
import sys

from tqdm import tqdm

from caption_files import group_captions, write_coco
from errors import InputError, integer, number, script_parser
from images import IMAGE_EXTENSIONS, ImageError, open_image

SPLITS = {'train': 'train', 'dev': 'dev', 'val': 'dev', 'test': 'test'}
SHOWN = 50  # bad rows listed one by one; the rest are counted


def read_records(path, file_column, caption_column, split_column):
    """[(line, {column: value})] of a CSV or JSON Lines file, `line` being where each record starts."""
    try:
        with open(path, encoding='utf-8-sig', newline='') as f:
            if path.lower().endswith(('.jsonl', '.ndjson')):
                return [(number, json_record(line)) for number, line in enumerate(f, 1) if line.strip()]
            return csv_records(path, f, file_column, caption_column, split_column)
    except FileNotFoundError:
        raise InputError(f'{path}: no such file') from None
    except UnicodeDecodeError as e:
        raise InputError(f'{path}: not UTF-8 text ({e})') from None
    except csv.Error as e:
        raise InputError(f'{path}: not a readable CSV file ({e})') from None


def json_record(line):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return {'error': f'not valid JSON ({e.msg})'}
    return record if isinstance(record, dict) else {'error': 'not a JSON object'}


def csv_records(path, f, file_column, caption_column, split_column):
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise InputError(f'{path}: empty file')
    header = [name.strip() for name in header]
    records, start = [], reader.line_num + 1
    for row in reader:
        if any(cell.strip() for cell in row):
            records.append((start, dict(zip(header, row)) if len(row) <= len(header) else
                            {'error': f'{len(row)} fields for {len(header)} columns'}))
        start = reader.line_num + 1
    return records


def pick_column(path, records, asked, choices, required=True):
    """The column to read: the one asked, else the first of `choices` the records have."""
    seen = {key for _, record in records for key in record if key != 'error'}
    for name in ([asked] if asked else choices):
        if name in seen:
            return name
    if required and records:
        wanted = " or ".join(repr(c) for c in ([asked] if asked else choices))
        if any(key.lower().endswith(IMAGE_EXTENSIONS) for key in seen):  # the first row names a photo: no header
            raise InputError(f'{path}: no header row (its first line names a photo): add the line "file,caption" '
                             f'above the first row')
        raise InputError(f'{path}: no column {wanted} (columns: {", ".join(sorted(seen)) or "none"}); rename the '
                         f'column in the header, or name it with --file_column / --caption_column')
    return None


def check_row(record, columns, image_dir, seen, readable):
    """(file, caption, split) of a good record, else the problem as a string."""
    if 'error' in record:
        return record['error']
    name = str(record.get(columns[0]) or '').strip()
    caption = ' '.join(str(record.get(columns[1]) or '').split())
    split = str(record.get(columns[2]) or '').strip().lower() if columns[2] else ''
    if not name:
        return 'no photo named'
    if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
        return f'{name}: an absolute or ".." path (name photos inside --image_dir)'
    if not caption:
        return f'{name}: empty caption'
    if split and split not in SPLITS:
        return f'{name}: split {split!r} is not train, dev or test'
    if (name, caption) in seen:
        return f'{name}: the same caption again (first on line {seen[(name, caption)]})'
    if name not in readable:
        try:
            open_image(os.path.join(image_dir, name))
            readable[name] = None
        except ImageError as e:
            readable[name] = str(e)
    if readable[name] is not None:
        return readable[name]
    return name, caption, SPLITS.get(split)


def assign_splits(names, given, dev, test, seed):
    """{photo: split}: from the split column when the file has one, else at random (seeded)."""
    if any(given.values()):
        return {name: given[name] or 'train' for name in names}
    order = sorted(names)
    random.Random(seed).shuffle(order)
    sizes = [round(size * len(order)) if size < 1 else int(size) for size in (dev, test)]
    if sum(sizes) >= len(order):
        raise InputError(f'--dev {dev} and --test {test} leave no photo of {len(order)} for training')
    return {name: 'dev' if i < sizes[0] else 'test' if i < sum(sizes) else 'train' for i, name in enumerate(order)}


def convert(args):
    """Read, check and split the rows; write the caption files; returns (kept rows, photos, bad rows)."""
    records = read_records(args.captions, args.file_column, args.caption_column, args.split_column)
    columns = (pick_column(args.captions, records, args.file_column, ('file', 'image', 'file_name')),
               pick_column(args.captions, records, args.caption_column, ('caption',)),
               pick_column(args.captions, records, args.split_column, ('split',), required=False))
    kept, bad, seen, readable, given = [], [], {}, {}, {}
    for line, record in tqdm(records, desc='checking rows', unit='row', file=sys.stderr):
        found = check_row(record, columns, args.image_dir, seen, readable)
        if isinstance(found, tuple) and found[0] in given and found[2] != given[found[0]]:
            found = f'{found[0]}: split {found[2]} unlike its earlier rows ({given[found[0]]})'
        if isinstance(found, str):
            bad.append(f'{args.captions}:{line}: {found}')
            continue
        seen[found[:2]] = line
        given.setdefault(found[0], found[2])
        kept.append(found)
    if not kept:
        raise InputError(f'{args.captions}: no usable row ({len(bad)} bad)' + (f'; the first: {bad[0]}' if bad else ''))
    captions = group_captions((name, caption) for name, caption, _ in kept)
    splits = assign_splits(list(captions), given, args.dev, args.test, args.seed)
    ids = {name: i for i, name in enumerate(sorted(captions), 1)}
    os.makedirs(args.output_dir, exist_ok=True)
    for split in ('train', 'dev', 'test'):
        names = [name for name in captions if splits[name] == split]
        photos, rows = write_coco(os.path.join(args.output_dir, f'captions_{split}.json'), names, captions, ids)
        print(f'{split}: {photos} photos, {rows} captions')
    return len(kept), len(captions), bad


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--captions', required=True, help='the CSV (.csv) or JSON Lines (.jsonl) file of captions')
    parser.add_argument('--image_dir', required=True, help='the folder the photo paths are relative to')
    parser.add_argument('--output_dir', default='data/mine', help='where to write captions_{train,dev,test}.json')
    parser.add_argument('--file_column', help="the photo's column (default: file, image or file_name)")
    parser.add_argument('--caption_column', help='the caption\'s column (default: caption)')
    parser.add_argument('--split_column', help='a column of train/dev/test (default: split, when there is one)')
    parser.add_argument('--dev', type=number(0, 10 ** 9), default=0.1,
                        help='photos for the dev split: a count, or a fraction below 1 (without a split column)')
    parser.add_argument('--test', type=number(0, 10 ** 9), default=0.1, help='photos for the test split, likewise')
    parser.add_argument('--seed', type=integer(0, 2 ** 32 - 1), default=0, help='seeds the random split')
    args = parser.parse_args(argv)
    try:
        rows, photos, bad = convert(args)
    except InputError as e:
        sys.exit(f'error: {e}')
    except OSError as e:  # --output_dir not a folder, not writable
        sys.exit(f'error: {e.filename or args.output_dir}: {e.strerror}')
    for line in bad[:SHOWN]:
        print(f'skipped {line}', file=sys.stderr)
    if len(bad) > SHOWN:
        print(f'... and {len(bad) - SHOWN} more bad rows', file=sys.stderr)
    print(f'kept {rows} rows of {photos} photos; left out {len(bad)} bad rows')
    return 0


if __name__ == '__main__':
    sys.exit(main())
