"""What a training run needs to stop at any moment and carry on exactly: its state, the RNG
states, the stop request (Ctrl-C, SIGTERM), and its log; and never to overwrite an earlier run."""
import contextlib
import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from checkpoints import checkpoint_files, model_files, step_checkpoints
from errors import InputError


@dataclass
class RunState:
    """Where training stands; saved in every checkpoint so that a resumed run carries on exactly."""
    epoch: int = 1
    step: int = 0  # batches done in this epoch
    window: list = field(default_factory=list)  # losses since the last log line
    skipped: int = 0  # samples of this epoch that could not be read
    seconds: float = 0.0
    best_cider: float = None
    totals: dict = field(default_factory=dict)  # the objective's running totals for this epoch

    @classmethod
    def saved(cls, run):
        """The RunState a checkpoint recorded (those written before `totals` kept them at the top level)."""
        run = dict(run)
        totals = {k: run.pop(k) for k in ('sampled', 'reward', 'holes') if k in run}
        return cls(**{'totals': totals, **run})


def start_afresh(model_path, tag, log_path, overwrite=False):
    """Start a new run's log in `model_path`, refusing to overwrite an earlier run of the same kind
    (checkpoints tagged `tag`) unless `overwrite`, which removes its checkpoints and log."""
    earlier = step_checkpoints(model_path, tag)
    best = [path for path in checkpoint_files(model_path, tag + 'best') if os.path.exists(path)]
    logged = os.path.exists(log_path) and os.path.getsize(log_path) > 0
    if (earlier or best or logged) and not overwrite:
        kind = 'self-critical' if tag else 'cross-entropy'
        raise InputError(f'{model_path}: holds an earlier {kind} run ({len(earlier)} checkpoints'
                         f'{", a best model" if best else ""}{", a log" if logged else ""}): continue it with '
                         f'--resume latest, start over with --overwrite, or choose another --model_path')
    for path in best + [file for decoder in earlier for file in model_files(decoder)]:
        if os.path.exists(path):
            os.remove(path)
    open(log_path, 'w').close()


def truncate_log(path, position):
    """Drop the log lines written after (epoch, step) `position`: those of steps a resumed run repeats."""
    kept = [r for r in read_log(path) if (r['epoch'], r['step']) <= position]
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)


def read_log(path):
    """The records of a JSONL log; a line cut short by a crash is ignored."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


class StopRequest:
    """While active, SIGINT and SIGTERM ask training to save and stop after the current step."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = [signal.signal(signum, self.handle) for signum in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for signum, handler in zip(self.SIGNALS, self.previous):
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data loader worker: the main process does the saving
            return
        self.signum = signum
        tqdm.write(f'{signal.Signals(signum).name}: saving a checkpoint after this step', file=sys.stderr)


def rng_state():
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
