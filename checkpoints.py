"""Checkpoint files: atomic writes, safe loads, and the layout of a model's two files.

A model is two files, as in the classic tutorial: the encoder's and the decoder's. Each file
written here is a dict of plain data and tensors (it loads with weights_only=True):
`format`, `config` (the architecture, model.ModelConfig), `decoding` (decoding.Decoding),
`model` (the state_dict) and `pair`, an id that both files of one write share, so that an
encoder and a decoder that were not written together are refused; a decoder file records
`vocab_sha`, the digest of the vocabulary it was trained with, and a training checkpoint's
decoder file also holds `train_state`. The classic published files are plain state_dicts;
they are read with sizes given by flags.
"""
import glob
import hashlib
import math
import io
import os
import re
import uuid
from dataclasses import asdict, dataclass, replace

import torch

from decoding import Decoding
from errors import InputError, check_format
from files import atomic_files, atomic_write
from model import ModelConfig

FORMAT = 2  # files of this repo's earlier layouts have no 'format' and are no longer read


def checkpoint_bytes(obj):
    """torch.save's bytes of `obj` (made in memory, so that a full disk is a plain OSError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(obj, path):
    data = checkpoint_bytes(obj)
    with atomic_write(path) as f:
        f.write(data)


def _refusal(error):
    """The reason torch.load gave, first and alone: never its advice to load the file unsafely."""
    text = str(error).strip()
    if 'Weights only load failed' not in text:
        return f"not a loadable checkpoint ({text.splitlines()[0] if text else type(error).__name__})"
    reasons = [line.strip() for line in text.splitlines() if line.strip() and 'weights_only' not in line
               and 'Weights only load failed' not in line and 'documentation of torch.load' not in line]
    reason = (reasons[0].removeprefix('WeightsUnpickler error: ').split('. Please')[0] if reasons
              else 'unreadable').rstrip('.')
    if 'GLOBAL' not in reason:  # not a pickle of torch's at all
        return f'not a loadable checkpoint ({reason})'
    return f'refused: it holds Python code or objects, not only tensors and plain data ({reason})'


def load_checkpoint(path):
    """Load a checkpoint on the CPU with weights_only=True: tensors and plain data, never code."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise InputError(f'{path}: no such checkpoint') from None
    except Exception as e:  # noqa: BLE001 -- any failure here means the file is not a usable checkpoint
        raise InputError(f'{path}: {_refusal(e)}') from None


def vocab_digest(vocab):
    """A digest of a vocabulary's words in id order: recorded in decoder files, checked on loading."""
    words = '\n'.join(vocab.idx2word[i] for i in range(len(vocab)))
    return hashlib.sha256(words.encode('utf-8')).hexdigest()


def model_files(path):
    """The (encoder, decoder) files of the model named by either of them: encoder-X / decoder-X,
    or an exported model's encoder.ckpt / decoder.ckpt."""
    folder, name = os.path.split(path)
    if name in ('encoder.ckpt', 'decoder.ckpt'):
        return os.path.join(folder, 'encoder.ckpt'), os.path.join(folder, 'decoder.ckpt')
    suffix = name.split('-', 1)[1] if '-' in name else name
    return os.path.join(folder, 'encoder-' + suffix), os.path.join(folder, 'decoder-' + suffix)


def checkpoint_files(folder, name):
    """The (encoder, decoder) files of training checkpoint `name` in `folder`."""
    return os.path.join(folder, f'encoder-{name}.ckpt'), os.path.join(folder, f'decoder-{name}.ckpt')


def step_checkpoints(folder, tag=''):
    """The decoder files of a run's step checkpoints (`decoder-{tag}{epoch}-{step}.ckpt`), oldest first."""
    pattern = re.compile('decoder-' + re.escape(tag) + r'(\d+)-(\d+)\.ckpt')
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), 'decoder-*.ckpt')):
        match = pattern.fullmatch(os.path.basename(path))
        if match:
            found.append((int(match[1]), int(match[2]), path))
    return [path for _, _, path in sorted(found)]


def write_model(encoder_path, decoder_path, config, decoding, encoder_state, decoder_state, train_state=None,
                vocab_sha=None, extra_files=None):
    """Write a model's two files as one unit: both are complete before either replaces its old
    file, and both carry one new `pair` id, so an encoder and a decoder of different writes (a kill
    between the renames) are refused on loading. The decoder records `vocab_sha` (vocab_digest of
    its vocabulary); `extra_files` ({path: bytes}, an exported model's vocab.pkl) join the unit."""
    common = {'format': FORMAT, 'config': asdict(config), 'decoding': asdict(decoding), 'pair': uuid.uuid4().hex}
    extra = {'train_state': train_state} if train_state is not None else {}
    if vocab_sha is not None:
        extra['vocab_sha'] = vocab_sha
    contents = {**(extra_files or {}), encoder_path: checkpoint_bytes({**common, 'model': encoder_state}),
                decoder_path: checkpoint_bytes({**common, 'model': decoder_state, **extra})}
    with atomic_files(list(contents)) as files:
        for f, data in zip(files, contents.values()):
            f.write(data)


