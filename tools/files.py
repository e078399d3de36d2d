"""Reading the files a user names: regular files only, up to a size, as text."""

from __future__ import annotations

import stat
from pathlib import Path

from .errors import PipefitError

MAX_TEXT_BYTES = 4 * 2**20  # a script or a log beyond this is not one a person wrote or pasted


def read_user_text(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES, errors: str = "strict") -> str:
    """The text of the regular file at ``path`` (a ``what``: "script", "log"), refused in one line when
    it is missing, not a regular file (a FIFO or a device would block or never end), larger than
    ``limit`` or, with ``errors="strict"``, not UTF-8."""
    file = Path(path).expanduser()
    try:
        info = file.stat()
    except OSError as exc:
        raise PipefitError(f"Cannot read the {what} {str(path)!r}: {exc.strerror}.", "Check the path.") from None
    if not stat.S_ISREG(info.st_mode):
        raise PipefitError(f"The {what} {str(path)!r} is not a regular file.", f"Pass the path of a {what} file.")
    if info.st_size > limit:
        raise PipefitError(
            f"The {what} {str(path)!r} is {info.st_size / 2**20:.1f} MiB; pipefit reads at most {limit / 2**20:.0f} MiB.",
            f"Pass the {what} itself, or the part that matters.",
        )
    try:
        return file.read_bytes()[:limit].decode("utf-8", errors=errors)
    except OSError as exc:
        raise PipefitError(f"Cannot read the {what} {str(path)!r}: {exc.strerror}.", "Check the path.") from None
    except UnicodeDecodeError:
        raise PipefitError(f"{str(path)!r} is not a UTF-8 text file.", f"Pass a {what} file.") from None
