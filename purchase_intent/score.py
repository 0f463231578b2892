"""Batch scores and audiences: who is likely to buy, ranked, from a saved run.

    purchase-intent score --run lightgbm --out scores.parquet
    purchase-intent score --run lightgbm --at 2017-12-03 --out audience.csv --top 10%

At time ``T`` (``--at``, default the end of the data: ``max(ts) + 1us`` so the last event counts)
every user with an event in ``[T - lookback, T)`` (the run's lookback) is scored with the run's
model on features of their events with ``ts < T`` -- the same feature and sequence code as
training (``runs.inputs_for_examples``). Users are streamed in chunks and the probabilities
spilled to a temporary Parquet file; ranks and deciles are then computed by DuckDB, which sorts
out of core, so memory does not grow with the number of users.

An audience (``--top 10%``, ``--top-n N`` or ``--min-probability P``) keeps only the top of the
ranking. Its expected precision is the mean probability in the list and its expected number of
buyers the sum (both assume the probabilities are calibrated). They are printed and written with
the list to a JSON sidecar, ``<out stem>.summary.json``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from . import runs, storage
from .config import MIN_USERS, ScoreConfig
from .engine import EngineConfig, check_engine
from .explain import explain_inputs
from .feature_frame import compute_features_for_users
from .privacy import below_threshold, check_min_users, pseudonym_table, read_raw_ids, workspace_key
from .runs import Run
from .times import ONE_US
from .workspace import as_workspace, atomic_write_text, fsync_dir, tmp_path


@dataclass
class ScoreResult:
    """Summary of one scoring: written next to the scores as ``<stem>.summary.json``."""

    out: str
    run: str
    model: str
    version: str
    cutoff: str
    lookback: str
    n_scored: Optional[int]  # active users scored (None: fewer than min_users, withheld)
    n_rows: Optional[int]  # rows written, the audience size when an audience was asked for (None: withheld)
    expected_buyers: Optional[float]  # sum of probabilities over the written rows (None: withheld)
    expected_precision: Optional[float]  # mean probability over the written rows (None: withheld or no rows)
    expected_buyers_all: Optional[float]  # sum over all scored users (None: withheld)
    audience: Optional[dict[str, Any]]  # the selection rule, or None for all users
    seconds: float
    users_per_second: float
    members: Optional[list[str]] = None  # an ensemble's member runs, "name@version"
    stale: Optional[str] = None  # why the run must be retrained (it learned from erased data), else None
    min_users: int = MIN_USERS  # the threshold the counts above were held to
    withheld: list[str] = field(default_factory=list)  # the fields withheld by the threshold
    reidentify: Optional[str] = None  # the raw-id file of --reidentify: the scores file holds raw ids
    reidentified: Optional[int] = None  # rows given their raw id by it (None: not asked, or withheld)
    data_end: Optional[str] = None  # the last event, when --at is past it: what users did since is unknown


# ---------------------------------------------------------------------------------------------
# scoring
def _user_inputs(run: Run, con, user_ids: list[str], cutoff: datetime):
    """Model inputs of ``user_ids`` at ``cutoff``, in the order given.

    Tabular models get ``feature_frame.compute_features_for_users`` (the numpy form of the feature SQL
    at one cutoff; tests prove both equal); sequence models ``runs.inputs_for_examples``.
    """
    if run.members:  # an ensemble: each member's own inputs
        return [_user_inputs(m, con, user_ids, cutoff) for m in run.members]
    ex = pd.DataFrame({"user_id": pd.array(user_ids, dtype=object),
                       "cutoff": pd.Series([cutoff] * len(user_ids), dtype="datetime64[us]")})
    if runs.is_sequence_model(run.model_name):
        return runs.inputs_for_examples(run.meta, run.model, con, ex)
    ex.insert(0, "example_id", np.arange(len(ex), dtype=np.int64))
    return runs.run_features(run.meta, compute_features_for_users(con, ex, run.feature_cfg))


def predict_users(run: Run, con, user_ids: list[str], cutoff: datetime) -> np.ndarray:
    """Probabilities of buying for ``user_ids`` at ``cutoff`` over the ``events`` of ``con``.

    Features and sequences are computed from events with ts < cutoff by the code that built the
    training examples, so this is exactly what training and the HTTP API compute. Shape (len(user_ids),).
    """
    if not user_ids:
        return np.zeros(0)
    X = _user_inputs(run, con, user_ids, cutoff)
    return np.asarray(run.model.predict_proba(X), dtype=np.float64)[:, 1]


def predict_users_with_reasons(run: Run, con, user_ids: list[str], cutoff: datetime,
                               top: int) -> tuple[np.ndarray, list[list[dict]]]:
    """``predict_users`` plus each user's top reasons (``explain.explain_inputs``) on the same inputs."""
    if not user_ids:
        return np.zeros(0), []
    X = _user_inputs(run, con, user_ids, cutoff)
    p = np.asarray(run.model.predict_proba(X), dtype=np.float64)[:, 1]
    return p, explain_inputs(run.meta, run.model, X, top=top)


