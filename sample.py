"""Caption images with a trained model.

One image: stdout carries its caption alone. Several (files, folders or globs): one
`path<TAB>caption` line each, computed in batches. Without model flags it uses the classic
published model if its files are at their classic paths, else the model shipped in
models/flickr8k/. Nothing is downloaded, and files are loaded safely (weights and words only).
"""
import os
import sys

from tqdm import tqdm

from caption_files import coco_image_id, write_results
from captioner import Captioner, add_model_args
from errors import InputError, script_parser
from figures import save_attention, save_captioned, save_contact_sheet
from images import ImageError, find_images, open_image


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--image', nargs='+', required=True, help='image files, folders or globs to caption')
    add_model_args(parser)
    parser.add_argument('--save', metavar='FILE.png', help='one image: also write it with its caption')
    parser.add_argument('--output', metavar='results.json', help='write [{"image_id", "file_name", "caption"}] here '
                        '(evaluate.py --results reads it; image_id: the number in a COCO file name, else the name)')
    parser.add_argument('--sheet', metavar='FILE.png', help='draw a contact sheet of the images and captions')
    parser.add_argument('--attention', metavar='FIG.png|DIR', help='attention decoder: draw where the model looked '
                        'for each word into FIG.png; with several images give a folder (DIR), which gets one '
                        'figure per image')
    args = parser.parse_args(argv)
    try:
        paths = find_images(args.image)
        if args.attention and len(paths) > 1 and os.path.splitext(args.attention)[1].lower() in ('.png', '.jpg', '.pdf'):
            raise InputError(f'--attention {args.attention}: {len(paths)} images need a folder, which gets one figure '
                             f'each (e.g. --attention figures/)')
        image = open_image(paths[0]) if len(paths) == 1 else None  # a bad single image fails before loading
        captioner = Captioner.from_args(args)
    except InputError as e:
        sys.exit(f'error: {e}')
    if args.attention and not captioner.has_attention:
        print(f'error: --attention: this model has no attention (its decoder is {captioner.config.decoder!r}; '
              f'train with --decoder attention)', file=sys.stderr)
        sys.exit(2)

    if args.attention:
        results = caption_with_attention(captioner, paths, image, args.attention)
    elif image is not None:
        results = [(paths[0], captioner.caption(image))]
        print(results[0][1], flush=True)
    else:
        results = []
        for path, caption in captioner.caption_files(paths, args.batch_size, args.num_workers):
            if isinstance(caption, ImageError):
                tqdm.write(f'warning: skipped {caption}', file=sys.stderr)  # on a line of its own, not the bar's
                continue
            results.append((path, caption))
            tqdm.write(f'{path}\t{caption}', file=sys.stdout)
            sys.stdout.flush()
    if args.output:
        try:
            write_results(args.output, [(coco_image_id(p), p, c) for p, c in results])
        except InputError as e:  # a full disk: said in one line, an earlier file there unchanged
            sys.exit(f'error: {e}')
    if args.save and image is not None:
        save_captioned(image, results[0][1], args.save)
    if args.sheet and results:
        save_contact_sheet(results, args.sheet)
    if len(results) < len(paths):
        sys.exit(f'error: {len(paths) - len(results)} of {len(paths)} images could not be read')


def caption_with_attention(captioner, paths, image, target):
    """Caption each image and draw its attention figure: `target` itself for one image, else
    `target`/NAME.png for each. Returns [(path, caption)] of the images that could be read."""
    results = []
    if image is None:
        os.makedirs(target, exist_ok=True)
    for path in paths:
        try:
            picture = image if image is not None else open_image(path)
        except ImageError as e:
            print(f'warning: skipped {e}', file=sys.stderr)
            continue
        attended = captioner.attend(picture)
        figure = target if image is not None else os.path.join(target, os.path.splitext(os.path.basename(path))[0] + '.png')
        save_attention(picture, attended.caption.split(), attended.weights, figure)
        results.append((path, attended.caption))
        print(attended.caption if image is not None else f'{path}\t{attended.caption}', flush=True)
    return results


if __name__ == '__main__':
    main()
