"""Reading daemon.toml values: every section parser uses these, so every bad key gets the same kind of
one-line message naming where it is (`watch[1].quiet_seconds: ...`) and what to write instead."""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from ..errors import BadInput

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)?\s*(?:/s)?\s*$", re.IGNORECASE)
_BYTES = {None: 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ConfigErrors(BadInput):
    """Every problem found in the config at once, one per line."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s); fix them and start again:\n{lines}")


def check_keys(table: Any, allowed: Iterable[str], where: str, problems: list[str],
               required: Iterable[str] = ()) -> dict[str, Any]:
    """The table as a dict; unknown and missing keys are added to `problems`."""
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table, got {type(table).__name__}")
        return {}
    allowed = set(allowed)
    for key in table:
        if key not in allowed:
            problems.append(f"{where}.{key}: unknown key; known keys: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in table:
            problems.append(f"{where}.{key}: required")
    return table


def duration(value: Any, where: str, problems: list[str], minimum: float = 0.0) -> float:
    """Seconds from a number or a string such as "30s", "15m", "1h", "7d"."""
    if isinstance(value, bool):
        match = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
        match = True
    else:
        match = _DURATION.match(str(value))
        seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if not match:
        problems.append(f"{where}: {value!r} is not a duration; write seconds or e.g. \"30s\", \"15m\", \"1h\", \"7d\"")
        return minimum
    if not math.isfinite(seconds) or seconds > 10 * 365 * 86400:  # TOML allows nan and inf
        problems.append(f"{where}: {value!r} must be a finite duration of at most 10 years")
        return max(minimum, 1.0)
    if seconds < minimum or (minimum == 0 and seconds <= 0):
        problems.append(f"{where}: {value!r} must be more than {minimum:g} seconds")
        return max(minimum, 1.0)
    return seconds


def byte_rate(value: Any, where: str, problems: list[str]) -> float:
    """Bytes per second from a number or a string such as "200MB/s" or "1GiB/s"."""
    match = None if isinstance(value, bool) else _RATE.match(str(value))
    if not match or not 0 < float(match.group(1)) < 1e15:
        problems.append(f"{where}: {value!r} is not a positive rate; write bytes per second or e.g. \"200MB/s\"")
        return 1.0
    return float(match.group(1)) * _BYTES[(match.group(2) or "").lower() or None]


def positive_int(value: Any, where: str, problems: list[str], minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{where}: {value!r} must be a whole number of at least {minimum}")
        return minimum
    return value


def string(value: Any, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: {value!r} must be a non-empty string")
        return ""
    return value


def string_list(value: Any, where: str, problems: list[str]) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}: {value!r} must be a list of strings")
        return []
    return value
