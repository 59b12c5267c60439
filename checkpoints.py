"""Checkpoint files: atomic writes, safe loads, and the layout of a model's two files.

A model is two files, as in the classic tutorial: the encoder's and the decoder's. Each file
written here is a dict of plain data and tensors (it loads with weights_only=True):
`format`, `config` (the architecture, model.ModelConfig), `decoding` (model.Decoding) and
`model` (the state_dict); a training checkpoint's decoder file also holds `train_state`.
The classic published files are plain state_dicts; they are read with sizes given by flags.
"""
import contextlib
import os

from errors import InputError

FORMAT = 2  # files of this repo's earlier layouts have no 'format' and are no longer read


@contextlib.contextmanager
def atomic_write(path, mode='wb', durable=True):
    """Write through a temporary file in the same folder, then rename it to `path`.

    A crash or an exception leaves the previous file (or none), never half a file; with
    `durable` the data is on disk (fsync) before the rename.
    """
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp')
    try:
        with open(tmp, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(obj, path):
    import torch
    with atomic_write(path) as f:
        torch.save(obj, f)


def load_checkpoint(path):
    """Load a checkpoint on the CPU with weights_only=True: tensors and plain data, never code."""
    import torch
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise InputError(f'{path}: no such checkpoint') from None
    except Exception as e:  # noqa: BLE001 -- any failure here means the file is not a usable checkpoint
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f'{path}: not a loadable checkpoint ({reason})') from None


def model_files(path):
    """The (encoder, decoder) files of the model named by either of them: encoder-X / decoder-X,
    or an exported model's encoder.ckpt / decoder.ckpt."""
    folder, name = os.path.split(path)
    if name in ('encoder.ckpt', 'decoder.ckpt'):
        return os.path.join(folder, 'encoder.ckpt'), os.path.join(folder, 'decoder.ckpt')
    suffix = name.split('-', 1)[1] if '-' in name else name
    return os.path.join(folder, 'encoder-' + suffix), os.path.join(folder, 'decoder-' + suffix)


def write_model(encoder_path, decoder_path, config, decoding, encoder_state, decoder_state, train_state=None):
    """Write a model's two files (the decoder last: a pair whose decoder exists is complete)."""
    from dataclasses import asdict
    common = {'format': FORMAT, 'config': asdict(config), 'decoding': asdict(decoding)}
    save_checkpoint({**common, 'model': encoder_state}, encoder_path)
    extra = {'train_state': train_state} if train_state is not None else {}
    save_checkpoint({**common, 'model': decoder_state, **extra}, decoder_path)


def read_model(encoder_path, decoder_path, classic_config):
    """(config, decoding, encoder state, decoder state, decoder file) of a model's two files.

    Plain state_dicts (the classic published files) get `classic_config` and default decoding.
    """
    from model import Decoding, ModelConfig
    files = [(path, load_checkpoint(path)) for path in (encoder_path, decoder_path)]
    for path, obj in files:
        if not isinstance(obj, dict) or not obj:
            raise InputError(f'{path}: not a captioning checkpoint (no weights in it)')
    (_, enc), (_, dec) = files
    if 'format' not in dec and 'model' not in dec:  # a plain state_dict: the classic layout
        encoder_state = {('backbone.' + k[len('resnet.'):] if k.startswith('resnet.') else k): v for k, v in enc.items()}
        return classic_config, Decoding(), encoder_state, dict(dec), dec
    for path, obj in files:
        if obj.get('format') != FORMAT:
            raise InputError(f'{path}: written by an earlier version of this repo; its format is no longer read')
    try:
        config, decoding = ModelConfig(**dec['config']), Decoding(**dec['decoding'])
    except (KeyError, TypeError) as e:
        raise InputError(f'{decoder_path}: its config does not describe a model ({e})') from None
    return config, decoding, dict(enc['model']), dict(dec['model']), dec


def average_states(states):
    """Each floating-point tensor's mean over `states` (checkpoint averaging), in float32; other
    tensors from the last. All must hold the same tensors."""
    return {key: sum(state[key].float() for state in states) / len(states) if value.is_floating_point()
            else value for key, value in states[-1].items()}


def blend_states(first, second, weight):
    """Each floating-point tensor as (1 - weight) * first + weight * second, in float32; other
    tensors (BatchNorm's batch count) from `second`. Both must hold the same tensors."""
    return {key: ((1 - weight) * first[key].float() + weight * value.float()) if value.is_floating_point()
            else value for key, value in second.items()}


def load_weights(module, state, path, skip_prefix=None):
    """Load `state` into `module`, with one clear error for any missing, extra or mis-shaped tensor.

    Keys under `skip_prefix` (a backbone whose weights come from its package) may be absent.
    """
    import torch
    expected = module.state_dict()
    for key in expected:  # BatchNorm buffers that PyTorch < 0.4.1 did not save
        if key.endswith('num_batches_tracked') and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state and not (skip_prefix and k.startswith(skip_prefix))]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise InputError(f'{path}: does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})')
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise InputError(f'{path}: {key} has shape {tuple(value.shape)} but the model has '
                             f'{tuple(expected[key].shape)} (check the size flags or --cnn)')
    module.load_state_dict(state, strict=False)
