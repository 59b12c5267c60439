"""Blend two checkpoints of one model: every weight (1 - w) * first + w * second.

Self-critical training moves the cross-entropy model towards captions that score well but say
less; a model part of the way between the two can score better on dev than either (weight-space
interpolation, as in WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot models", 2022).
The first side may be the mean of several checkpoints (e.g. the last cross-entropy epochs:
checkpoint averaging). train_flickr8k.sh scores such blends on dev beside the two models themselves.

  python blend_checkpoints.py --first models/decoder-3-235.ckpt models/decoder-4-235.ckpt \\
      --second models/decoder-scst-best.ckpt --weight 0.85 --output models/decoder-blend85.ckpt

Each path names a model by either of its two files; both files of the blend are written, with
the second model's decoding settings and no training state.
"""
import sys

from checkpoints import average_states, blend_states, model_files, read_model, write_model
from errors import InputError, number, script_parser


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--first', required=True, nargs='+',
                        help='a model file (weight 0), or several files of one model: their mean')
    parser.add_argument('--second', required=True, help='a model file of the same architecture (weight 1)')
    parser.add_argument('--weight', type=number(0, 1), required=True, help="the second model's share, 0 to 1")
    parser.add_argument('--output', required=True, help='encoder-NAME.ckpt or decoder-NAME.ckpt: both are written')
    args = parser.parse_args(argv)
    paths = args.first + [args.second]
    try:
        models = [read_model(*model_files(path)) for path in paths]
        reference = models[0]
        for path, model in zip(paths[1:], models[1:]):
            if model.config != reference.config:
                raise InputError(f'{path}: a different model from {paths[0]} ({model.config} against {reference.config})')
            digests = model.decoder_file.get('vocab_sha'), reference.decoder_file.get('vocab_sha')
            if None not in digests and digests[0] != digests[1]:
                raise InputError(f'{path}: trained with another vocabulary than {paths[0]}')
            for part in ('encoder_state', 'decoder_state'):
                if getattr(model, part).keys() != getattr(reference, part).keys():
                    raise InputError(f'{path}: its {part[:7]} holds other tensors than that of {paths[0]}')
        outputs = model_files(args.output)
        if set(outputs) & {file for path in paths for file in model_files(path)}:
            raise InputError(f'{args.output}: would overwrite one of the models blended')
        firsts, second = models[:-1], models[-1]
        encoder, decoder = (blend_states(average_states([getattr(m, part) for m in firsts]), getattr(second, part),
                                         args.weight) for part in ('encoder_state', 'decoder_state'))
        write_model(*outputs, second.config, second.decoding, encoder, decoder,
                    vocab_sha=next((m.decoder_file['vocab_sha'] for m in models[::-1] if 'vocab_sha' in m.decoder_file),
                                   None))
    except InputError as e:
        sys.exit(f'error: {e}')
    first = args.first[0] if len(args.first) == 1 else f'the mean of {" and ".join(args.first)}'
    print(f'wrote {outputs[0]} and {outputs[1]}: {1 - args.weight:g} x {first} + {args.weight:g} x {args.second}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
