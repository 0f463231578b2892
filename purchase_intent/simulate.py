"""The seeded shop simulator: built-in default data for ``purchase-intent quickstart``.

A simulated online shop whose log is a pure function of ``SimConfig`` (seed included), so the
tool runs end to end with no data of the user's, and so that tests and benchmarks can check that
models find signal that is known to be there.

Write a file::

    python benchmarks/make_sim_data.py --users 20000 --out sim.csv.gz

What is simulated (names in double backticks are ``SimConfig`` fields, the knobs):

* **Catalogue.** ``n_items`` items in ``n_categories`` categories of Dirichlet-distributed
  popularity; within a category item popularity is Zipf-like. Prices are log-normal by category
  (each category has its own median between 5 and 300, spread 0.35 in log space).
* **Users.** Each user has an activity level (log-normal around ``sessions_per_day``), two
  favourite categories that most of their sessions browse, and a segment: ``never_buy_share``
  browse (and even cart) but never buy; ``heavy_buyer_share`` have high intent, come twice as
  often and also buy directly; the rest are regular. ``price_sensitive_share`` of users compare
  items before they cart. ``new_user_share`` of users first arrive on a uniform day of the log
  (the rest are there from the start), and every user leaves for good with daily chance
  ``churn``, so the set of active users changes over time.
* **Latent intent that drifts.** Per user and day, intent = sigmoid(base + z + 2 * in_market):
  ``z`` is an AR(1) random walk (``z <- 0.9 z + intent_drift * N(0, 1)``), and ``in_market`` is
  a regime that switches on with daily chance ``market_on`` (x4 for heavy buyers) and off with
  ``market_off``; a purchase ends the regime with chance one half (the need is met).
* **Sessions.** A Poisson number of sessions per user and day with rate = activity x
  (0.3 + 1.4 x intent) x (``weekend_boost`` on Saturday and Sunday), + 0.8 while a revisited
  cart is pending (the user comes back to buy). Start hours follow ``HOURLY`` (quiet at night,
  a peak at 19:00-22:00 UTC); events within a session are seconds to minutes apart (log-normal
  gaps, median 30 s).
* **Funnel.** Every session browses a few items (mostly one category, often a favourite one; a
  wishlist right after 3% of views). A user's last session of the day may also carry one step
  of a shopping journey, drawn from intent and from the state left by earlier days:

  - *cart* (chance 0.03 + 0.4 intent when no cart is pending): view 1-2 items of one category
    and cart the last one; a price-sensitive user instead views 3-6 items of the category, views
    the cheapest again and carts it. It is bought in the same session with chance 0.12 (0.5
    after a comparison). With chance 0.08 + 0.3 (1 - intent) it is removed seconds later
    (``remove_from_cart``) and intent drops by ``remove_shock`` (logit), decaying over the
    following days.
  - *revisit* (chance 0.05 + 0.3 intent per later day with a session): the user views the
    carted item again among other views and leaves without buying.
  - *buy*: on a day after a revisit, the user views the carted item and buys it right after
    (chance ``revisit_buy`` per such day). Without a revisit a pending cart is rarely bought
    (0.05 per day) and expires after 14 days; a revisited cart expires after 7 days.
  - *direct* (chance (0.02 + 0.3 heavy) x intent): view an item and buy it, with a cart
    event in between in 70% of cases.

  So the order of events carries signal that counts and recencies do not: a view is a strong
  purchase signal when its item was carted in an earlier session, a comparison that ends on the
  cheapest item is a strong signal within a session, and a removal right after a cart lowers the
  chance of later purchases. Never-buyers follow the same journeys up to the purchase.

Output columns (sorted by ``ts``): ``user_id`` ("u123"), ``ts`` (int64 epoch milliseconds, UTC),
``event`` (view, cart, remove_from_cart, wishlist, purchase), ``item_id`` ("i42"), ``category``
("c7"), ``price`` (float), ``session_id`` ("s981"). The simulation steps through days with all
users at once, so the log can be produced one day at a time (``iter_event_tables``) in time
order, holding only the per-user state and one day of events: that is how ``write_events``
writes large files. The default config gives about 1.0M events (17.7k users with events, 310k
sessions, 16k purchases) in about 1.6 s; 10M events stream to a .csv.gz in under a minute
(measured on 2 busy CPU cores).
"""
from __future__ import annotations

