"""Tabular mode: data that is already one row per session or user, with a 0/1 label column.

Reads a CSV or Parquet file, parses the label (TRUE/FALSE, yes/no, 1/0), one-hot encodes
low-cardinality string columns (categories learned on the training rows only) and keeps numeric
columns as they are. The split is by time when a time column is given (train, valid, test in
time order; whole time values are never cut across splits; month names such as ``Jan`` or
``June`` are understood), otherwise a seeded stratified split with a warning that no time order
is known. Nothing is oversampled. Each model is trained, then scored on test with
``evaluate.binary_metrics`` plus F1 at 0.5 and at the threshold that maximises F1 on valid.

Run::

    purchase-intent run --table data.csv --label Revenue [--time-column Month] [--drop col1,col2]
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from . import evaluate
from .models import MODELS, SEQUENCE_MODELS, check_min_data

TRUE_WORDS = {"true", "t", "yes", "y", "1", "1.0"}
FALSE_WORDS = {"false", "f", "no", "n", "0", "0.0"}
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december")


def read_table(path) -> pd.DataFrame:
    """Read ``.csv``/``.csv.gz``/``.tsv`` or ``.parquet`` into a DataFrame."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".tsv", ".tsv.gz")):
        return pd.read_csv(path, sep="\t")
    return pd.read_csv(path)


def parse_label(values: pd.Series) -> np.ndarray:
    """Map a label column to 0/1 (booleans, 0/1 numbers, true/false, yes/no, t/f, y/n).

    Missing labels are not allowed here (drop them before). Raises ``ValueError`` naming the
    values it does not understand.
    """
    if values.isna().any():
        raise ValueError(f"label column {values.name!r} has {int(values.isna().sum())} missing values")
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy().astype(np.int64)
    words = values.astype(str).str.strip().str.lower()
    unknown = sorted(set(words) - TRUE_WORDS - FALSE_WORDS)
    if unknown:
        raise ValueError(
            f"cannot read label column {values.name!r} as 0/1: unexpected values {unknown[:5]} "
            f"(accepted: {sorted(TRUE_WORDS)} and {sorted(FALSE_WORDS)})"
        )
    return words.isin(TRUE_WORDS).to_numpy().astype(np.int64)


def _month_number(word: str) -> Optional[int]:
    w = word.strip().lower().rstrip(".")
    if len(w) >= 3:
        for i, full in enumerate(MONTHS):
            if full.startswith(w):
                return i + 1
    return None


def parse_time_column(values: pd.Series) -> np.ndarray:
    """A sortable float key per row: numbers as they are, month names as 1..12, else datetimes.

    Month names carry no year, so their order (Jan..Dec) is only the order within one year.
    """
    if values.isna().any():
        raise ValueError(f"time column {values.name!r} has {int(values.isna().sum())} missing values")
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64)
    if pd.api.types.is_datetime64_any_dtype(values):
        return values.astype("datetime64[us]").astype(np.int64).to_numpy(dtype=np.float64)
    words = values.astype(str)
    months = {w: _month_number(w) for w in words.unique()}
    if all(m is not None for m in months.values()):
        return words.map(months).to_numpy(dtype=np.float64)
    parsed = pd.to_datetime(words, errors="raise", utc=True, format="mixed").dt.tz_localize(None)
    return parsed.astype("datetime64[us]").astype(np.int64).to_numpy(dtype=np.float64)


def split_by_time(time_key: np.ndarray, fractions=(0.7, 0.1, 0.2)) -> np.ndarray:
    """0 (train) / 1 (valid) / 2 (test) per row, in time order, near the given fractions.

    Rows that share a time value stay in one split, so the cut points fall between distinct
    values (for month-level data the fractions are therefore only approximate).
    """
    times, inverse, counts = np.unique(time_key, return_inverse=True, return_counts=True)
    if times.size < 3:
        raise ValueError(f"a time split needs at least 3 distinct time values, got {times.size}")
    cum = np.cumsum(counts) / counts.sum()  # share of rows up to and including each time value
    train_end = 1 + int(np.argmin(np.abs(cum[: times.size - 2] - fractions[0])))
    target = fractions[0] + fractions[1]
    valid_end = train_end + 1 + int(np.argmin(np.abs(cum[train_end : times.size - 1] - target)))
    part = np.zeros(times.size, dtype=np.int64)
    part[train_end:valid_end] = 1
    part[valid_end:] = 2
    return part[inverse.ravel()]


