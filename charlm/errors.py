"""The errors charlm raises on purpose.

Every failure a user can cause (bad options, bad text, bad model files) is one
of these. The CLI turns them into a one-line message and a distinct exit code,
so scripts can tell a usage mistake from a data problem without parsing text.
"""


class CharlmError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1


class UsageError(CharlmError):
    """An option or argument is out of range or inconsistent."""

    exit_code = 2


class DataError(CharlmError):
    """A corpus or text cannot be used: missing, unreadable, undecodable, too short."""

    exit_code = 3


class ModelFileError(CharlmError):
    """A model or checkpoint file is missing, corrupt, or not a charlm model."""

    exit_code = 4
