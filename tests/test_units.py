import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgekit.errors import ConfigError
from edgekit.units import format_bytes, parse_bandwidth, parse_bytes, parse_duration, parse_flops, parse_frequency


@pytest.mark.parametrize("text,expected", [
    ("512MB", 512_000_000), ("512 MB", 512_000_000), ("8GB", 8_000_000_000), ("8GiB", 8 * 2**30),
    ("1.5kB", 1500), ("1.5KB", 1500), ("64KiB", 65536), ("100B", 100), ("1e3MB", 1_000_000_000), (1024, 1024),
    ("0.5TB", 500_000_000_000), ("3bytes", 3),
])
def test_parse_bytes_reads_si_and_binary_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["512", "512MBs", "-1MB", "twelve MB", "5 parsecs", "", None, True, "nanGB"])
def test_parse_bytes_rejects_unitless_negative_and_garbage(bad):
    with pytest.raises(ConfigError) as e:
        parse_bytes(bad)
    assert "512MB" in str(e.value)  # the message shows what a valid value looks like


def test_parse_rates_and_frequency():
    assert parse_bandwidth("17GB/s") == 17e9
    assert parse_bandwidth("3.6 GB/s") == pytest.approx(3.6e9)
    assert parse_bandwidth("100MiB/s") == 100 * 2**20
    assert parse_frequency("2.4GHz") == pytest.approx(2.4e9)
    assert parse_flops("76.8GFLOPS") == pytest.approx(76.8e9)
    assert parse_flops("35TOPS") == pytest.approx(35e12)
    with pytest.raises(ConfigError):
        parse_bandwidth("17GB")  # a size is not a rate


def test_unit_errors_are_value_errors_so_pydantic_can_name_the_key():
    with pytest.raises(ValueError):
        parse_bytes("lots")


@given(st.integers(min_value=0, max_value=10**15))
def test_formatted_sizes_parse_back_within_rounding(n):
    back = parse_bytes(format_bytes(n))
    assert abs(back - n) <= max(1, 0.005 * n)


@given(st.integers(min_value=0, max_value=2**50))
def test_binary_formatting_parses_back(n):
    back = parse_bytes(format_bytes(n, binary=True))
    assert abs(back - n) <= max(1, 0.005 * n)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("90 sec", 90), ("10m", 600), ("4 min", 240), ("1.5h", 5400)])
def test_parse_duration_reads_seconds_minutes_hours(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad,words", [("90", "has no unit"), (90, "has no unit"), ("soon", "cannot read duration"),
                                       ("0s", "must be positive"), ("-5m", "must be positive"), (None, "NoneType"),
                                       (True, "bool")])
def test_parse_duration_needs_a_unit_and_a_positive_value(bad, words):
    with pytest.raises(ConfigError, match=words):
        parse_duration(bad)
