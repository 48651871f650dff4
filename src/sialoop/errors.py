"""The few exception types a user can cause, each with a one-line message that names the fix.

`SialoopError` subclasses are caught by the CLI and printed as one line; anything else is a bug.
"""


class SialoopError(Exception):
    """A failure the user can fix; `str(err)` is the one-line message."""


class ConfigError(SialoopError):
    """A bad config key, type or path."""


class DataError(SialoopError):
    """Task data missing or malformed."""


class PolicyError(SialoopError):
    """The policy endpoint or model cannot be started or reached."""


class StoreError(SialoopError):
    """The run directory is missing, locked or refuses the operation."""
