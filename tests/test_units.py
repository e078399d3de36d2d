import pytest

from pipefit.tools.errors import PipefitError
from pipefit.tools.units import format_bytes, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("16GiB", 16 * 2**30), ("24GB", 24 * 10**9), ("12G", 12 * 2**30), ("1.5 GiB", int(1.5 * 2**30)),
     ("512MiB", 512 * 2**20), ("1024B", 1024), ("2tb", 2 * 10**12), (4096, 4096)],
)  # fmt: skip
def test_parse_size_accepts_the_units_people_type(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-3G", "1e9", "0GiB", 0])
def test_parse_size_rejects_nonsense_with_the_fix(text):
    with pytest.raises(PipefitError, match="16GiB"):
        parse_size(text)


def test_a_bare_number_is_refused_with_both_units_spelled_out():
    # `--vram 16` would be 16 bytes, and then nothing fits
    with pytest.raises(PipefitError, match=r"no unit.*16GiB \(16 x 2\^30 bytes\), 16GB \(16 x 10\^9\)"):
        parse_size("16")


def test_format_bytes_picks_a_readable_unit():
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(int(23.8e9)) == "22.17 GiB"
