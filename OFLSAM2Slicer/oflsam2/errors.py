"""Error types the command line maps to exit codes."""


class InputError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class WeightsError(InputError):
    """Weights missing, corrupt or not downloadable: the message says how to fix it."""


class Cancelled(RuntimeError):
    """The user cancelled a running job; nothing was written."""
