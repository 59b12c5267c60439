"""Caption images with a trained model.

One image: stdout carries its caption alone. Several (files, folders or globs): one
`path<TAB>caption` line each, computed in batches. Without model flags it uses the classic
published model if its files are at their classic paths, else the model shipped in
models/flickr8k/. Nothing is downloaded, and files are loaded safely (weights and words only).
"""
import argparse
import json
import sys

from captioner import Captioner, add_model_args
from errors import InputError
from images import ImageError, find_images, open_image


def save_captioned(image, caption, path):
    """Write the image with its caption as a title."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 6 * image.height / image.width + 0.6))
    ax.imshow(image)
    ax.set_title(caption, wrap=True)
    ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_contact_sheet(results, path, columns=4):
    """A grid of the images, each with its caption in its own space below it."""
    import textwrap

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = (len(results) + columns - 1) // columns
    fig = plt.figure(figsize=(3.2 * columns, 4.3 * rows))
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3.2, 1.1] * rows, hspace=0.05, wspace=0.08)
    for i, (image_path, caption) in enumerate(results):
        row, column = divmod(i, columns)
        picture, text = fig.add_subplot(grid[2 * row, column]), fig.add_subplot(grid[2 * row + 1, column])
        image = open_image(image_path)
        image.thumbnail((320, 320))
        picture.imshow(image)
        text.text(0.5, 1.0, '\n'.join(textwrap.wrap(caption, 34)), fontsize=9, ha='center', va='top')
        for ax in (picture, text):
            ax.axis('off')
    fig.savefig(path, dpi=90, bbox_inches='tight')
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image', nargs='+', required=True, help='image files, folders or globs to caption')
    add_model_args(parser)
    parser.add_argument('--save', metavar='FILE.png', help='one image: also write it with its caption')
    parser.add_argument('--output', metavar='results.json', help='write [{"file_name", "caption"}] here')
    parser.add_argument('--sheet', metavar='FILE.png', help='draw a contact sheet of the images and captions')
    args = parser.parse_args(argv)
    try:
        paths = find_images(args.image)
        image = open_image(paths[0]) if len(paths) == 1 else None  # a bad single image fails before loading
        captioner = Captioner.from_args(args)
    except InputError as e:
        sys.exit(f'error: {e}')

    if image is not None:
        results = [(paths[0], captioner.caption(image))]
        print(results[0][1], flush=True)
    else:
        results = []
        for path, caption in captioner.caption_files(paths, args.batch_size, args.num_workers):
            if isinstance(caption, ImageError):
                print(f'warning: skipped {caption}', file=sys.stderr)
                continue
            results.append((path, caption))
            print(f'{path}\t{caption}', flush=True)
    if args.output:
        with open(args.output, 'w') as f:
            json.dump([{'file_name': p, 'caption': c} for p, c in results], f, indent=1)
    if args.save and image is not None:
        save_captioned(image, results[0][1], args.save)
    if args.sheet and results:
        save_contact_sheet(results, args.sheet)
    if len(results) < len(paths):
        sys.exit(f'error: {len(paths) - len(results)} of {len(paths)} images could not be read')


if __name__ == '__main__':
    main()
