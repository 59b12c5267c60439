"""Bad input: the one error class that scripts turn into a one-line message, and the checks of
the numbers a user types or a file records.

Anything a user can get wrong (a missing or malformed file, a model that does not fit, an
image that cannot be read, a number out of range) raises InputError with a message that names
the file or flag and the problem; every script's main() prints it as `error: MESSAGE` and exits
with status 1 (argparse's own errors exit with 2).
"""
import argparse
import math


class InputError(Exception):
    """Bad input; the message names the file and the problem."""


def check_format(path, recorded, expected):
    """InputError unless a file records the format this version writes (earlier layouts are not read)."""
    if recorded != expected:
        raise InputError(f'{path}: written by an earlier version of this repo; its format is no longer read')


def checked(name, value, low=None, high=None, integer=False, above=None):
    """`value` if it is a finite number (an integer when asked) in [low, high] (or above `above`);
    else ValueError naming `name` and the allowed range."""
    kind = 'an integer' if integer else 'a number'
    bounds = (f'from {low} to {high}' if high is not None else f'>= {low}') if low is not None else \
        (f'> {above}' if above is not None else '') + (f' and <= {high}' if above is not None and high is not None
                                                        else f'<= {high}' if high is not None else '')
    wrong = isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
        or not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high) \
        or (above is not None and value <= above)
    if wrong:
        raise ValueError(f'{name} must be {" ".join(filter(None, (kind, bounds)))}, not {value!r}')
    return value


def _flag_type(convert, kind, **limits):
    """An argparse type: `convert` the text, then check it against `limits` (see checked)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'it must be {kind}, not {text!r}') from None
        try:
            return checked('it', value, **limits)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def integer(low=None, high=None):
    """An argparse type: an integer in [low, high]."""
    return _flag_type(int, 'an integer', low=low, high=high, integer=True)


def number(low=None, high=None, above=None):
    """An argparse type: a finite number in [low, high] (or above `above`)."""
    return _flag_type(float, 'a number', low=low, high=high, above=above)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default, except where there is none to show (the flag's help says
    where its value then comes from, e.g. the model's recorded settings)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def script_parser(doc):
    """The argument parser of a script: its docstring's first paragraph as the description, defaults shown."""
    return argparse.ArgumentParser(description=' '.join(doc.strip().split('\n\n')[0].split()),
                                   formatter_class=HelpFormatter)