import copy
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

# the simulated events, in this order (their index is the simulator's event code). The shop has no
# checkout step: the log, and every figure measured on it, stays what it was before `checkout` existed
EVENTS = ("view", "cart", "remove_from_cart", "wishlist", "purchase")
VIEW, CART, REMOVE, WISH, BUY = range(5)
# session kinds: plain browsing, or the journey step carried by a user's last session of the day
K_BROWSE, K_CART, K_REVISIT, K_BUY, K_DIRECT = range(5)
# share of sessions starting in each UTC hour (normalised): quiet at night, peak in the evening
HOURLY = np.array([1.0, 0.6, 0.4, 0.3, 0.3, 0.4, 0.7, 1.2, 1.8, 2.2, 2.4, 2.6,
                   2.8, 2.7, 2.6, 2.6, 2.8, 3.2, 3.8, 4.4, 4.6, 4.2, 3.0, 1.8])
HOURLY_CDF = np.r_[np.cumsum(HOURLY)[:-1] / HOURLY.sum(), 1.0]
DAY_MS = 86_400_000
SCHEMA = pa.schema([("user_id", pa.string()), ("ts", pa.int64()), ("event", pa.string()),
                    ("item_id", pa.string()), ("category", pa.string()), ("price", pa.float64()),
                    ("session_id", pa.string())])


