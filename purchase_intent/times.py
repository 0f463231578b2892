"""Times and durations: the one parser of each and the epoch constants.

All timestamps of the package are UTC, tz-naive ``datetime`` (DuckDB ``TIMESTAMP``), or int64
microseconds since the Unix epoch in numpy code. Durations are text such as ``30min``, ``6h``,
``1d``, ``7d``, ``2w`` (as the command line and the saved configs write them).

This module imports nothing of the package, so every layer may use it.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

EPOCH = datetime(1970, 1, 1)  # the Unix epoch, naive UTC
ONE_US = timedelta(microseconds=1)
SECOND_US = 1_000_000
HOUR_US = 3600 * SECOND_US
DAY_US = 24 * HOUR_US

# --------------------------------------------------------------------------- durations

_UNITS = {
    "us": timedelta(microseconds=1),
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "sec": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "min": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


def parse_duration(text: str | timedelta) -> timedelta:
    """Parse ``30min``, ``6h``, ``1d``, ``7d``, ``2w``, ``90s``, ``500ms`` into a timedelta.

    A timedelta is returned as it is. Raises ``ValueError`` naming the accepted units on anything
    else, and on durations that are not positive.
    """
    if isinstance(text, timedelta):
        return text
    m = _DURATION.match(str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(
            f"cannot parse duration {text!r}: use a number and a unit, one of "
            f"{', '.join(sorted(_UNITS))} (e.g. 30min, 6h, 7d)"
        )
    value = float(m.group(1))
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return value * _UNITS[m.group(2)]


def is_day_based(text: str | timedelta) -> bool:
    """True when a duration is a whole number of days (cutoffs then fall at local midnight)."""
    d = parse_duration(text)
    return d >= timedelta(days=1) and d % timedelta(days=1) == timedelta(0)


@lru_cache(maxsize=256)
def duration_us(value: str | timedelta) -> int:
    """A duration (text as :func:`parse_duration` reads it, or a timedelta) in whole microseconds."""
    return parse_duration(value) // ONE_US


# --------------------------------------------------------------------------- points in time


def from_epoch_seconds(value: float) -> datetime:
    """Epoch seconds (UTC) -> tz-naive UTC datetime, rounded to the microsecond."""
    if not math.isfinite(value):
        raise ValueError(f"time {value!r} is not finite")
    return EPOCH + timedelta(microseconds=round(float(value) * 1e6))


def parse_iso(text: str) -> datetime:
    """ISO 8601 text -> tz-naive UTC datetime.

    A trailing ``Z`` / ``z`` is UTC (``fromisoformat`` reads no lower case ``z``), an offset is
    converted to UTC, naive text is taken as UTC. Raises ``ValueError`` on text that is not ISO
    8601 and ``OverflowError`` when the offset moves the time out of the datetime range.
    """
    text = text.strip()
    t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("z", "Z") else text)
    offset = t.utcoffset()
    return t if offset is None else t.replace(tzinfo=None) - offset


def parse_time(value: Any) -> datetime:
    """A point in time -> tz-naive UTC datetime (microsecond precision).

    Accepts a ``datetime`` (aware ones are converted to UTC, naive ones are UTC), epoch seconds as
    a number, or text: ISO 8601 (``Z``, ``z``, an offset or a trailing `` UTC``; naive text is
    UTC) or epoch seconds. Text that reads both ways (``20170101``) is the ISO date.
    Raises ``ValueError`` on anything else.
    """
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo is not None else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return from_epoch_seconds(value)
    text = str(value).strip()
    if text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    try:
        return parse_iso(text)
    except ValueError as iso_error:
        try:
            return from_epoch_seconds(float(text))
        except (ValueError, OverflowError):
            raise iso_error from None
