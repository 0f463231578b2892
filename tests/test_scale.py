"""Bounded memory: features streamed to Parquet by DuckDB, read back row by row, and the memory limit."""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_workspace

from purchase_intent import cli, memory, runs
from purchase_intent.features import compute_features, copy_features
from purchase_intent.workspace import TMP_PREFIX


@pytest.fixture
def built_ws(tmp_path):
    return tiny_workspace(tmp_path, n_users=30, days=40)


def test_streamed_features_equal_compute_features(built_ws):
    built = runs.load_built(built_ws)
    assert isinstance(built.features, runs.FeatureRows)
    con = built_ws.connect()
    runs.register_examples(con, built.examples)
    want = runs.align_features(compute_features(con, "examples", built.feature_cfg), built.examples)
    got = built.features.to_frame()
    assert list(got.columns) == built.info["feature_names"] == list(want.columns)
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())  # same rows, same order, NaN where NULL


def test_copy_features_keeps_example_order_over_many_threads(tmp_path, built_ws):
    built = runs.load_built(built_ws)
    con = built_ws.connect()
    con.execute("SET threads = 4")
    ex = built.examples.sample(frac=1.0, random_state=0)  # registered out of order: the file is in id order
    runs.register_examples(con, ex)
    names = copy_features(con, tmp_path / "f.parquet", "examples", built.feature_cfg)
    got = pd.read_parquet(tmp_path / "f.parquet")
    assert list(got.columns) == names
    want = compute_features(con, "examples", built.feature_cfg)  # index example_id, ascending
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_feature_rows_reads_only_what_is_asked_in_the_order_asked(tmp_path):
    rng = np.random.default_rng(0)
    full = pd.DataFrame(rng.normal(size=(1000, 3)), columns=["a", "b", "c"])
    full.iloc[5, 1] = np.nan
    pq.write_table(pa.Table.from_pandas(full, preserve_index=False), tmp_path / "f.parquet", row_group_size=64)
    rows = runs.FeatureRows(tmp_path / "f.parquet")
    assert rows.shape == (1000, 3) and len(rows) == 1000 and list(rows.columns) == ["a", "b", "c"]
    for idx in (np.array([999, 0, 5, 64, 63, 5]), np.arange(0), np.arange(1000)[::-7], full["a"].to_numpy() > 0,
                slice(10, 200, 3)):
        pd.testing.assert_frame_equal(rows.iloc[idx], full.iloc[idx].reset_index(drop=True))
    with pytest.raises(IndexError):
        rows.iloc[np.array([1000])]


def test_parse_size():
    assert memory.parse_size("4GB") == 4 * 1000 ** 3
    assert memory.parse_size("512 MiB") == 512 * 2 ** 20
    assert memory.parse_size("1.5gib") == int(1.5 * 2 ** 30)
    for bad in ("four GB", "4XB", "", "-1GB"):
        with pytest.raises(memory.MemoryLimitError, match="not a size"):
            memory.parse_size(bad)
    with pytest.raises(memory.MemoryLimitError, match="below the minimum of 64MiB"):
        memory.parse_size("10MB")


def test_limit_reaches_duckdb_and_spills_inside_the_workspace(built_ws, monkeypatch):
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "300MB")
    con = built_ws.connect()
    limit = con.execute("SELECT current_setting('memory_limit'), current_setting('temp_directory')").fetchall()[0]
    assert limit[0].replace(" ", "") in ("286.1MiB", "286MiB", "286.0MiB")  # 300 MB = 286 MiB
    assert limit[1].startswith(str(built_ws.root / memory.TMP_DIR_PREFIX))
    assert memory.TMP_DIR_PREFIX.startswith(TMP_PREFIX)  # a crash's leftover is cleaned; forget never copies it
    other = built_ws.connect().execute("SELECT current_setting('temp_directory')").fetchall()[0][0]
    assert other != limit[1]  # one folder per connection: DuckDB's temp file names clash across instances
    assert memory.batch_rows(1000) == 300 * 1000 ** 2 // 16 // 1000


def test_out_of_memory_names_the_limit_and_the_step(monkeypatch):
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1GB")
    con = duckdb.connect()
    con.execute("SET memory_limit = '2MB'; SET temp_directory = ''; SET threads = 1")
    with pytest.raises(memory.MemoryLimitError, match=r"^memory limit 1GB is too small for step build \("):
        with memory.step("build"):
            con.execute("SELECT count(DISTINCT i::VARCHAR || 'x') FROM range(3000000) t(i)").fetchall()
    with pytest.raises(ZeroDivisionError):  # any other error passes through unchanged
        with memory.step("build"):
            1 / 0


