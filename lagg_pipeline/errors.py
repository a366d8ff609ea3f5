"""User-facing errors: the lowest module, importable from anywhere in the package."""


class UserError(RuntimeError):
    """A problem the user can fix (missing data, incompatible checkpoint): one line, exit 1."""


class ConfigError(ValueError):
    """A configuration value that is refused before any compute starts (one line, exit 2)."""