def split_stratified(y: np.ndarray, seed: int = 0, fractions=(0.7, 0.1, 0.2)) -> np.ndarray:
    """0/1/2 per row from a seeded split stratified by label (for data without any time order)."""
    idx = np.arange(y.size)
    n_test, n_valid = round(fractions[2] * y.size), round(fractions[1] * y.size)  # counts, not float shares
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    _, valid = train_test_split(rest, test_size=n_valid, stratify=y[rest], random_state=seed)
    part = np.zeros(y.size, dtype=np.int64)
    part[valid] = 1
    part[test] = 2
    return part


class TableEncoder:
    """Numeric columns as floats, low-cardinality string columns one-hot (categories from fit data).

    Unseen or missing categories encode as all zeros. String columns with more than
    ``max_categories`` distinct values are dropped and listed in ``dropped_``.
    """

    def __init__(self, max_categories: int = 50):
        self.max_categories = max_categories

    def fit(self, df: pd.DataFrame) -> "TableEncoder":
        self.numeric_, self.categories_, self.dropped_ = [], {}, []
        for col in df.columns:
            s = df[col]
            if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
                self.numeric_.append(col)
                continue
            cats = sorted(s.dropna().astype(str).unique())
            if len(cats) <= self.max_categories:
                self.categories_[col] = cats
            else:
                self.dropped_.append(col)
        self.feature_names_ = list(self.numeric_) + [
            f"{col}={c}" for col, cats in self.categories_.items() for c in cats
        ]
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Shape (n, len(feature_names_)), float64, NaN where a numeric value is missing."""
        parts = [df[self.numeric_].astype(np.float64).to_numpy()] if self.numeric_ else []
        for col, cats in self.categories_.items():
            values = df[col].astype(str).where(df[col].notna(), None).to_numpy()
            parts.append((values[:, None] == np.asarray(cats, dtype=object)[None, :]).astype(np.float64))
        return np.hstack(parts) if parts else np.zeros((len(df), 0))

    def to_dict(self) -> dict:
        return {"max_categories": self.max_categories, "numeric": self.numeric_,
                "categories": self.categories_, "dropped": self.dropped_}


def _split_summary(part, y, time_raw, time_key) -> dict:
    out = {}
    for k, name in enumerate(("train", "valid", "test")):
        mask = part == k
        entry = {"n": int(mask.sum()), "positives": int(y[mask].sum())}
        if time_raw is not None and mask.any():
            rows = np.flatnonzero(mask)
            entry["time_first"] = str(time_raw[rows[np.argmin(time_key[rows])]])
            entry["time_last"] = str(time_raw[rows[np.argmax(time_key[rows])]])
        out[name] = entry
    return out


def run_table(path, label: str, time_column: Optional[str] = None, models: Sequence[str] = ("logreg", "lightgbm"),
              seed: int = 0, fractions=(0.7, 0.1, 0.2), drop_columns: Sequence[str] = (), n_boot: int = 1000,
              min_positives: int = 100, min_negatives: int = 100, model_params: Optional[dict] = None,
              out_dir=None, verbose: bool = True) -> dict:
    """Train and evaluate tabular models on a one-row-per-example table.

    Parameters
    ----------
    path : str or Path
        CSV or Parquet file.
    label : str
        The label column (booleans, 0/1, true/false, yes/no).
    time_column : str, optional
        Column giving each row's time (timestamps, numbers or month names). With it the split is
        by time and the column is not used as a feature; without it the split is a seeded,
        stratified random split and a warning says so.
    models : sequence of str
        Registry names of tabular models.
    seed : int
        Seed of the split, the models and the bootstrap.
    fractions : (train, valid, test)
        Target shares of the three splits.
    drop_columns : sequence of str
        Columns never used as features (e.g. ids).
    n_boot : int
        Bootstrap resamples for the test ROC-AUC interval.
    min_positives, min_negatives : int
        Minimum-data gate on the training split.
    model_params : dict, optional
        Model name -> keyword hyperparameters for its builder.
    out_dir : str or Path, optional
        When given, each model is saved to ``out_dir/<model>/`` and the result to
        ``out_dir/metrics.json``.
    verbose : bool
        Print the comparison table.

    Returns
    -------
    dict
        ``{"data": {...}, "split": {...}, "models": {name: {"valid", "test", "f1"}},
        "paired": {...}, "table": str, "warnings": [...]}``; JSON-serialisable.
    """
    df = read_table(path)
    if label not in df.columns:
        raise ValueError(f"label column {label!r} not in {list(df.columns)}")
    missing = int(df[label].isna().sum())
    if missing:
        df = df[df[label].notna()].reset_index(drop=True)
    y = parse_label(df[label])
    notes = [f"dropped {missing} rows without a label"] if missing else []

    if time_column is not None:
        if time_column not in df.columns:
            raise ValueError(f"time column {time_column!r} not in {list(df.columns)}")
        time_key = parse_time_column(df[time_column])
        part = split_by_time(time_key, fractions)
        protocol = "time"
    else:
        time_key = None
        part = split_stratified(y, seed, fractions)
        protocol = "stratified"
        notes.append("no time column given: the split is a seeded stratified random split, so test rows are "
                     "not later than training rows; pass a time column for a time split")
        warnings.warn(notes[-1], UserWarning, stacklevel=2)

    feature_cols = [c for c in df.columns if c not in {label, time_column, *drop_columns}]
    train, valid, test = (part == 0), (part == 1), (part == 2)
    check_min_data(y[train], min_positives, min_negatives, what="the training split")
    encoder = TableEncoder().fit(df.loc[train, feature_cols])
    if encoder.dropped_:
        notes.append(f"dropped high-cardinality text columns: {encoder.dropped_}")
    X = encoder.transform(df[feature_cols])  # (n, F)

    result = {
        "data": {"path": str(path), "label": label, "rows": int(len(df)), "positives": int(y.sum()),
                 "features": encoder.feature_names_, "encoder": encoder.to_dict()},
        "split": {"protocol": protocol, "time_column": time_column, "fractions": list(fractions), "seed": seed,
                  **_split_summary(part, y, df[time_column].to_numpy() if time_column else None, time_key)},
        "models": {},
        "warnings": notes,
    }
    probas = {}
    for name in models:
        if name in SEQUENCE_MODELS:
            raise ValueError(f"{name!r} needs event sequences; "
                             f"tabular mode supports {sorted(set(MODELS) - SEQUENCE_MODELS)}")
        params = {"random_state": seed, **(model_params or {}).get(name, {})}
        model = MODELS[name](**params).fit(X[train], y[train], X_valid=X[valid], y_valid=y[valid])
        p_valid, p_test = model.predict_proba(X[valid])[:, 1], model.predict_proba(X[test])[:, 1]
        threshold, f1_valid = evaluate.best_f1_threshold(y[valid], p_valid)
        result["models"][name] = {
            "valid": evaluate.binary_metrics(y[valid], p_valid, n_boot=0),
            "test": evaluate.binary_metrics(y[test], p_test, n_boot=n_boot, seed=seed),
            "f1": {
                "threshold": threshold,
                "valid_at_threshold": f1_valid,
                "test_at_threshold": (evaluate.f1_at_threshold(y[test], p_test, threshold)
                                      if threshold is not None else None),
                "test_at_0.5": evaluate.f1_at_threshold(y[test], p_test, 0.5),
            },
        }
        probas[name] = p_test
        if out_dir is not None:
            model.save(Path(out_dir) / name)
    result["paired"] = evaluate.compare_to_reference(y[test], probas, n_boot=n_boot, seed=seed)
    table = evaluate.comparison_table({k: v["test"] for k, v in result["models"].items()}, result["paired"])
    f1_lines = [f"{k}: F1 {_f(v['f1']['test_at_threshold'])} at valid-chosen threshold {_f(v['f1']['threshold'])}, "
                f"F1 {_f(v['f1']['test_at_0.5'])} at 0.5" for k, v in result["models"].items()]
    result["table"] = "\n".join([f"split: {protocol}", table, *f1_lines])
    if verbose:
        print(result["table"])
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    return result


def _f(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"
