"""The one parser of times and of durations, the epoch constants, and the event vocabulary."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from purchase_intent.times import (
    DAY_US,
    EPOCH,
    HOUR_US,
    ONE_US,
    SECOND_US,
    duration_us,
    from_epoch_seconds,
    is_day_based,
    parse_duration,
    parse_iso,
    parse_time,
)
from purchase_intent.vocabulary import CANONICAL_EVENTS, EVENT_CODES, EVENT_TYPES, OTHER_CODE


@pytest.mark.parametrize("text, want", [
    ("30min", timedelta(minutes=30)), ("6h", timedelta(hours=6)), ("1d", timedelta(days=1)),
    ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2)), ("90s", timedelta(seconds=90)),
    ("500ms", timedelta(milliseconds=500)), ("1us", ONE_US), ("1.5h", timedelta(minutes=90)),
    (" 10 M ", timedelta(minutes=10)), ("3sec", timedelta(seconds=3)),
])
def test_parse_duration(text, want):
    assert parse_duration(text) == want


def test_parse_duration_passes_a_timedelta_and_names_the_units_on_errors():
    assert parse_duration(timedelta(hours=3)) == timedelta(hours=3)
    for bad in ("7", "7 parsecs", "d", "", "-1d"):
        with pytest.raises(ValueError, match="use a number and a unit"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="must be positive"):
        parse_duration("0d")


def test_day_based_durations_and_microseconds():
    assert is_day_based("1d") and is_day_based("2w") and is_day_based("48h")
    assert not is_day_based("6h") and not is_day_based("36h") and not is_day_based("90s")
    assert duration_us("1d") == DAY_US == 24 * HOUR_US == 86_400 * SECOND_US
    assert duration_us("30min") == 1_800_000_000 and duration_us(timedelta(seconds=1)) == SECOND_US
    assert EPOCH + DAY_US * ONE_US == datetime(1970, 1, 2)


@pytest.mark.parametrize("value", [
    "2017-12-02T10:00:00Z", "2017-12-02T10:00:00z", "2017-12-02 10:00:00", " 2017-12-02T18:00:00+08:00 ",
    "2017-12-02T05:00:00-05:00", "2017-12-02 10:00:00 UTC", "1512208800", "1512208800.0", 1512208800,
    1512208800.0, datetime(2017, 12, 2, 10), datetime(2017, 12, 2, 11, tzinfo=timezone(timedelta(hours=1))),
    pd.Timestamp("2017-12-02 10:00:00"), pd.Timestamp("2017-12-02 11:00:00", tz="Europe/Berlin"),
])
def test_parse_time_gives_naive_utc(value):
    t = parse_time(value)
    assert t == datetime(2017, 12, 2, 10) and t.tzinfo is None


def test_parse_time_details():
    assert parse_time("1512208800.25") == datetime(2017, 12, 2, 10, 0, 0, 250000)
    assert parse_time(-1) == datetime(1969, 12, 31, 23, 59, 59)
    assert parse_time("20170101") == datetime(2017, 1, 1)  # reads as ISO (basic format) before as seconds
    assert parse_time("2017-03-26T03:30:00+02:00") == datetime(2017, 3, 26, 1, 30)  # Berlin, just after DST
    for bad in ("garbage", "", "  ", "nan", "1e30", True, None):
        with pytest.raises(ValueError):
            parse_time(bad)
    with pytest.raises(ValueError, match="not finite"):
        parse_time(float("nan"))


def test_parse_iso_and_epoch_seconds():
    assert parse_iso("2017-12-02T10:00:00Z") == datetime(2017, 12, 2, 10)
    with pytest.raises(ValueError):
        parse_iso("1512208800")  # numbers are not ISO text
    with pytest.raises(OverflowError):
        parse_iso("0001-01-01T00:00:00+01:00")
    assert from_epoch_seconds(0) == EPOCH and from_epoch_seconds(1.0000004) == datetime(1970, 1, 1, 0, 0, 1)
    with pytest.raises(ValueError, match="not finite"):
        from_epoch_seconds(float("inf"))


def test_event_vocabulary():
    assert CANONICAL_EVENTS == ("view", "cart", "remove_from_cart", "wishlist", "checkout", "purchase", "other")
    assert EVENT_TYPES == CANONICAL_EVENTS[:-1]
    # the codes of runs trained before checkout existed keep their meaning; checkout takes the next one
    assert EVENT_CODES == {"view": 1, "cart": 2, "remove_from_cart": 3, "wishlist": 4, "purchase": 5, "other": 6,
                           "checkout": 7}
    assert set(EVENT_CODES) == set(CANONICAL_EVENTS) and OTHER_CODE == 6