def test_cli_refuses_a_bad_limit_in_one_line(built_ws, capsys, monkeypatch):
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "")  # restored after the test (main sets it)
    assert cli.main(["--workspace", str(built_ws.root), "build", "--memory-limit", "10MB"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: memory limit '10MB' is below the minimum of 64MiB (67MB): no step can run in it"]
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "lots")
    assert cli.main(["--workspace", str(built_ws.root), "train", "--model", "logreg"]) == 1
    assert "memory limit 'lots' is not a size" in capsys.readouterr().err


def test_cli_build_and_train_under_a_limit(built_ws, monkeypatch):
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "")
    root = str(built_ws.root)
    assert cli.main(["build", "--workspace", root, "--memory-limit", "256MB", "--lookback", "7d", "--horizon", "3d",
                     "--step", "3d"]) == 0
    assert cli.main(["--memory-limit", "256MB", "--workspace", root, "train", "--model", "logreg",
                     "--min-positives", "1", "--min-negatives", "1"]) == 0
    assert not any(any(d.iterdir()) for d in built_ws.root.glob(memory.TMP_DIR_PREFIX + "*"))


def test_bench_scale_steps_fits_the_growth_exponent():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale_steps.py"
    spec = importlib.util.spec_from_file_location("bench_scale_steps", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.fit_exponent([10, 100, 1000], [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert mod.fit_exponent([10, 100], [1.0, 100.0]) == pytest.approx(2.0)
    assert mod.fit_exponent([10, 10], [1.0, 2.0]) is None  # one size: nothing to fit


def test_out_of_memory_wrapped_by_a_step_is_still_named(monkeypatch):
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "512MB")
    con = duckdb.connect()
    con.execute("SET memory_limit = '2MB'; SET temp_directory = ''; SET threads = 1")
    with pytest.raises(memory.MemoryLimitError, match=r"^memory limit 512MB is too small for step ingest \("):
        with memory.step("ingest"):
            try:
                con.execute("SELECT count(DISTINCT i::VARCHAR || 'x') FROM range(3000000) t(i)").fetchall()
            except duckdb.Error as e:  # as ingest does: its own error, raised from DuckDB's
                raise RuntimeError(f"ingest stopped, nothing was stored: {e}") from e


def test_feature_subset_reads_rows_and_slices_across_row_groups(tmp_path):
    rng = np.random.default_rng(1)
    full = pd.DataFrame(rng.normal(size=(500, 4)), columns=list("abcd"))
    full.iloc[7, 2] = np.nan
    pq.write_table(pa.Table.from_pandas(full, preserve_index=False), tmp_path / "f.parquet", row_group_size=50)
    pos = np.sort(rng.choice(500, size=173, replace=False))
    sub = runs.FeatureSubset(runs.FeatureRows(tmp_path / "f.parquet"), pos)
    want = full.to_numpy()[pos]
    assert len(sub) == 173 and sub.shape == (173, 4) and list(sub.columns) == list("abcd")
    np.testing.assert_array_equal(sub[:], want)
    np.testing.assert_array_equal(np.vstack([sub[a: a + 17] for a in range(0, 173, 17)]), want)
    np.testing.assert_array_equal(np.array([sub[i] for i in range(173)]), want)
    with pytest.raises(IndexError, match="ascending"):
        runs.FeatureSubset(runs.FeatureRows(tmp_path / "f.parquet"), np.array([3, 2]))


def test_lightgbm_fitted_from_rows_on_disk_equals_the_in_memory_fit(built_ws):
    """`train` hands LightGBM the train split as rows left in features.parquet (runs.train_inputs): the
    same trees as from the whole frame, so the float64 train matrix is never held."""
    from purchase_intent.models.baselines import LightGBMModel

    built = runs.load_built(built_ws)
    tr = np.flatnonzero(built.mask("train"))
    y = built.examples["label"].to_numpy()[tr]
    streamed = runs.train_inputs("lightgbm", built, tr, built_ws)
    assert isinstance(streamed, runs.FeatureSubset)
    assert isinstance(runs.train_inputs("logreg", built, tr, built_ws), pd.DataFrame)
    assert isinstance(runs.train_inputs("lightgbm", built, tr[::-1], built_ws), pd.DataFrame)  # not ascending
    a = LightGBMModel(n_estimators=30, random_state=0).fit(built.features.iloc[tr], y)
    b = LightGBMModel(n_estimators=30, random_state=0).fit(streamed, y)
    X = built.features.iloc[np.arange(len(built.features))]
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert b.feature_names_ == a.feature_names_ and list(b.feature_names_in_) == list(a.feature_names_in_)
    bad = built.features.iloc[tr].to_numpy().copy()
    bad[0, 0] = np.inf
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(bad, columns=built.features.columns)),
                   built_ws.root / "inf.parquet")
    with pytest.raises(ValueError, match="infinity"):
        LightGBMModel(n_estimators=5).fit(runs.FeatureSubset(runs.FeatureRows(built_ws.root / "inf.parquet"),
                                                             np.arange(len(tr))), y)
