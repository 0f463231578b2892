"""The time split and the rolling-origin backtest folds of built examples.

The split is by time only: the last periods are test, the ones before valid, the rest train, and
an example whose label window reaches into a later split is set aside as ``gap`` (so no training
label is decided by events that validation / test examples are predicted before). Backtest folds
roll the test window over the last periods with the same rule. Examples come from
``labels.build_examples`` (``period``, ``cutoff``, ``label_end``, ``label``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import LabelConfig
from .times import EPOCH

SPLITS = ("train", "valid", "test")


class TooFewPeriods(ValueError):
    """The examples' periods cannot hold the test, valid and train splits (or the backtest folds)."""


def human_time(t) -> str:
    """A cutoff or window edge as people write it: ISO 8601, without a fraction of a second when it
    has none. Session cutoffs and label ends are 1 microsecond after the last event they include (the
    bound is exclusive); such a value prints as that event's time, e.g. ``2019-10-01T00:00:00`` for
    ``2019-10-01T00:00:00.000001``. A time that truly has microseconds keeps them. ``None`` prints as ``-``."""
    if t is None:
        return "-"
    t = pd.Timestamp(t).to_pydatetime()
    if t.microsecond % 1000 == 1:
        t -= timedelta(microseconds=1)
    us = t.microsecond
    return t.isoformat(timespec="seconds" if us == 0 else "milliseconds" if us % 1000 == 0 else "microseconds")


def _columns(examples) -> dict[str, np.ndarray]:
    """period, cutoff, label_end (int64 microseconds) and label of an Arrow table or DataFrame."""
    df = examples.to_pandas() if isinstance(examples, pa.Table) else examples
    us = lambda c: pd.to_datetime(df[c]).astype("datetime64[us]").to_numpy().astype(np.int64)  # noqa: E731
    return {"period": df["period"].to_numpy(np.int64), "cutoff": us("cutoff"),
            "label_end": us("label_end"), "label": df["label"].to_numpy(np.int64)}


def _assign(cols: dict[str, np.ndarray], groups: list[tuple[str, list[int]]]) -> tuple[np.ndarray, int]:
    """Mark examples of each (name, periods) group in time order, then apply the gap rule: an
    example of a group whose label_end is after the first cutoff of a later group becomes 'gap'."""
    split = np.full(len(cols["period"]), "", dtype="<U5")
    for name, periods in groups:
        split[np.isin(cols["period"], periods)] = name
    n_gap = int((split == "").sum())  # periods skipped between splits
    split[split == ""] = "gap"
    for i, (name, _) in enumerate(groups[:-1]):
        later = np.isin(split, [g for g, _ in groups[i + 1:]])
        if not later.any():
            continue
        first_later = cols["cutoff"][later].min()
        bad = (split == name) & (cols["label_end"] > first_later)
        split[bad] = "gap"
        n_gap += int(bad.sum())
    return split, n_gap


@dataclass
class SplitInfo:
    """Per split: n, positives, positive_rate, periods, first/last cutoff; plus the gap count."""

    splits: dict[str, dict] = field(default_factory=dict)
    n_gap: int = 0

    def describe(self) -> str:
        lines = [f"{'split':6} {'n':>9} {'pos':>8} {'rate':>7}  periods   cutoffs"]
        for name, s in self.splits.items():
            lines.append(f"{name:6} {s['n']:>9} {s['positives']:>8} {s['positive_rate']:>7.4f}  "
                         f"{s['periods'][0]:>3}-{s['periods'][-1]:<3}   "
                         f"{human_time(s['first_cutoff'])} .. {human_time(s['last_cutoff'])}"
                         if s["n"] else f"{name:6} {0:>9}")
        lines.append(f"gap    {self.n_gap:>9}  (label window reaches into a later split; excluded)")
        for name in ("valid", "test"):
            s = self.splits.get(name)
            if s and s["n"] and not s["positives"]:
                lines.append(f"warning: {name} holds no positive example: "
                             + ("early stopping, calibration and the choice of the best model read nothing from it"
                                if name == "valid" else "ROC-AUC and PR-AUC on it are undefined")
                             + f"; give it more periods (--{name}-cutoffs) or use a longer --step")
        return "\n".join(lines)

    __str__ = describe


def _info(cols: dict[str, np.ndarray], split: np.ndarray, n_gap: int) -> SplitInfo:
    info = SplitInfo(n_gap=n_gap)
    for name in SPLITS:
        m = split == name
        if not m.any():
            info.splits[name] = {"n": 0, "positives": 0, "positive_rate": float("nan"), "periods": [],
                                 "first_cutoff": None, "last_cutoff": None}
            continue
        ts = lambda v: (EPOCH + timedelta(microseconds=int(v))).isoformat()  # noqa: E731
        info.splits[name] = {
            "n": int(m.sum()), "positives": int(cols["label"][m].sum()),
            "positive_rate": float(cols["label"][m].mean()),
            "periods": sorted(int(p) for p in np.unique(cols["period"][m])),
            "first_cutoff": ts(cols["cutoff"][m].min()), "last_cutoff": ts(cols["cutoff"][m].max()),
        }
    return info


