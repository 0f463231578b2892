"""Sentences a marketer understands, for features and events ("added 2 items to the cart in the
last 24 hours"). Used by `explain` for every model's reasons."""
from __future__ import annotations

import math
from typing import Any

from .features import FEATURES
from .times import parse_duration

_EVENT_VERB = {  # event -> phrase with the count {n} and its noun
    "view": "viewed products {n} {times}",
    "cart": "added {n} {items} to the cart",
    "remove_from_cart": "removed {n} {items} from the cart",
    "wishlist": "added {n} {items} to the wishlist",
    "checkout": "went through a checkout step {n} {times}",
    "purchase": "made {n} {purchases}",
    "events": "was active {n} {times} (any event)",
}
_EVENT_DID = {"view": "viewed a product", "cart": "added an item to the cart",
              "remove_from_cart": "removed an item from the cart", "wishlist": "added an item to the wishlist",
              "checkout": "reached the checkout", "purchase": "bought something",
              "other": "interacted with the shop"}
_NAN_TEXT = {
    "view_to_cart": "has not viewed any product", "cart_to_purchase": "has never added an item to the cart",
    "price_mean": "saw no prices", "price_max": "saw no prices", "price_std": "saw fewer than 2 prices",
    "cart_price_mean": "has no priced items in the cart", "spend": "bought items without a known price",
    "hours_since_last_event": "has no earlier activity", "events_per_session": "has no sessions yet",
    "minutes_per_session": "has no sessions yet", "days_since_first_event": "has no earlier activity",
}
_DAYPART_TEXT = {"night": "at night (00-06)", "morning": "in the morning (06-12)",
                 "afternoon": "in the afternoon (12-18)", "evening": "in the evening (18-24)"}
_WEEKDAY_TEXT = {"mon": "Mondays", "tue": "Tuesdays", "wed": "Wednesdays", "thu": "Thursdays",
                 "fri": "Fridays", "sat": "Saturdays", "sun": "Sundays"}


def _num(x: float) -> str:
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


def window_text(w: str) -> str:
    """``1d`` -> "in the last 24 hours", ``7d`` -> "in the last 7 days", ``all`` -> "in total"."""
    if w == "all":
        return "in total"
    s = parse_duration(w).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size and (s % size == 0 or unit == "minute"):
            n = s / size
            if unit == "day" and n == 1:
                return "in the last 24 hours"
            return f"in the last {_num(n)} {unit}{'s' if n != 1 else ''}"
    return f"in the last {w}"


def _plural(n: float, noun: str) -> str:
    """``noun``, or its plural unless ``n`` is 1 ("1 day", "2 days", "1.5 days")."""
    return noun if n == 1 else noun + "s"


def ago_text(hours: float) -> str:
    """3.2 -> "3 hours ago", 50 -> "2 days ago"."""
    if hours < 1:
        m = max(int(round(hours * 60)), 1)
        return f"{m} minute{'s' if m != 1 else ''} ago"
    if hours < 48:
        h = int(round(hours))
        return f"{h} hour{'s' if h != 1 else ''} ago"
    d = int(round(hours / 24))
    return f"{d} days ago"


def _count_text(event: str, n: float, window: str) -> str:
    n_int = int(round(n))
    verb = _EVENT_VERB[event]
    words = {"times": "time" if n_int == 1 else "times", "items": "item" if n_int == 1 else "items",
             "purchases": "purchase" if n_int == 1 else "purchases"}
    if n_int == 0:
        none = {"view": "viewed no products", "cart": "added nothing to the cart",
                "remove_from_cart": "removed nothing from the cart", "wishlist": "added nothing to the wishlist",
                "checkout": "went through no checkout step", "purchase": "made no purchase",
                "events": "was not active"}[event]
        return f"{none} {window_text(window)}"
    return f"{verb.format(n=_num(n_int), **words)} {window_text(window)}"


