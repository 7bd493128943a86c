"""Library exceptions. A `UserError` is a mistake the user can fix; the CLI prints it on one
line and exits with status 2. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A bad config value, missing file, unknown hook, unreachable hub asset, ...

    The message is a single line that names the offending field or path and what was expected.
    """


class ConfigError(UserError):
    """A config file or config value is invalid."""
