"""The one exception type for bad data: a missing path, an unreadable file, a wrong label."""


class DataError(ValueError):
    """Bad input data. The message names the file or directory and what was expected."""
