"""Byte sizes as manifests write them: a number and a unit (1 KB = 1000 B, 1 KiB = 1024 B)."""
import math
import re

UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
MAX_BYTES = 1000**4  # 1 TB: larger than any store allows; bigger values are typos
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")


def parse_size(text) -> int:
    """Parse '40KB' or '1.5 MiB' into bytes; raise ValueError with a reason a user can act on."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f"expected a size with a unit such as '40KB' or '2MiB', got {text!r}")
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size with a unit such as '40KB' or '2MiB', got {text!r}")
    number, unit = match.groups()
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    value = float(number) * UNITS[unit]
    if not math.isfinite(value) or value > MAX_BYTES:  # 400 digits read as a float are infinite
        raise ValueError(f"size {text!r} is larger than 1TB")
    size = round(value)
    if size <= 0:
        raise ValueError(f"size must be greater than zero, got {text!r}")
    if size > MAX_BYTES:
        raise ValueError(f"size {text!r} is larger than 1TB")
    return size


def format_size(size: int) -> str:
    """Render bytes for humans in decimal units, matching how budgets are usually written."""
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"