def _checked_state(path, state):
    """A state_dict of tensors, all finite; else InputError naming the file."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f'{path}: not a captioning checkpoint (its weights are not a dict of tensors)')
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f'{path}: {key} holds NaN or infinite weights (a diverged or damaged model)')
    return dict(state)


def _check_sizes(path, config, state):
    """Refuse a decoder whose recorded sizes are not those of its weights (before anything is built)."""
    embed, output = state.get('embed.weight'), state.get('linear.weight')
    recorded = (config.vocab_size, config.embed_size, config.hidden_size)
    if embed is None or output is None or embed.dim() != 2 or output.dim() != 2:
        raise InputError(f'{path}: no decoder weights (embed.weight, linear.weight) in it')
    found = (embed.shape[0], embed.shape[1], output.shape[1])
    if recorded != found:
        raise InputError(f'{path}: its config records vocab_size, embed_size, hidden_size {recorded}, '
                         f'but its weights have {found}')


@dataclass
class SavedModel:
    """What a model's two files hold."""
    config: ModelConfig  # the architecture
    decoding: Decoding  # the decoding settings recorded (default ones for the classic files)
    encoder_state: dict
    decoder_state: dict
    decoder_file: dict  # the decoder file as loaded: its vocab_sha and train_state, when it has them


def read_model(encoder_path, decoder_path, classic_config=None):
    """The SavedModel of a model's two files.

    Plain state_dicts (the classic published files) get `classic_config` and default decoding;
    without one they are refused (a train.py checkpoint is needed). Everything recorded is checked
    first: a pair not written together, a config or decoding out of range or unlike the weights,
    NaN weights each raise InputError.
    """
    files = [(path, load_checkpoint(path)) for path in (encoder_path, decoder_path)]
    for path, obj in files:
        if not isinstance(obj, dict) or not obj:
            raise InputError(f'{path}: not a captioning checkpoint (no weights in it)')
    (_, enc), (_, dec) = files
    if 'format' not in dec and 'model' not in dec:  # a plain state_dict: the classic layout
        if classic_config is None:
            raise InputError(f'{decoder_path}: a plain state_dict, not a train.py checkpoint')
        encoder_state = {('backbone.' + k[len('resnet.'):] if k.startswith('resnet.') else k): v for k, v in enc.items()}
        return SavedModel(classic_config, Decoding(), _checked_state(encoder_path, encoder_state),
                          _checked_state(decoder_path, dec), dec)
    for path, obj in files:
        check_format(path, obj.get('format'), FORMAT)
    if enc.get('pair') != dec.get('pair'):
        raise InputError(f'{encoder_path} and {decoder_path}: not written together (an interrupted write, or '
                         f'files of two models): write the model again, or name the right pair')
    try:
        config, decoding = ModelConfig(**dec['config']), Decoding(**dec['decoding'])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f'{decoder_path}: its recorded config or decoding is invalid ({e})') from None
    encoder_state = _checked_state(encoder_path, enc.get('model'))
    decoder_state = _checked_state(decoder_path, dec.get('model'))
    _check_sizes(decoder_path, config, decoder_state)
    return SavedModel(config, decoding, encoder_state, decoder_state, dec)


def check_vocab(decoder_file, decoder_path, vocab, vocab_path):
    """Refuse a vocabulary other than the one the decoder was trained with (by size, and by the
    digest that files written since it was recorded hold)."""
    embed = decoder_file.get('model', decoder_file).get('embed.weight')
    words = embed.shape[0] if embed is not None else len(vocab)
    if words != len(vocab):
        raise InputError(f'{decoder_path}: trained with a vocabulary of {words} words, but '
                         f'{vocab_path} has {len(vocab)}: probably the wrong vocab.pkl')
    if 'vocab_sha' in decoder_file and decoder_file['vocab_sha'] != vocab_digest(vocab):
        raise InputError(f'{decoder_path}: trained with another vocabulary than {vocab_path} '
                         f'(same size, other words): probably the wrong vocab.pkl')


def extend_vocabulary(saved, path, old_vocab, old_vocab_path, vocab):
    """The SavedModel of `path` with its decoder grown from `old_vocab` (checked against the file) to
    `vocab`, which must begin with old_vocab's words in order. Each new word's embedding and output
    row start as <unk>'s (what the model said for such a word until now), its output bias lowered by
    log(number of new words), so that together they take <unk>'s probability; old words keep their weights."""
    check_vocab(saved.decoder_file, path, old_vocab, old_vocab_path)
    old = [old_vocab.idx2word[i] for i in range(len(old_vocab))]
    if [vocab.idx2word[i] for i in range(min(len(old), len(vocab)))] != old:
        raise InputError(f'{old_vocab_path}: the vocabulary does not begin with its words (build it with build_vocab.py '
                         f'--extend {old_vocab_path})')
    added, unk = len(vocab) - len(old), old_vocab('<unk>')
    state = dict(saved.decoder_state)
    for key in ('embed.weight', 'linear.weight', 'linear.bias'):
        rows = state[key][unk].expand(added, *state[key].shape[1:]).clone()
        if key == 'linear.bias':
            rows -= math.log(max(added, 1))
        state[key] = torch.cat((state[key], rows))
    config = replace(saved.config, vocab_size=len(vocab))
    return replace(saved, config=config, decoder_state=state, decoder_file={**saved.decoder_file, 'vocab_sha': None})


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
