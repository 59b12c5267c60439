"""The one error class that scripts turn into a one-line message.

Anything a user can get wrong (a missing or malformed file, a model that does not fit, an
image that cannot be read) raises InputError with a message that names the file and the
problem; every script's main() prints it as `error: MESSAGE` and exits with status 1.
"""


class InputError(Exception):
    """Bad input; the message names the file and the problem."""
