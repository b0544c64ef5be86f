"""The one base class of errors meant for people: the CLI prints them as one line and exits with status 2."""


class QtrainError(Exception):
    """Something the user can fix; the message names the value and the way out."""


class UsageError(QtrainError, ValueError):
    """A command-line option out of range, missing, or in conflict with another; the message names the option."""
