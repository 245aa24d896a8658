"""The one user-facing error type.

Anything the user can fix (a recipe key, a corpus file, a checkpoint) raises NmtError with a message
that names the file, line or key; `nmt` prints it as one line on stderr and exits with status 2.
"""


class NmtError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(NmtError):
    """A recipe or an override is invalid: names the file and the key path."""


class Interrupted(NmtError):
    """Ctrl-C or SIGTERM stopped a command after saving its work: exit status 130."""