def _reason_columns(reasons: list[list[dict]], k: int) -> dict:
    cols: dict[str, pa.Array] = {}
    for j in range(k):
        cols[f"reason_{j + 1}"] = pa.array([r[j]["text"] if len(r) > j else None for r in reasons], pa.string())
        cols[f"reason_{j + 1}_contribution"] = pa.array(
            [float(r[j]["contribution"]) if len(r) > j else None for r in reasons], pa.float64())
    return cols


def _active_users_table(con, cutoff: datetime, lookback: timedelta) -> int:
    """Materialise the active users at ``cutoff`` (any event in [cutoff - lookback, cutoff)) with a
    chunk number; DuckDB keeps the table out of core when it is large. Returns the user count."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _score_users AS "
        "SELECT user_id, row_number() OVER (ORDER BY user_id) - 1 AS _i FROM "
        "(SELECT DISTINCT user_id FROM events WHERE ts >= $lo AND ts < $hi AND user_id IS NOT NULL)",
        {"lo": cutoff - lookback, "hi": cutoff},
    )
    return int(con.execute("SELECT count(*) FROM _score_users").fetchall()[0][0])


def _audience_filter(cfg: ScoreConfig, n: int) -> tuple[str, Optional[dict]]:
    """SQL WHERE clause over the ranked scores, and a description of the rule."""
    chosen = [x for x in (cfg.top, cfg.top_n, cfg.min_probability) if x is not None]
    if len(chosen) > 1:
        raise ValueError("choose one of --top, --top-n, --min-probability")
    if cfg.top is not None:
        share = parse_share(cfg.top)
        k = int(math.ceil(share * n - 1e-9))
        return f"rank <= {k}", {"rule": "top", "share": share, "max_rank": k}
    if cfg.top_n is not None:
        if cfg.top_n < 1:
            raise ValueError(f"--top-n must be >= 1, got {cfg.top_n}")
        return f"rank <= {int(cfg.top_n)}", {"rule": "top_n", "n": int(cfg.top_n)}
    if cfg.min_probability is not None:
        p = float(cfg.min_probability)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"--min-probability must lie in [0, 1], got {p}")
        return f"probability >= {p!r}", {"rule": "min_probability", "min_probability": p}
    return "TRUE", None


def parse_share(text: str | float) -> float:
    """``"10%"`` -> 0.1, ``"0.1"`` -> 0.1; must lie in (0, 1]."""
    s = str(text).strip()
    try:
        share = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        share = float("nan")
    if not 0.0 < share <= 1.0:
        hint = f" (for {s}%, write --top {s}%; for {s} users, --top-n {s})" if s.isdigit() and int(s) > 1 else ""
        raise ValueError(f"--top must be a share in (0%, 100%], e.g. 10% or 0.1, got {text!r}{hint}")
    return share


def _copy_sql(out: Path) -> str:
    name = out.name.lower()
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        if storage.active():  # a CSV cannot be encrypted and still be read as CSV
            raise ValueError(f"--out {out}: with an encryption key, scores and audiences are written as encrypted "
                             "Parquet only; use a .parquet file name")
        return "(FORMAT CSV, HEADER)"
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "(FORMAT PARQUET)"
    raise ValueError(f"--out {out}: use a .parquet, .csv or .csv.gz file name")


def summary_path(out: str | Path) -> Path:
    """``scores.parquet`` -> ``scores.summary.json`` (``.csv.gz`` is stripped whole)."""
    out = Path(out)
    stem = out.name[:-7] if out.name.lower().endswith(".csv.gz") else out.stem
    return out.with_name(stem + ".summary.json")


def default_out(run_dir: Path, cutoff: datetime) -> Path:
    """``<run folder>/scores-<cutoff as compact UTC>.parquet``, e.g. ``scores-20261205T000000Z.parquet``."""
    return Path(run_dir) / f"scores-{cutoff.strftime('%Y%m%dT%H%M%SZ')}.parquet"


def score(run: str, out: str | Path | None = None, cfg: ScoreConfig | None = None, workspace=None,
          progress: bool = True, engine: EngineConfig | None = None) -> ScoreResult:
    """Score every active user at the cutoff with run ``run``; write the ranked list to ``out``.

    Parameters
    ----------
    run : a run name under ``<workspace>/runs/`` or a run directory.
    out : ``.parquet``, ``.csv`` or ``.csv.gz``; columns user_id (pseudonym), probability, rank
        (1 = most likely), decile (1 = top 10%), cutoff, model, version. None: ``default_out``,
        ``<run folder>/scores-<cutoff as compact UTC>.parquet`` (the path is ``ScoreResult.out``).
    cfg : the scoring time, chunk size and the audience rule (at most one of top / top_n /
        min_probability).

    engine : ``EngineConfig("spark")`` computes the features and probabilities on Spark (tabular and
        Transformer runs: the model runs on the executors, ``spark_scoring.score_users``); the ranking and
        the files are the same.

    Returns
    -------
    ScoreResult, also written as JSON to ``summary_path(out)``.
    """
    cfg = cfg or ScoreConfig()
    spark = engine is not None and engine.name != "duckdb"
    if spark:
        check_engine(engine)
        if cfg.reasons:
            raise ValueError("--reasons are computed with --engine duckdb; drop one of --reasons, --engine spark")
    if cfg.chunk_size < 1:
        raise ValueError("chunk size must be >= 1")
    k_min = check_min_users(cfg.min_users)
    raw_ids = read_raw_ids(cfg.reidentify) if cfg.reidentify else None
    ws = as_workspace(workspace)
    if out is not None:
        out = Path(out)
        fmt = _copy_sql(out)
    with warnings.catch_warnings():
        if spark:  # Spark scores from the ONNX graph and refuses, in one line, a run without a usable one
            warnings.filterwarnings("ignore", ".*(missing or does not match the saved weights|no usable model.onnx)",
                                    RuntimeWarning)
        loaded = runs.load_run(run, ws)
    if loaded.task != "user":
        raise ValueError(f"run {run!r} is a {loaded.task}-task run; batch scores rank users (user task)")
    n_reasons = len(loaded.meta.get("feature_names") or ())
    if cfg.reasons > n_reasons and loaded.vocab is None and not loaded.members:  # one reason per feature at most
        if progress:
            print(f"note: --reasons {cfg.reasons}: the run's model reads {n_reasons} features, so a user has at most "
                  f"{n_reasons} reasons; writing {n_reasons} reason columns", file=sys.stderr)
        cfg = replace(cfg, reasons=n_reasons)
    name, version = loaded.model_name, loaded.version
    lookback_text = loaded.meta["label_config"]["lookback"]
    lookback = loaded.lookback
    t0 = time.perf_counter()
    con = ws.connect()
    cutoff = runs.resolve_cutoff(con, cfg.at)
    if out is None:
        out = default_out(loaded.dir, cutoff)
        fmt = _copy_sql(out)
    n = None if spark else _active_users_table(con, cutoff, lookback)
    data_end = con.execute("SELECT max(ts) FROM events").fetchall()[0][0] if cfg.at is not None else None
    late = data_end is not None and cutoff > data_end + ONE_US
    if n == 0:
        raise ValueError(f"no user has an event in [{cutoff - lookback}, {cutoff}): nothing to score"
                         + (f" (the data ends at {data_end.isoformat()})" if late else ""))
    if n is not None:
        where, audience = _audience_filter(cfg, n)

    # scratch next to the output (same file system, so the last step is one atomic rename); its name is
    # one that Workspace.recover removes if this process dies before the end
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tmp_path(out)
    tmpdir.mkdir()
    try:
        raw = tmpdir / "probabilities.parquet"
        if spark:
            from .spark_scoring import score_users  # needs the spark extra
            n = score_users(ws, loaded, cutoff, lookback, raw, engine)
            if n == 0:
                raise ValueError(f"no user has an event in [{cutoff - lookback}, {cutoff}): nothing to score")
            where, audience = _audience_filter(cfg, n)
            raw = raw / "*.parquet"  # Spark's folder of parts
        fields = [("user_id", pa.string()), ("probability", pa.float64())]
        for j in range(cfg.reasons):
            fields += [(f"reason_{j + 1}", pa.string()), (f"reason_{j + 1}_contribution", pa.float64())]
        schema = pa.schema(fields)
        n_chunks = (n + cfg.chunk_size - 1) // cfg.chunk_size
        bar = _progress(n, progress and not spark)
        with contextlib.nullcontext() if spark else storage.parquet_writer(raw, schema) as writer:
            for k in range(0 if spark else n_chunks):
                users = [r[0] for r in con.execute(
                    "SELECT user_id FROM _score_users WHERE _i >= $a AND _i < $b ORDER BY _i",
                    {"a": k * cfg.chunk_size, "b": (k + 1) * cfg.chunk_size}).fetchall()]
                cols = {"user_id": pa.array(users, pa.string())}
                if cfg.reasons:
                    p, why = predict_users_with_reasons(loaded, con, users, cutoff, cfg.reasons)
                    cols.update({"probability": pa.array(p, pa.float64()), **_reason_columns(why, cfg.reasons)})
                else:
                    cols["probability"] = pa.array(predict_users(loaded, con, users, cutoff), pa.float64())
                writer.write_table(pa.table(cols, schema=schema))
                bar.update(len(users))
        bar.close()
        seconds = time.perf_counter() - t0
        reason_cols = "".join(f", reason_{j + 1}, reason_{j + 1}_contribution" for j in range(cfg.reasons))
        ranked = f"""
            SELECT user_id, probability,
                   row_number() OVER (ORDER BY probability DESC, user_id) AS rank,
                   CAST(1 + floor((row_number() OVER (ORDER BY probability DESC, user_id) - 1) * 10 / {n})
                        AS INTEGER) AS decile,
                   $cutoff::TIMESTAMP AS cutoff, $model AS model, $version AS version{reason_cols}
            FROM {storage.scan(con, [raw])}"""
        params = {"cutoff": cutoff, "model": name, "version": version}
        sel = f"SELECT * FROM ({ranked}) WHERE {where} ORDER BY rank"
        if raw_ids is not None:  # the key holder's raw ids, joined on their pseudonyms under this workspace's key
            con.register("_reidentify", pseudonym_table(pa.array(raw_ids, pa.string()), workspace_key(ws)))
            sel = (f"SELECT s.user_id, m.raw AS raw_user_id, s.* EXCLUDE (user_id) FROM ({ranked}) s "
                   f"LEFT JOIN (SELECT DISTINCT raw, pid FROM _reidentify) m ON m.pid = s.user_id "
                   f"WHERE {where} ORDER BY rank")
        tmp_out = tmpdir / ("out" + "".join(out.suffixes[-2:]))
        if fmt == "(FORMAT PARQUET)":
            storage.copy_to_parquet(con, sel, tmp_out, params)
        else:
            con.execute(f"COPY ({sel}) TO '{_sql_path(tmp_out)}' {fmt}", params)
        rows, buyers, matched = con.execute(
            f"SELECT count(*), coalesce(sum(probability), 0), "
            f"{'count(raw_user_id)' if raw_ids is not None else 'NULL'} FROM ({sel})", params).fetchall()[0]
        buyers_all = con.execute(f"SELECT coalesce(sum(probability), 0) "
                                 f"FROM {storage.scan(con, [raw])}").fetchall()[0][0]
        result = ScoreResult(
            out=str(out), run=str(loaded.meta.get("run", run)), model=name, version=version,
            cutoff=cutoff.isoformat(), lookback=lookback_text, n_scored=n, n_rows=int(rows),
            expected_buyers=float(buyers), expected_precision=float(buyers) / rows if rows else None,
            expected_buyers_all=float(buyers_all), audience=audience, seconds=round(seconds, 3),
            users_per_second=round(n / seconds, 1) if seconds > 0 else float("inf"),
            members=[f"{m.name}@{m.version}" for m in loaded.members] or None, stale=loaded.stale,
            min_users=k_min, reidentify=str(cfg.reidentify) if cfg.reidentify else None,
            data_end=data_end.isoformat() if late else None,
            reidentified=None if matched is None else int(matched),
        )
        _withhold_small_counts(result)
        # the summary first, then the scores: a scores file on disk always has its summary beside it
        atomic_write_text(summary_path(out), json.dumps(asdict(result), indent=2))
        os.replace(tmp_out, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        con.execute("DROP TABLE IF EXISTS _score_users")
    return result


def _withhold_small_counts(result: ScoreResult) -> None:
    """Thresholds: the summary keeps no count (nor a sum that would give it away) of fewer than
    ``min_users`` users; the scores file itself, one row per user, is left whole."""
    k = result.min_users
    if below_threshold(result.n_rows, k):
        result.n_rows = result.expected_buyers = result.expected_precision = None
        result.withheld += ["n_rows", "expected_buyers", "expected_precision"]
    if below_threshold(result.n_scored, k):
        result.n_scored = result.expected_buyers_all = result.users_per_second = None
        result.withheld += ["n_scored", "expected_buyers_all", "users_per_second"]
    if below_threshold(result.reidentified, k):
        result.reidentified = None
        result.withheld.append("reidentified")


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, unit="user", desc="scoring", mininterval=0.5)


def describe(result: ScoreResult) -> str:
    """The lines `purchase-intent score` prints."""
    k = result.min_users
    few = f"fewer than {k}"
    if result.n_scored is None:
        lines = [f"scored {few} active users at {result.cutoff} (lookback {result.lookback}) "
                 f"with {result.model} {result.version} in {result.seconds:.1f}s"]
    else:
        lines = [f"scored {result.n_scored:,} active users at {result.cutoff} (lookback {result.lookback}) "
                 f"with {result.model} {result.version} in {result.seconds:.1f}s "
                 f"({result.users_per_second:,.0f} users/s)"]
    if result.data_end:
        lines.append(f"note: --at is after the end of the data ({result.data_end}): what users did since is not in "
                     f"the log, so each is scored as if silent since their last event")
    if result.stale:
        lines.insert(0, f"warning: {result.stale}")
    if result.members:
        lines.append(f"ensemble of {len(result.members)} runs (mean probability): {', '.join(result.members)}")
    all_text = "withheld" if result.expected_buyers_all is None else f"{result.expected_buyers_all:,.1f}"
    if result.audience is not None and result.n_rows is None:
        lines.append(f"audience ({_rule_text(result.audience)}): {few} users (counts withheld; "
                     f"--min-users 1 shows them)")
    elif result.audience is not None:
        prec = f"{result.expected_precision:.1%}" if result.expected_precision is not None else "n/a"
        lines.append(f"audience ({_rule_text(result.audience)}): {result.n_rows:,} users, expected precision "
                     f"{prec}, expected buyers {result.expected_buyers:,.1f} "
                     f"(of {all_text} among all scored users)")
    else:
        lines.append(f"expected buyers among them: {all_text}")
    if result.withheld:
        lines.append(f"thresholds: counts of fewer than {k} users withheld from the summary "
                     f"({', '.join(result.withheld)})")
    if result.reidentify:
        matched = "some" if result.reidentified is None else f"{result.reidentified:,}"
        lines.append(f"warning: {matched} rows hold raw user ids from {result.reidentify} (column raw_user_id): "
                     f"the scores file is personal data, keep it where the raw ids are kept")
    lines.append(f"wrote {result.out} and {summary_path(result.out)}")
    return "\n".join(lines)


def _rule_text(a: dict) -> str:
    if a["rule"] == "top":
        return f"top {a['share'] * 100:.4g}% = rank <= {a['max_rank']:,}"
    if a["rule"] == "top_n":
        return f"top {a['n']:,}"
    return f"probability >= {a['min_probability']:g}"
