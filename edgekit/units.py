"""Units written in configs (``512MB``, ``17GB/s``, ``2.4GHz``, ``76.8GFLOPS``, ``10m``), parsed once.

Prefixes follow the SI/IEC convention: ``KB``/``MB``/``GB``/``TB`` are powers of
1000 (``kB`` is accepted for ``KB``), ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024.
Vendors quote RAM in GB and bandwidth in GB/s (SI); llama.cpp logs MiB. Being
explicit avoids the 7 % error between the two at GB scale.

Parsed values are plain numbers (bytes, bytes/s, Hz, FLOP/s) so the maths
downstream never sees a string. The pydantic types at the bottom let config
schemas accept either a number or a string with a unit.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

from edgekit.errors import ConfigError


class UnitError(ConfigError, ValueError):
    """A value with a unit could not be read (a ValueError so pydantic reports the key)."""

_SI = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_IEC = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE](?P<exp>[+-]?[0-9]+))?"
_PREFIX = r"(?P<prefix>Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?"


def _multiplier(prefix: str | None) -> float:
    prefix = prefix or ""
    return _IEC[prefix] if prefix in _IEC else _SI[prefix]


def _parse(text: object, unit_regex: str, what: str, example: str) -> float:
    if isinstance(text, bool):
        raise UnitError(f"{what} must be a number with a unit like {example!r}, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        m = re.fullmatch(rf"\s*{_NUMBER}\s*{_PREFIX}\s*(?:{unit_regex})\s*", text)
        if not m and re.fullmatch(rf"\s*-\s*{_NUMBER}\s*{_PREFIX}\s*(?:{unit_regex})\s*", text):
            raise UnitError(f"{what} cannot be negative, got {text!r}; give a positive amount like {example!r}")
        if not m:
            raise UnitError(
                f"cannot read {text!r} as {what}: write a number and a unit like {example!r} "
                "(KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024)"
            )
        # float() reads the exponent itself and saturates to inf / 0.0 at once; 10 ** int(exp) would first build
        # an integer of that many digits ("9429e49672960MB" took over 10 s).
        value = float(f"{m.group('num')}e{m.group('exp') or 0}") * _multiplier(m.group("prefix"))
    else:
        raise UnitError(f"{what} must be a number with a unit like {example!r}, got {type(text).__name__}")
    if not math.isfinite(value) or value < 0:
        raise UnitError(f"{what} must be a finite, non-negative amount, got {text!r}; e.g. {example!r}")
    return value


def parse_bytes(text: object) -> int:
    """``'512MB'`` -> 512_000_000, ``'8GiB'`` -> 8_589_934_592, ``1024`` -> 1024."""
    return int(round(_parse(text, r"B|bytes?", "a size", "512MB")))


def parse_bandwidth(text: object) -> float:
    """``'17GB/s'`` -> 1.7e10 bytes per second."""
    return _parse(text, r"B/s|Bps", "a bandwidth", "17GB/s")


def parse_frequency(text: object) -> float:
    """``'2.4GHz'`` -> 2.4e9 Hz."""
    return _parse(text, r"Hz", "a frequency", "2.4GHz")


def parse_flops(text: object) -> float:
    """``'76.8GFLOPS'`` -> 7.68e10 operations per second (also ``TOPS`` for integer NPUs)."""
    return _parse(text, r"FLOPS|FLOP/s|OPS|OP/s", "a compute rate", "76.8GFLOPS")


_DURATION = re.compile(r"\s*(-?[0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)\s*")
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: object) -> float:
    """``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds. A unit is required; the value must be positive."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UnitError(f"expected a duration such as 90s, 10m or 1.5h, got {type(text).__name__}")
    bare = text if isinstance(text, (int, float)) else text.strip()
    if isinstance(bare, (int, float)) or re.fullmatch(r"-?[0-9]*\.?[0-9]+", bare):
        raise UnitError(f"{bare!r} has no unit; write it with one: {bare}s, {bare}m or {bare}h")
    m = _DURATION.fullmatch(text)
    if not m:
        raise UnitError(f"cannot read duration {text!r}; write e.g. 90s, 10m or 1.5h (units s, m/min, h)")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise UnitError(f"duration {text!r} must be positive; give e.g. 10m")
    return seconds


def _human(value: float, unit: str, binary: bool = False) -> str:
    steps = [("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)] if binary else [
        ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k" if unit != "B" else "K", 1e3)]
    for prefix, size in steps:
        if abs(value) >= size:
            scaled = value / size
            digits = 0 if scaled >= 100 else 1 if scaled >= 10 else 2
            return f"{scaled:.{digits}f}{prefix}{unit}"
    return f"{value:.0f}{unit}" if float(value).is_integer() else f"{value:.2f}{unit}"


def format_bytes(n: float, binary: bool = False) -> str:
    """Human size: ``format_bytes(1.5e8) == '150MB'``; ``binary=True`` gives MiB etc."""
    return _human(float(n), "B", binary)


def format_bandwidth(bps: float) -> str:
    return _human(float(bps), "B/s")


def format_flops(flops: float) -> str:
    return _human(float(flops), "FLOPS")


def format_frequency(hz: float) -> str:
    return _human(float(hz), "Hz")


def _annotated(parser, formatter, base):
    return Annotated[base, BeforeValidator(parser), PlainSerializer(formatter, return_type=str, when_used="json")]


# Types for pydantic models: accept "512MB" or a plain number, store the number,
# dump back to a readable string in JSON.
Bytes = _annotated(parse_bytes, format_bytes, int)
Bandwidth = _annotated(parse_bandwidth, format_bandwidth, float)
Frequency = _annotated(parse_frequency, format_frequency, float)
Flops = _annotated(parse_flops, format_flops, float)
Duration = Annotated[float, BeforeValidator(parse_duration)]  # seconds
