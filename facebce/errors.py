"""The one exception family facebce raises for bad input (leaf module: imports nothing)."""


class FacebceError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class DataFormatError(FacebceError, ValueError):
    """A data file is malformed: the message names the file and the record or field."""


class ModelError(FacebceError, ValueError):
    """A model or checkpoint does not match what was asked for."""


class ConfigError(FacebceError, ValueError):
    """A recipe or option is invalid: the message names the key."""
