"""Human-readable numbers for tables."""

from __future__ import annotations


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