@dataclass
class SimConfig:
    """The simulated shop; the log is a pure function of these fields."""

    n_users: int = 20_000  # shoppers
    days: int = 90  # length of the log in whole days
    seed: int = 0  # seed of every random draw
    start: str = "2024-01-01"  # first day (UTC midnight)
    n_items: int = 5_000  # catalogue size
    n_categories: int = 40  # categories (each with its own log-normal price level)
    sessions_per_day: float = 0.2  # median user's session rate at intent 0.5 (log-normal across users)
    never_buy_share: float = 0.35  # users who never buy
    heavy_buyer_share: float = 0.07  # users with high intent who also buy directly
    price_sensitive_share: float = 0.3  # users who compare 3-6 items and cart the cheapest
    intent_drift: float = 0.35  # daily step (logit) of the AR(1) random walk of intent
    market_on: float = 0.04  # daily chance a regular user enters an in-market regime
    market_off: float = 0.12  # daily chance of leaving the in-market regime
    revisit_buy: float = 0.8  # chance a session after a revisit of the carted item buys it
    remove_shock: float = 1.5  # intent drop (logit) after a remove_from_cart right after a cart
    weekend_boost: float = 1.3  # session-rate multiplier on Saturday and Sunday
    new_user_share: float = 0.4  # users whose first day is uniform over the log (the rest are there from day 0)
    churn: float = 0.01  # daily chance that a user leaves for good


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group index and position within group for groups of the given sizes."""
    group = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(len(group)) - np.repeat(np.cumsum(counts) - counts, counts)
    return group, pos


class _Shop:
    """Catalogue, users and their day-to-day state; ``day(d)`` simulates one day."""

    def __init__(self, cfg: SimConfig):
        if cfg.n_items < cfg.n_categories or cfg.n_categories < 1 or cfg.n_users < 0 or cfg.days < 0:
            raise ValueError(f"need n_items >= n_categories >= 1 and n_users, days >= 0, got {cfg}")
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(cfg.seed)
        C, I, U = cfg.n_categories, cfg.n_items, cfg.n_users
        # catalogue: items sorted by category, so category c owns items [off[c], off[c+1])
        self.cat_pop = rng.dirichlet(np.full(C, 0.8))
        self.cat_cdf = np.cumsum(self.cat_pop)
        self.cat_cdf[-1] = 1.0
        sizes = 1 + rng.multinomial(I - C, 0.5 * self.cat_pop + 0.5 / C)
        self.item_cat = np.repeat(np.arange(C), sizes)  # (I,)
        mu = rng.uniform(np.log(5), np.log(300), C)
        self.price = np.round(np.exp(mu[self.item_cat] + 0.35 * rng.standard_normal(I)), 2)
        _, rank = _ragged(sizes)
        w = 1.0 / (rank + 1.0) ** 0.9
        cum = np.cumsum(w)
        ends = np.cumsum(sizes) - 1
        within = cum - np.repeat(np.r_[0.0, cum[ends[:-1]]], sizes)
        # cumulative popularity shifted by the category: item = searchsorted(., c + u), u in [0, 1)
        self.item_cum = self.item_cat + within / np.repeat(within[ends], sizes)
        self.item_cum[ends] = np.arange(1, C + 1)
        # users
        seg = rng.random(U)
        self.buyer = (seg >= cfg.never_buy_share).astype(float)
        self.heavy = seg >= 1.0 - cfg.heavy_buyer_share
        self.base = np.where(self.heavy, rng.normal(0.5, 0.5, U), rng.normal(-1.5, 0.7, U))
        self.activity = cfg.sessions_per_day * np.exp(1.0 * rng.standard_normal(U)) * np.where(self.heavy, 2.0, 1.0)
        self.fav = rng.choice(C, size=(U, 2), p=self.cat_pop)
        self.price_sensitive = rng.random(U) < cfg.price_sensitive_share
        self.arrival = np.where(rng.random(U) < cfg.new_user_share, rng.integers(0, max(cfg.days, 1), U), 0)
        self.gone = np.zeros(U, dtype=bool)
        self.p_on = np.where(self.heavy, 4 * cfg.market_on, cfg.market_on)
        # state
        self.z = 0.5 * rng.standard_normal(U)
        self.market = rng.random(U) < self.p_on / (self.p_on + cfg.market_off)
        self.cart = np.full(U, -1)  # pending carted item, -1 = none
        self.cart_day = np.zeros(U, dtype=np.int64)
        self.revisit_day = np.full(U, -1)  # day the pending cart was viewed again, -1 = not yet
        self.n_sessions = 0
        start = pd.Timestamp(cfg.start)
        self.start_ms = int(start.value // 1_000_000)
        self.start_dow = start.day_of_week

    def items(self, cats: np.ndarray) -> np.ndarray:
        """One item per entry of ``cats``, by popularity within the category."""
        return np.searchsorted(self.item_cum, cats + self.rng.random(len(cats)), side="right")

    def category(self, users: np.ndarray, p_fav: float) -> np.ndarray:
        """A favourite category of each user with probability p_fav, else one by popularity."""
        rng = self.rng
        fav = self.fav[users, rng.integers(0, 2, len(users))]
        other = np.searchsorted(self.cat_cdf, rng.random(len(users)), side="right")
        return np.where(rng.random(len(users)) < p_fav, fav, other)

    def day(self, d: int) -> dict[str, np.ndarray]:
        """Simulate day ``d``: returns this day's events (arrays, grouped by session) and updates state."""
        cfg, rng, U = self.cfg, self.rng, self.cfg.n_users
        intent = 1.0 / (1.0 + np.exp(-(self.base + self.z + 2.0 * self.market)))  # (U,)
        pending, revisited = self.cart >= 0, self.revisit_day >= 0
        weekly = cfg.weekend_boost if (self.start_dow + d) % 7 >= 5 else 1.0
        rate = self.activity * (0.3 + 1.4 * intent) * weekly + 0.8 * (pending & revisited)
        rate *= (self.arrival <= d) & ~self.gone
        n = np.minimum(rng.poisson(rate), 6)  # (U,) sessions today

        # the journey step of each user's last session today
        has, r = n > 0, rng.random(U)
        kind = np.full(U, K_BROWSE)
        after = has & pending & revisited & (self.revisit_day < d)
        kind[after & (r < cfg.revisit_buy * self.buyer)] = K_BUY
        before = has & pending & ~revisited
        p_rev = 0.05 + 0.3 * intent
        kind[before & (r < p_rev)] = K_REVISIT
        kind[before & (r >= p_rev) & (r < p_rev + 0.05 * self.buyer)] = K_BUY
        free = has & ~pending
        p_direct = (0.02 + 0.3 * self.heavy) * intent * self.buyer
        p_cart = 0.03 + 0.4 * intent
        kind[free & (r < p_direct)] = K_DIRECT
        kind[free & (r >= p_direct) & (r < p_direct + p_cart)] = K_CART

        # sessions, grouped by user and ordered by start time
        su = np.repeat(np.arange(U), n)  # (S,)
        S = len(su)
        hour = np.searchsorted(HOURLY_CDF, rng.random(S), side="right")
        start = self.start_ms + d * DAY_MS + hour * 3_600_000 + rng.integers(0, 3_600_000, S)
        order = np.lexsort((start, su))
        su, start = su[order], start[order]
        last = np.r_[su[1:] != su[:-1], True] if S else np.zeros(0, bool)
        skind = np.where(last, kind[su], K_BROWSE)
        sid = self.n_sessions + np.arange(S)
        self.n_sessions += S

        # browsing: mostly the session's own category, often a favourite one
        nb = rng.geometric(0.35, S) - (skind != K_BROWSE)
        scat = self.category(su, 0.6)
        g, pos = _ragged(nb)
        cats = np.where(rng.random(len(g)) < 0.75, scat[g], self.category(su[g], 0.0))
        bitem = self.items(cats)
        wish = rng.random(len(g)) < 0.03
        parts = [(g, pos.astype(float), np.full(len(g), VIEW), bitem),
                 (g[wish], pos[wish] + 0.5, np.full(int(wish.sum()), WISH), bitem[wish])]

        # cart: compare items of one category (the cheapest for price-sensitive users), cart one
        cs = np.flatnonzero(skind == K_CART)
        cu = su[cs]
        ps = self.price_sensitive[cu]
        ncmp = np.where(ps, rng.integers(3, 7, len(cs)), rng.integers(1, 3, len(cs)))
        cg, cpos = _ragged(ncmp)
        citem = self.items(self.category(cu, 0.7)[cg])
        # chosen item: the cheapest for price-sensitive users, else the last one viewed
        key = np.where(ps[cg], self.price[citem], -cpos)
        first = np.lexsort((key, cg))
        first = first[np.r_[True, cg[first][1:] != cg[first][:-1]]] if len(cg) else first
        chosen = citem[first]  # (len(cs),)
        base = nb[cs] + 1.0
        tail = base + ncmp
        removed = rng.random(len(cs)) < 0.08 + 0.3 * (1 - intent[cu])
        bought = ~removed & (rng.random(len(cs)) < np.where(ps, 0.5, 0.12) * self.buyer[cu])
        parts += [(cs[cg], base[cg] + cpos, np.full(len(cg), VIEW), citem),
                  (cs[ps], tail[ps], np.full(int(ps.sum()), VIEW), chosen[ps]),
                  (cs, tail + 1, np.full(len(cs), CART), chosen),
                  (cs[removed], tail[removed] + 2, np.full(int(removed.sum()), REMOVE), chosen[removed]),
                  (cs[bought], tail[bought] + 2, np.full(int(bought.sum()), BUY), chosen[bought])]

        # revisit: the carted item viewed again somewhere among the session's views
        rs = np.flatnonzero(skind == K_REVISIT)
        parts.append((rs, rng.uniform(-0.5, nb[rs] + 0.5), np.full(len(rs), VIEW), self.cart[su[rs]]))
        # buy a pending cart: view it, then purchase it
        bs = np.flatnonzero(skind == K_BUY)
        bitems = self.cart[su[bs]]
        parts += [(bs, nb[bs] + 1.0, np.full(len(bs), VIEW), bitems),
                  (bs, nb[bs] + 2.0, np.full(len(bs), BUY), bitems)]
        # direct purchase: view, cart, purchase
        ds = np.flatnonzero(skind == K_DIRECT)
        ditems = self.items(self.category(su[ds], 0.8))
        carted = rng.random(len(ds)) < 0.7  # else "buy now" without a cart
        parts += [(ds, nb[ds] + 1.0, np.full(len(ds), VIEW), ditems),
                  (ds[carted], nb[ds][carted] + 2.0, np.full(int(carted.sum()), CART), ditems[carted]),
                  (ds, nb[ds] + 3.0, np.full(len(ds), BUY), ditems)]

        # events of a session follow each other by seconds to minutes
        es, epos, ev, item = (np.concatenate(x) for x in zip(*parts))
        o = np.lexsort((epos, es))
        es, ev, item = es[o], ev[o], item[o]
        gap = np.minimum(np.exp(rng.normal(np.log(30_000), 1.0, len(es))), 1_800_000).astype(np.int64) + 1
        csum = np.cumsum(gap)
        first_of = np.r_[True, es[1:] != es[:-1]] if len(es) else np.zeros(0, bool)
        offset = np.maximum.accumulate(np.where(first_of, csum - gap, 0)) if len(es) else csum
        ts = start[es] + csum - gap - offset

        # state for the next days
        self._update(d, kind, cu, chosen, removed, bought)
        return {"user": su[es], "ts": ts, "event": ev, "item": item, "session": sid[es]}

    def _update(self, d, kind, cu, chosen, removed, bought) -> None:
        cfg, rng, U = self.cfg, self.rng, self.cfg.n_users
        self.cart[cu[removed | bought]] = -1
        self.z[cu[removed]] -= cfg.remove_shock
        keep = ~removed & ~bought
        self.cart[cu[keep]] = chosen[keep]
        self.cart_day[cu[keep]] = d
        self.revisit_day[cu[keep]] = -1
        self.revisit_day[kind == K_REVISIT] = d
        buy = (kind == K_BUY) | (kind == K_DIRECT)
        buy[cu[bought]] = True
        self.cart[kind == K_BUY] = -1
        self.revisit_day[kind == K_BUY] = -1
        stale = (self.cart >= 0) & (
            ((self.revisit_day < 0) & (d - self.cart_day >= 14))
            | ((self.revisit_day >= 0) & (d - self.revisit_day >= 7))
        )
        self.cart[stale] = -1
        self.revisit_day[stale] = -1
        self.z = 0.9 * self.z + cfg.intent_drift * rng.standard_normal(U)
        self.gone |= (self.arrival <= d) & (rng.random(U) < cfg.churn)
        u = rng.random(U)
        self.market = np.where(self.market, u >= cfg.market_off, u < self.p_on) & ~(buy & (rng.random(U) < 0.5))