def feature_text(name: str, value: float) -> str:
    """A sentence for feature ``name`` at ``value`` (the user's raw, unstandardised value)."""
    v = float(value) if value is not None else float("nan")
    nan = not math.isfinite(v)
    parts = name.split("_")
    events = {"view", "cart", "remove_from_cart", "wishlist", "checkout", "purchase", "events"}
    if name.startswith("n_") and not name.startswith("n_items") and name not in ("n_categories", "n_sessions"):
        body, window = name[2:].rsplit("_", 1)
        if body in events:
            return _count_text(body, 0 if nan else v, window)
    if name.startswith("hours_since_last_"):
        ev = name[len("hours_since_last_"):]
        if ev == "event":
            return "has no earlier activity" if nan else f"was last active {ago_text(v)}"
        did = _EVENT_DID.get(ev, f"had a {ev} event")
        return f"has never {did.replace('something', 'anything')}" if nan else f"last {did} {ago_text(v)}"
    if name.startswith("share_") and parts[1] in _DAYPART_TEXT:
        return f"does {0 if nan else v:.0%} of their browsing {_DAYPART_TEXT[parts[1]]}"
    if name.startswith("share_") and parts[1] in _WEEKDAY_TEXT:
        return f"does {0 if nan else v:.0%} of their browsing on {_WEEKDAY_TEXT[parts[1]]}"
    if name.startswith("history_embedding_"):  # a dimension of a pretrained encoder's summary of the history
        return f"the pattern of their recent events (history embedding dimension {name.rsplit('_', 1)[1]})"
    if name.startswith("ses_"):
        rest = name[4:]
        if rest.startswith("n_") and rest[2:] in events:
            return _count_text(rest[2:], 0 if nan else v, "all").replace(" in total", "") + " in this session so far"
        texts = {"ses_minutes": f"has been in this session for {_num(round(v, 1))} {_plural(round(v, 1), 'minute')}",
                 "ses_n_items": f"looked at {_num(v)} distinct {_plural(v, 'item')} in this session",
                 "ses_n_items_carted": f"added {_num(v)} distinct {_plural(v, 'item')} to the cart in this session"}
        if name in texts and not nan:
            return texts[name]
    texts = {
        "days_since_first_event": lambda: f"was first seen {_num(round(v))} {_plural(round(v), 'day')} ago",
        "n_items": lambda: f"looked at {_num(v)} distinct {_plural(v, 'item')}",
        "n_categories": lambda: f"browsed {_num(v)} {'category' if v == 1 else 'categories'}",
        "n_items_carted_not_bought": lambda: f"has {_num(v)} {'item' if v == 1 else 'items'} in the cart never bought",
        "view_to_cart": lambda: (f"adds to the cart once every {_num(round(1 / v, 1))} views" if v > 0
                                 else "views without adding to the cart"),
        "cart_to_purchase": lambda: (f"bought {v:.0%} as often as they added to the cart" if v > 0
                                     else "added to the cart without buying"),
        "spend": lambda: f"has spent {_num(v)} in total",
        "price_mean": lambda: f"looks at items costing {_num(v)} on average",
        "price_max": lambda: f"looked at items costing up to {_num(v)}",
        "price_std": lambda: f"looks at items whose prices vary by ±{_num(v)}",
        "cart_price_mean": lambda: f"adds items costing {_num(v)} on average to the cart",
        "n_sessions": lambda: f"visited in {_num(v)} {'session' if v == 1 else 'sessions'}",
        "events_per_session": lambda: f"does {_num(round(v, 1))} {_plural(round(v, 1), 'thing')} per visit on average",
        "minutes_per_session": lambda: f"stays {_num(round(v, 1))} minutes per visit on average",
    }
    if name in texts and not nan:
        return texts[name]()
    if nan and name in _NAN_TEXT:
        return _NAN_TEXT[name]
    doc = FEATURES.get(name, name.replace("_", " "))
    return f"{doc}: {'unknown' if nan else _num(v)}"


def event_text(event: str, hours_before: float, item: Any = None, category: Any = None) -> str:
    """A sentence for one event of the history: "added item i12 (category c3) to the cart 2 hours ago"."""
    what = f"item {item}" if item is not None and item == item else "an item"
    if category is not None and category == category:
        what += f" (category {category})"
    verb = {"view": f"viewed {what}", "cart": f"added {what} to the cart",
            "remove_from_cart": f"removed {what} from the cart", "wishlist": f"added {what} to the wishlist",
            "checkout": f"went to the checkout with {what}",
            "purchase": f"bought {what}"}.get(event, f"interacted with {what} ({event})")
    return f"{verb} {ago_text(hours_before)}"
