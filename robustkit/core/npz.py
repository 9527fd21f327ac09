"""Reading ``.npz`` files and checking paths with errors that say what is wrong.

``np.load`` guesses a file's format from its first bytes: a text file or a renamed ``.npy`` gets
through ``allow_pickle=False`` as a pickle or a bare array, and the answer is numpy's advice to
"load it unsafely" or a ``TypeError`` from the ``with`` statement. Here the first bytes are read
first and the file is named for what it is; robustkit never suggests unpickling a data file. A
permission problem asks for permissions (deleting a cache someone cannot read fixes nothing), and
a folder where a file belongs is called a folder, not "not found".
"""

from __future__ import annotations

import errno
import re
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np

from robustkit.core.errors import DataError

_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; np.savez never writes an empty one
_NPY_MAGIC = b"\x93NUMPY"
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def path_kind(path: Path, what: str) -> str:
    """``"file"``, ``"dir"``, ``"missing"`` or ``"other"`` (a socket, a device) for ``path``; a path that
    cannot be looked at (a parent folder without read or search permission) is one DataError."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "missing"  # a parent is a file: nothing can be below it
    except PermissionError:
        raise DataError(f"cannot look at {what} {path}: permission denied (a folder on its path is not "
                        "readable by this user); fix the permissions or choose another path") from None
    except OSError as e:
        raise DataError(f"cannot look at {what} {path}: {one_line(e)}") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def read_npz(path: Path, what: str, fix: str, only: tuple[str, ...] | None = None
             ) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(names, arrays)`` of the .npz archive at ``path``: every array name it holds, and the arrays
    named in ``only`` (all when None). Anything else is one DataError naming the file, what it is
    instead, and ``fix`` (what the user should do about a file of this kind)."""
    head = _head(path, what)
    if not head.startswith(_ZIP_MAGIC):
        raise DataError(f"{path}: {describe_bytes(head)}, not an .npz archive; {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            return names, {k: f[k] for k in names if only is None or k in only}
    except PermissionError:
        raise DataError(_denied(path, what)) from None
    except _READ_ERRORS as e:
        text = one_line(e)
        if "pickle" in text.lower():  # an object array: say so without numpy's advice to unpickle it
            text = "it holds an object (pickled) array, and robustkit never unpickles data files"
        raise DataError(f"{path}: unreadable {what} ({text}); {fix}") from None


def describe_bytes(head: bytes) -> str:
    """What a file that starts with ``head`` is, in a few words (for errors about wrong files)."""
    if not head:
        return "an empty file"
    if head.startswith(_NPY_MAGIC):
        return "a single .npy array (a renamed .npy file?)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "a Python pickle (robustkit never unpickles data files)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a binary file starting with bytes {head[:4].hex(' ')}"
    if text.isprintable() or not re.search(r"[^\s\x20-\x7e]", text):
        shown = re.sub(r"\s+", " ", text).strip()
        return f"a text file (it starts {shown[:24]!r})" if shown else "a text file of whitespace"
    return f"a binary file starting with bytes {head[:4].hex(' ')}"


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, shortened: errors the CLI prints must stay one line."""
    text = re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _head(path: Path, what: str, n: int = 32) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; a {what} is an .npz file") from None
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except PermissionError:
        raise DataError(_denied(path, what)) from None
    except OSError as e:
        if e.errno == errno.EISDIR:
            raise DataError(f"{path}: is a folder; a {what} is an .npz file") from None
        raise DataError(f"cannot read {what} {path}: {one_line(e)}") from None


def _denied(path: Path, what: str) -> str:
    return (f"cannot read {what} {path}: permission denied; make it readable by this user "
            "(the file itself may be fine)")
