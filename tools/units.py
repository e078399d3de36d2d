"""Byte sizes: parsing the units people type, and showing sizes the way people read them."""

import re

from .errors import PipefitError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10, "KIB": 2**10, "KB": 10**3,
    "M": 2**20, "MIB": 2**20, "MB": 10**6,
    "G": 2**30, "GIB": 2**30, "GB": 10**9,
    "T": 2**40, "TIB": 2**40, "TB": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")

GiB = 2**30


def parse_size(text: str | int, argument: str | None = None) -> int:
    """Parse a size such as ``16GiB``, ``24GB``, ``12G`` (G means GiB), ``1024B``; an int is bytes.

    Text needs a unit: a bare ``16`` would be 16 bytes, never what anyone planning a GPU meant. A
    size must be more than zero. ``argument``, the parameter the size was given as, heads an error.
    """
    try:
        return _parse_size(text)
    except PipefitError as exc:
        if argument is None:
            raise
        raise PipefitError(f"`{argument}`: {exc.message[0].lower()}{exc.message[1:]}", exc.fix) from None


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        unit = match.group(2).upper() if match else None
        if match is not None and unit == "":
            raise PipefitError(
                f"The size {text!r} has no unit.",
                f"Write {text}GiB ({text} x 2^30 bytes), {text}GB ({text} x 10^9) or {text}B for bytes.",
            )
        if match is None or unit not in _UNITS:
            raise PipefitError(
                f"Cannot read the size {text!r}.", "Write a number with a unit, e.g. 16GiB, 24GB or 12G (G = GiB)."
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise PipefitError(f"The size {text!r} is not more than zero.", "Give a size such as 16GiB.")
    return size


def format_bytes(n: int | None) -> str:
    """Render bytes for people: GiB with two decimals for large sizes, MiB/KiB below."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
