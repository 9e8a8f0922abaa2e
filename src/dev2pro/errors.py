"""User-facing errors.

A `UserError` is a problem with the user's input (a file, a key, a value) that the CLI reports as one line naming the
thing and what to do, with exit code 2 and no traceback (`--debug` shows it). Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class CheckpointError(UserError):
    """A weights file that cannot be used: not safetensors, truncated, wrong architecture, shape mismatch."""


class ConfigError(UserError):
    """A configuration file or override that does not fit the schema."""


class DataError(UserError):
    """A dataset folder that cannot be used (empty, captions without images, ...)."""