def split_examples(examples, cfg: LabelConfig) -> tuple[np.ndarray, SplitInfo]:
    """Time split: the last ``cfg.test_cutoffs`` periods are test, the ``cfg.valid_cutoffs`` before
    them valid, the rest train; never random.

    Gap rule: an example of an earlier split whose label_end is after the first cutoff of a later
    split is marked ``"gap"`` (counted, excluded from every split), so no training label is
    decided by events the validation/test examples are predicted before.

    Parameters
    ----------
    examples : pyarrow.Table or pandas.DataFrame with period, cutoff, label_end, label.
    cfg : LabelConfig (valid_cutoffs, test_cutoffs).

    Returns
    -------
    split : ndarray (n,) of "train" / "valid" / "test" / "gap"
    info : SplitInfo (``print(info)`` shows sizes, positive rates, date ranges)
    """
    cols = _columns(examples)
    periods = sorted(int(p) for p in np.unique(cols["period"]))
    n_test, n_valid = int(cfg.test_cutoffs), int(cfg.valid_cutoffs)
    if n_test < 1 or n_valid < 0 or len(periods) < n_test + n_valid + 1:
        raise TooFewPeriods(f"{len(periods)} periods cannot hold {n_test} test + {n_valid} valid periods "
                            f"and at least one train period: use more data or a smaller step")
    test = periods[-n_test:]
    train, valid = _before(cols, periods[:-n_test], test, n_valid)
    split, n_gap = _assign(cols, [("train", train), ("valid", valid), ("test", test)])
    if not (split == "train").any():  # every train period's label windows reach past the next split
        raise TooFewPeriods(f"no train example is left: the label windows of the {len(train)} train period(s) all "
                            f"reach past the first validation cutoff, so their examples fall in the gap: use more "
                            f"data, a shorter --horizon or a longer --step")
    return split, _info(cols, split, n_gap)


def _before(cols: dict[str, np.ndarray], earlier: list[int], test: list[int], n_valid: int
            ) -> tuple[list[int], list[int]]:
    """(train, valid) periods before the test periods.

    Valid is the latest `n_valid` periods whose label windows close by the first test cutoff; when
    the horizon is longer than the step, the periods in between would only be gap, so they are
    skipped (and counted as gap) rather than emptying the validation split.
    """
    first_test = cols["cutoff"][np.isin(cols["period"], test)].min()
    valid: list[int] = []
    for p in reversed(earlier):
        if len(valid) == n_valid:
            break
        in_p = cols["period"] == p
        if np.mean(cols["label_end"][in_p] <= first_test) >= 0.5:
            valid.insert(0, p)
    if n_valid and len(valid) < n_valid:
        raise TooFewPeriods("no period before the test window has label windows that close before it: "
                            "use more data, a shorter horizon or a longer step")
    train = [p for p in earlier if p < min(valid)] if valid else list(earlier)
    if not train:
        raise TooFewPeriods("no train period is left before the validation window: use more data or a smaller step")
    return train, valid


@dataclass
class Fold:
    """One backtest fold: boolean masks (n,) over the examples and the fold's test window."""

    index: int
    test_period: int
    cutoff: datetime  # first cutoff of the test window
    train_mask: np.ndarray
    valid_mask: np.ndarray
    test_mask: np.ndarray
    n_gap: int


def backtest_folds(examples, k: int, cfg: LabelConfig) -> list[Fold]:
    """Rolling-origin backtest: each of the last ``k`` periods in turn is the test window, the
    ``cfg.valid_cutoffs`` periods before it valid, every earlier period train (later periods are in
    no mask). The gap rule of ``split_examples`` applies within each fold. Oldest fold first."""
    cols = _columns(examples)
    periods = sorted(int(p) for p in np.unique(cols["period"]))
    n_valid = int(cfg.valid_cutoffs)
    if k < 1 or len(periods) < k + n_valid + 1:
        most = len(periods) - n_valid - 1
        hint = f": use --backtest {most} or fewer" if most >= 1 else ": use more data or a smaller step"
        raise TooFewPeriods(f"{len(periods)} periods cannot hold {k} backtest folds with {n_valid} valid "
                            f"period(s) and a train period each{hint}")
    folds = []
    for i, p in enumerate(periods[-k:]):
        j = periods.index(p)
        train, valid = _before(cols, periods[:j], [p], n_valid)
        split, n_gap = _assign(cols, [("train", train), ("valid", valid), ("test", [p])])
        n_gap -= int((cols["period"] > p).sum())  # later periods are outside this fold, not gap
        test = split == "test"
        folds.append(Fold(index=i, test_period=p,
                          cutoff=EPOCH + timedelta(microseconds=int(cols["cutoff"][test].min())),
                          train_mask=split == "train", valid_mask=split == "valid", test_mask=test, n_gap=n_gap))
    return folds
