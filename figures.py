"""Pictures of captions: a captioned photo, a contact sheet, and the attention figure.

Matplotlib is imported only here, and only when a figure is drawn.
"""
import os
import textwrap

import numpy as np
from PIL import Image

from images import open_image


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_captioned(image, caption, path):
    """Write the image with its caption as a title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6 * image.height / image.width + 0.6))
    ax.imshow(image)
    ax.set_title(caption, wrap=True)
    ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_contact_sheet(results, path, columns=4):
    """A grid of the images (path, caption), each with its file name and caption below it."""
    plt = _pyplot()
    columns = min(columns, len(results))
    rows = (len(results) + columns - 1) // columns
    fig = plt.figure(figsize=(3.2 * columns, 4.0 * rows))
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3.2, 0.8] * rows, hspace=0.02, wspace=0.05)
    for i, (image_path, caption) in enumerate(results):
        row, column = divmod(i, columns)
        picture, text = fig.add_subplot(grid[2 * row, column]), fig.add_subplot(grid[2 * row + 1, column])
        image = open_image(image_path)
        image.thumbnail((320, 320))
        picture.imshow(image)
        text.text(0.5, 1.0, os.path.basename(image_path), fontsize=8, ha='center', va='top', color='0.35')
        text.text(0.5, 0.78, '\n'.join(textwrap.wrap(caption, 34)), fontsize=9, ha='center', va='top')
        for ax in (picture, text):
            ax.axis('off')
    fig.savefig(path, dpi=90, bbox_inches='tight', pad_inches=0.1)
    plt.close(fig)


def attention_figure(image, words, weights, columns=5):
    """Show, Attend and Tell's figure: the photo, then one panel per word with the attention
    weights of the step that produced it, upsampled smoothly (bicubic) over the photo.

    `weights` is (words, h, w). Returns the matplotlib Figure (len(words) + 1 panels)."""
    plt = _pyplot()
    image = image.copy()
    image.thumbnail((400, 400))
    panels = len(words) + 1
    rows = (panels + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows * image.height / image.width + 0.4),
                             squeeze=False)
    for ax in axes.flat[panels:]:
        fig.delaxes(ax)
    axes = axes.flat
    axes[0].imshow(image)
    axes[0].set_title('the photo', fontsize=11)  # the caption is the panels' titles, read left to right
    for ax, word, weight in zip(axes[1:], words, weights):
        heat = Image.fromarray(np.asarray(weight, dtype=np.float32), 'F').resize(image.size, Image.BICUBIC)
        ax.imshow(image)
        ax.imshow(np.asarray(heat), cmap='inferno', alpha=0.6)
        ax.set_title(word, fontsize=11)
    for ax in fig.axes:
        ax.axis('off')
    fig.tight_layout()
    return fig


def save_attention(image, words, weights, path):
    plt = _pyplot()
    fig = attention_figure(image, words, weights)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training_curve(records, png_path, key, label):
    """Draw the training curve `key` of a training log's records, with the validation loss when there is one."""
    plt = _pyplot()
    steps = [r for r in records if key in r]
    if not steps:
        return
    per_epoch = max(r['step'] for r in steps)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r['epoch'] - 1 + r['step'] / per_epoch for r in steps], [r[key] for r in steps], label='training')
    validation = [r for r in records if 'val_loss' in r]
    if validation and key == 'loss':
        ax.plot([r['epoch'] for r in validation], [r['val_loss'] for r in validation], 'o-', label='validation')
        ax.legend()
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
