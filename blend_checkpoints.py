"""Blend two checkpoints of one model: every weight (1 - w) * first + w * second.

Self-critical training moves the cross-entropy model towards captions that score well but say
less; a model part of the way between the two can score better on dev than either (weight-space
interpolation, as in WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot models", 2022).
train_flickr8k.sh scores such blends on dev beside the two models themselves.

  python blend_checkpoints.py --first models/decoder-best.ckpt --second models/decoder-scst-best.ckpt \\
      --weight 0.85 --output models/decoder-blend85.ckpt

Each path names a model by either of its two files; both files of the blend are written, with
the second model's decoding settings and no training state.
"""
import argparse
import sys

from checkpoints import blend_states, model_files, read_model, write_model
from errors import InputError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--first', required=True, help='a model file (weight 0)')
    parser.add_argument('--second', required=True, help='a model file of the same architecture (weight 1)')
    parser.add_argument('--weight', type=float, required=True, help="the second model's share, 0 to 1")
    parser.add_argument('--output', required=True, help='encoder-NAME.ckpt or decoder-NAME.ckpt: both are written')
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.weight <= 1:
            raise InputError(f'--weight {args.weight}: must be between 0 and 1')
        first, second = (read_model(*model_files(path), None) for path in (args.first, args.second))
        for path, model in ((args.first, first), (args.second, second)):
            if model[0] is None:
                raise InputError(f'{path}: a plain state_dict, not a train.py checkpoint')
        if first[0] != second[0]:
            raise InputError(f'{args.second}: a different model from {args.first} ({second[0]} against {first[0]})')
        for part, path in ((2, 'encoder'), (3, 'decoder')):
            if first[part].keys() != second[part].keys():
                raise InputError(f'{args.second}: its {path} holds other tensors than that of {args.first}')
        outputs = model_files(args.output)
        if set(outputs) & set(model_files(args.first) + model_files(args.second)):
            raise InputError(f'{args.output}: would overwrite one of the models blended')
        config, decoding = second[:2]
        write_model(*outputs, config, decoding, blend_states(first[2], second[2], args.weight),
                    blend_states(first[3], second[3], args.weight))
    except InputError as e:
        sys.exit(f'error: {e}')
    print(f'wrote {outputs[0]} and {outputs[1]}: {1 - args.weight:g} x {args.first} + {args.weight:g} x {args.second}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