def _days(shop: _Shop) -> Iterator[dict[str, np.ndarray]]:
    """The log as arrays of codes (user, ts, event, item, session), one day at a time, in time order.

    Sessions that start before midnight and end after it are carried to the next day's chunk,
    so the concatenation of the chunks is sorted by ``ts``.
    """
    cfg = shop.cfg
    carry: dict[str, np.ndarray] | None = None
    for d in range(cfg.days):
        chunk = shop.day(d)
        if carry is not None:
            chunk = {k: np.concatenate([carry[k], chunk[k]]) for k in chunk}
        o = np.argsort(chunk["ts"], kind="stable")
        chunk = {k: v[o] for k, v in chunk.items()}
        if d < cfg.days - 1:
            cut = np.searchsorted(chunk["ts"], shop.start_ms + (d + 1) * DAY_MS)
            carry = {k: v[cut:] for k, v in chunk.items()}
            chunk = {k: v[:cut] for k, v in chunk.items()}
        yield chunk


def purchase_chance(cfg: SimConfig, days: list[int], horizon_days: int, n_rollouts: int = 200,
                    seed: int = 0) -> dict[int, np.ndarray]:
    """Each user's chance of at least one purchase in ``[start + d days, start + d + horizon_days days)``,
    given the simulator's whole latent state at midnight of day ``d``, for every ``d`` in ``days``.

    The shop is replayed with ``cfg`` (the same log as ``iter_event_tables``) up to each day, its state
    copied, and the next ``horizon_days`` simulated ``n_rollouts`` times with fresh random draws (seeded
    by ``seed``, ``d`` and the rollout). A purchase already decided before midnight (the end of a session
    that started the day before) counts as certain. The state holds what no log shows (the intent's random
    walk, the in-market regime, the segment), so ranking users by this chance is the best any model of
    the log can do, up to Monte Carlo noise: its ROC-AUC is a ceiling for every model's.

    Returns ``{d: (n_users,) float64}``, indexed by the user number of ``user_id`` ("u123" -> 123).
    """
    if n_rollouts < 1 or horizon_days < 1:
        raise ValueError(f"need n_rollouts >= 1 and horizon_days >= 1, got {n_rollouts}, {horizon_days}")
    wanted = sorted(set(int(d) for d in days))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < cfg.days:
        raise ValueError(f"days must lie in [0, {cfg.days}), got {wanted[0]}..{wanted[-1]}")
    shop, U = _Shop(cfg), cfg.n_users
    decided = np.zeros(U, dtype=bool)  # bought after midnight in a session started the day before
    out: dict[int, np.ndarray] = {}
    for d in range(wanted[-1] + 1 if wanted else 0):
        if d in wanted:
            hits = np.zeros(U)
            for r in range(n_rollouts):
                future = copy.deepcopy(shop)
                future.rng = np.random.default_rng([seed, d, r])
                bought = decided.copy()
                for k in range(d, min(d + horizon_days, cfg.days)):
                    ev = future.day(k)
                    bought[ev["user"][ev["event"] == BUY]] = True
                hits += bought
            out[d] = hits / n_rollouts
        ev = shop.day(d)
        decided[:] = False
        decided[ev["user"][(ev["event"] == BUY) & (ev["ts"] >= shop.start_ms + (d + 1) * DAY_MS)]] = True
    return out


