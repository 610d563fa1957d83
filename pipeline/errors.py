"""The errors a user can fix.

Every problem with the input — a malformed config, a missing or corrupt file, an unreachable
endpoint, wrong credentials, a checkpoint of another model — raises a subclass of `GapmError`
whose message names the thing and what to do. The CLI prints such a message as one line and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class GapmError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class ConfigError(GapmError):
    """A problem with the configuration; the message names the key and the fix."""


class DataError(GapmError):
    """A dataset, shard set or manifest that cannot be used as asked."""
