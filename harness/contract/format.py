"""Human-readable numbers and durations, and values short enough for a message."""

from __future__ import annotations

import re
import reprlib

from ftbench.harness.contract.api import FtbenchError

# A value quoted in an error message may be anything a file held (a list of a
# million items, a string of megabytes): reprlib bounds both the work and the text.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 80, 40, 80
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxarray = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6


def shown(value) -> str:
    """``repr(value)`` for a message, bounded in size and depth.

    Example: ``shown(list(range(10**6)))`` is ``'[0, 1, 2, 3, 4, 5, ...]'``.
    """
    return shorten(_SHORT.repr(value), 160)


def shorten(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out.

    Example: ``shorten("x" * 500, 20) == "xxxxxxxxxx… (490 more characters)"``.
    """
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(1, limit // 2)
    return f"{text[:keep]}… ({len(text) - keep} more characters)"


def fmt_num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.{digits}g}M"
    if ax >= 1e4:
        return f"{x / 1e3:.{digits}g}k"
    if ax >= 10 ** digits:  # 1234, not 1.23e+03
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_duration(value, what: str) -> float:
    """Seconds from ``90``, ``"90s"``, ``"15m"``, ``"1.5h"``.

    Example: ``parse_duration("15m", "time_limit") == 900.0``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(value)) if isinstance(value, str) else None
    if not m or float(m.group(1)) <= 0:
        raise FtbenchError(f"{what}: invalid duration {shown(value)}; write seconds (900) or 90s, 15m, 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
