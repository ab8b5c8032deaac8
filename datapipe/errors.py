"""The errors a user can cause, each one line that says what went wrong and what to do.

Every error datapipe raises on purpose is a ``DatapipeError``; the CLI prints its
message on one line and exits with status 2. Anything else is a bug in datapipe.
"""

from __future__ import annotations


class DatapipeError(Exception):
    """Base of every error a user can cause; the message is one actionable line."""


class UnknownRecipeError(DatapipeError, KeyError):
    """No recipe is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RecipeError(DatapipeError):
    """A recipe is ill-formed, fails to import, or is registered twice."""


class ConfigError(DatapipeError, ValueError):
    """An argument or option has a value datapipe cannot use."""


class SplitSpecError(ConfigError):
    """A split spec such as ``train[:90%]`` cannot be parsed or resolved."""


class DownloadError(DatapipeError):
    """A resource could not be fetched from any mirror or found in --source."""


class ChecksumError(DownloadError):
    """A file's checksum differs from the one the recipe declares."""


class FormatError(DatapipeError):
    """A source file is malformed or truncated (bad magic number, wrong size, ...)."""


class CacheError(DatapipeError):
    """The cache cannot be used: not writable, corrupted, or out of space."""


class LockTimeoutError(CacheError):
    """Another process held a cache lock for longer than the timeout."""


class NotPreparedError(DatapipeError):
    """Data was asked for before it was prepared."""


class CheckpointError(ConfigError):
    """A checkpoint file is missing, damaged, crafted or not datapipe's."""


class NonFiniteLossError(DatapipeError):
    """The training loss became NaN or infinite; the run stopped at that step."""


class UnverifiedDataWarning(UserWarning):
    """A file was used although its checksum or size differs from the recipe's (--no-verify)."""
