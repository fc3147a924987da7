"""The one error type for a user's mistakes.

A `UserError` is something the person running a command can fix: a path that does not exist
or is the wrong kind of thing, a malformed config, sidecar or JSON file, a checkpoint this
project refuses. Its message names the offending thing and the fix in one line. The CLI prints
it as `realsr-r1 <command>: <message>` and exits 2; any other exception is a bug and keeps its
traceback. It sits at the bottom of the packages so every layer can raise it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave a command; the message says what and how to fix it.
    A ValueError, so callers that already catch ValueError keep working."""