def iter_event_tables(cfg: SimConfig) -> Iterator[pa.Table]:
    """Yield the log as Arrow tables (schema ``SCHEMA``), one day at a time, in time order.

    Memory holds the per-user state and one day of events, so any number of users and days can
    be streamed to a file (see ``write_events``).
    """
    shop = _Shop(cfg)
    names = {
        "user": pa.array([f"u{i}" for i in range(cfg.n_users)]),
        "item": pa.array([f"i{i}" for i in range(cfg.n_items)]),
        "cat": pa.array([f"c{c}" for c in range(cfg.n_categories)]),
        "event": pa.array(EVENTS),
    }
    for chunk in _days(shop):
        item, session = chunk["item"], chunk["session"]
        # format each session id once, then gather: far cheaper than formatting per event
        lo = int(session.min()) if len(session) else 0
        numbers = pc.cast(pa.array(np.arange(lo, int(session.max(initial=lo)) + 1)), pa.string())
        sids = pc.binary_join_element_wise("s", numbers, "")
        yield pa.Table.from_pydict({
            "user_id": pc.take(names["user"], pa.array(chunk["user"])),
            "ts": pa.array(chunk["ts"], type=pa.int64()),
            "event": pc.take(names["event"], pa.array(chunk["event"])),
            "item_id": pc.take(names["item"], pa.array(item)),
            "category": pc.take(names["cat"], pa.array(shop.item_cat[item])),
            "price": pa.array(shop.price[item], type=pa.float64()),
            "session_id": pc.take(sids, pa.array(session - lo)),
        }, schema=SCHEMA)


