"""What in a folder may be opened as an image at all: regular files only, and no operating-system clutter.

Listing a folder must never open a named pipe (opening one blocks until a writer appears), a socket or a device, and
must not lose a broken or looping symbolic link silently: each of them gets a reason here, so that sources and batch
jobs list it in ``skipped.csv`` instead of opening it or forgetting it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["is_hidden_or_system", "special_file_reason", "FOLDER_REASON", "LINKED_FOLDER_REASON"]

# Names that operating systems and archivers leave beside real files; never data.
_SYSTEM_FILE_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
_SYSTEM_FOLDER_NAMES = frozenset({"__macosx"})

#: The reason given for a folder where a file was expected, and for a symbolic link to one.
FOLDER_REASON = "is a folder, not an image file"
LINKED_FOLDER_REASON = "symbolic link to a folder: not followed"


def is_hidden_or_system(path: str | Path) -> bool:
    """Tell whether a file or folder name is hidden or operating-system clutter rather than data.

    The rule looks at the last path component only: names starting with ``.`` (``.DS_Store``, ``._x.png``
    AppleDouble files, ``.ipynb_checkpoints``), ``Thumbs.db``, ``ehthumbs.db``, ``desktop.ini`` and ``__MACOSX``
    folders (compared case-insensitively, as the systems that write them do).

    Args:
        path: a file or folder path, or a bare name.

    Returns:
        True when the entry should be skipped.
    """
    name = Path(path).name
    lowered = name.lower()
    return name.startswith(".") or lowered in _SYSTEM_FILE_NAMES or lowered in _SYSTEM_FOLDER_NAMES


def special_file_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an image file, judged from the file system alone (nothing is opened).

    Args:
        path: a path as listed in a folder or given by a user.

    Returns:
        None for a regular file or a symbolic link to one; otherwise the reason in words: missing, a folder (or a
        link to one, which listings do not follow), a broken link, a link loop, a named pipe, a socket, a device.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as error:
        return f"cannot be inspected ({error.strerror or error})"
    is_link = stat.S_ISLNK(info.st_mode)
    if is_link:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return "broken symbolic link: its target does not exist"
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "symbolic link loop: the link resolves to itself"
            return f"symbolic link that cannot be followed ({error.strerror or error})"
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return LINKED_FOLDER_REASON if is_link else FOLDER_REASON
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO), not a regular file: never opened"
    if stat.S_ISSOCK(mode):
        return "socket, not a regular file: never opened"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file, not a regular file: never opened"
    return "not a regular file: never opened"
