"""The one error type for a user's mistakes.

A `UserError` is something the person running a command can fix: a path that does not exist
or is the wrong kind of thing, a malformed config, sidecar or JSON file, a checkpoint this
project refuses. Its message names the offending thing and the fix in one line. The CLI prints
it as `realsr-r1 <command>: <message>` and exits 2; any other exception is a bug and keeps its
traceback. It sits at the bottom of the packages so every layer can raise it.

Raise it where the user's input is checked, before any work (or any Ray actor) starts; never
wrap a broad `except` in it, or a bug would read as the user's mistake.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List


class UserError(ValueError):
    """A mistake in what the user gave a command; the message says what and how to fix it.
    A ValueError, so callers that already catch ValueError keep working."""

    def lines(self) -> List[str]:
        """The message as a command prints it: one line (a library's message may span several),
        unless the error is a list of problems, one per line (cluster/config.py's ConfigError)."""
        return [one_line(self)]


class BadPath(UserError, FileNotFoundError):
    """A path the user named is missing or the wrong kind of thing (a file where a folder is
    expected, a folder without the files it should hold). Also a FileNotFoundError, so callers
    that catch that keep working."""


def one_line(text: Any) -> str:
    """`text` on one line (an exception's message from a library may span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def existing_folder(path: str | Path, what: str, fix: str = "") -> Path:
    """`path` as a Path if it is a folder; else a BadPath naming `what` (the flag or config key)."""
    p = Path(path)
    if p.is_dir():
        return p
    why = "it is a file" if p.exists() else "nothing is there"
    raise BadPath(f"{what} {p} is not a folder ({why})" + (f": {fix}" if fix else ""))


def output_folder(path: str | Path, what: str, empty: bool = False) -> Path:
    """`path` as a Path if a command can write a folder there: not an existing file, under a
    writable folder (created on demand), and with `empty` a new or empty folder. Checked
    before the work, so a long job does not end at its first write."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BadPath(f"{what} {p} is a file: give a folder to write into")
    if empty and p.is_dir() and any(p.iterdir()):
        raise BadPath(f"{what} {p} exists and is not empty: give a new folder")
    above = p.absolute()
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise BadPath(f"{what} {p}: {above} is a file, so no folder can be made below it: give another path")
    if not p.exists() and not os.access(above, os.W_OK | os.X_OK):
        raise BadPath(f"{what} {p}: {above} is not writable: give a folder you can write to")
    return p


def read_json(path: str | Path, what: str) -> Any:
    """The JSON document at `path` (a file the user gave or pointed at); a missing, unreadable
    or malformed file is a UserError naming it and `what` it should be."""
    p = Path(path)
    if not p.is_file():
        raise BadPath(f"{p} {'is a folder' if p.is_dir() else 'does not exist'}: expected {what}")
    try:
        return json.loads(p.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{p} is not a text file: expected {what}") from None
    except OSError as exc:
        raise UserError(f"{p} cannot be read ({exc.strerror or exc}): expected {what}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                        f"expected {what}") from None
