"""User-facing errors: the lowest module, importable from anywhere in the package."""


class UserError(RuntimeError):
    """A problem the user can fix (missing data, incompatible checkpoint): one line, exit 1."""