def simulate(cfg: SimConfig | None = None) -> pd.DataFrame:
    """Simulate the shop's event log.

    Parameters
    ----------
    cfg : SimConfig, optional
        The shop; default ``SimConfig()`` (20,000 users, 90 days).

    Returns
    -------
    pandas.DataFrame
        Columns user_id (str), ts (int64 epoch ms, UTC), event (str), item_id (str),
        category (str), price (float64), session_id (str); sorted by ts; index 0..n-1.
    """
    cfg = cfg or SimConfig()
    tables = list(iter_event_tables(cfg))
    return pa.concat_tables(tables or [SCHEMA.empty_table()]).to_pandas()


def write_events(cfg: SimConfig, path: str | Path) -> int:
    """Write the simulated log to ``path`` one day at a time and return the number of rows.

    The format follows the extension: ``.parquet`` / ``.pq`` (Parquet), ``.csv`` or ``.csv.gz``
    (CSV with a header; gzip when the name ends in ``.gz``). The file is written under a
    temporary name and renamed when complete.
    """
    path = Path(path)
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)  # --out logs/events.csv.gz into a folder not made yet
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    tables = iter_event_tables(cfg)
    if name.endswith((".parquet", ".pq")):
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for t in tables:
                writer.write_table(t)
                rows += t.num_rows
    elif name.endswith((".csv", ".csv.gz")):
        # mtime=0 keeps the gzip bytes a function of the config; level 1 keeps 10M rows fast
        raw = gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) if name.endswith(".gz") else open(tmp, "wb")
        with raw, pcsv.CSVWriter(raw, SCHEMA) as writer:
            for t in tables:
                writer.write_table(t)
                rows += t.num_rows
    else:
        raise ValueError(f"cannot tell the format of {path}: use .csv, .csv.gz or .parquet")
    tmp.replace(path)
    return rows
