"""Check that training gives the same checkpoints as an earlier commit of this repo.

Checks out REVISION into a git worktree, then runs the same training commands with each copy's own
scripts, side by side on one machine: cross-entropy steps (lstm from images, attention from a
feature cache with two captions per image) and self-critical steps from each (mean and greedy
baselines), seeded and validated. Every tensor of every checkpoint written (weights, optimizer,
RNG states) must be equal; the script prints each comparison and exits 1 on any difference.

    python bench/same_training.py REVISION     # e.g. HEAD~3, or a tag
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data', 'coco')

# (name, extra train.py flags); {run} stands for the run folder, {cache} for the feature cache
RUNS = [
    ('ce-lstm', ['--label_smoothing', '0.1', '--grad_clip', '1', '--dropout', '0.2', '--num_epochs', '2']),
    ('ce-attention', ['--decoder', 'attention', '--deep_output', '--features', '{cache}', '--captions_per_image', '2',
                      '--dropout', '0.3', '--num_epochs', '2', '--lr_decay_every', '1']),
    ('scst-lstm-mean', ['--scst', '--init_from', '{run}/ce-lstm/decoder-best.ckpt', '--dropout', '0.2',
                        '--samples', '3', '--baseline', 'mean', '--num_epochs', '2', '--learning_rate', '1e-4']),
    ('scst-lstm-greedy', ['--scst', '--init_from', '{run}/ce-lstm/decoder-best.ckpt', '--dropout', '0.2',
                          '--samples', '2', '--baseline', 'greedy', '--num_epochs', '2']),
    ('scst-attention-mean', ['--scst', '--init_from', '{run}/ce-attention/decoder-best.ckpt', '--decoder', 'attention',
                             '--deep_output', '--features', '{cache}', '--dropout', '0.3', '--samples', '3',
                             '--num_epochs', '2']),
    ('scst-attention-greedy', ['--scst', '--init_from', '{run}/ce-attention/decoder-best.ckpt', '--decoder',
                               'attention', '--deep_output', '--features', '{cache}', '--dropout', '0.3',
                               '--baseline', 'greedy', '--samples', '2', '--num_epochs', '2']),
]


def run(repo, *args):
    """Run one of `repo`'s scripts there; stop with its output if it fails."""
    done = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if done.returncode:
        sys.exit(f'{repo}: {" ".join(args[:1])} failed:\n{done.stderr[-3000:]}')


def train_all(repo, work):
    """Resize, vocabulary, feature cache, then every run of RUNS, with `repo`'s scripts into `work`."""
    images, vocab, cache = os.path.join(work, 'images'), os.path.join(work, 'vocab.pkl'), os.path.join(work, 'cache')
    captions = os.path.join(DATA, 'captions.json')
    run(repo, 'resize.py', '--image_dir', os.path.join(DATA, 'images'), '--output_dir', images, '--image_size', '72')
    run(repo, 'build_vocab.py', '--caption_path', captions, '--vocab_path', vocab, '--threshold', '2')
    run(repo, 'extract_features.py', '--image_dir', images, '--caption_path', captions, '--output_dir', cache,
        '--cnn', 'efficientnet-lite0', '--image_size', '64', '--spatial', '--device', 'cpu')
    for name, extra in RUNS:
        flags = [flag.format(run=work, cache=cache) for flag in extra]
        run(repo, 'train.py', '--cnn', 'efficientnet-lite0', '--image_dir', images, '--caption_path', captions,
            '--val_caption_path', captions, '--val_image_dir', images, '--vocab_path', vocab,
            '--model_path', os.path.join(work, name), '--crop_size', '64', '--embed_size', '32',
            '--hidden_size', '48', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu', '--seed', '5',
            '--log_step', '1', *flags)
        print(f'{repo}: {name} trained', flush=True)


def tensors(obj, prefix=''):
    """{path: tensor} of every tensor in a nested checkpoint."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(tensors(value, f'{prefix}/{key}'))
    return found


def compare(old_work, new_work):
    """Compare every checkpoint of the runs; returns the number that differ."""
    differ = 0
    for name, _ in RUNS:
        files = sorted(f for f in os.listdir(os.path.join(old_work, name)) if f.endswith('.ckpt'))
        if files != sorted(f for f in os.listdir(os.path.join(new_work, name)) if f.endswith('.ckpt')):
            print(f'{name}: other checkpoint files were written')
            differ += 1
            continue
        for file in files:
            old, new = (tensors(torch.load(os.path.join(w, name, file), weights_only=True))
                        for w in (old_work, new_work))
            unequal = [k for k in old if k not in new or not torch.equal(old[k], new[k])] + \
                      [k for k in new if k not in old]
            print(f'{name}/{file}: {len(old)} tensors, ' + (f'DIFFERENT: {unequal[:5]}' if unequal else 'all equal'))
            differ += bool(unequal)
    return differ


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('revision', help='the earlier commit to compare with')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old_repo = os.path.join(tmp, 'old')
        subprocess.run(['git', 'worktree', 'add', '--detach', old_repo, args.revision], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for repo, work in ((old_repo, os.path.join(tmp, 'old-runs')), (ROOT, os.path.join(tmp, 'new-runs'))):
                train_all(repo, work)
            differ = compare(os.path.join(tmp, 'old-runs'), os.path.join(tmp, 'new-runs'))
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', old_repo], cwd=ROOT, capture_output=True)
    print('all checkpoints equal' if not differ else f'{differ} checkpoints differ')
    return 1 if differ else 0


if __name__ == '__main__':
    sys.exit(main())
