"""``--engine spark``: the DuckDB definitions transpiled to Spark give the same workspace, on a real local Spark.

One Spark session (``local[2]``) serves every test of the module. Parity is checked where it matters:
examples (ids, cutoffs, labels, splits) equal, features equal to 1e-9, events (pseudonyms included)
equal after ingest, batch scores of LightGBM and Transformer runs equal to 1e-6; and the leakage
perturbation test of ``test_leakage.py`` runs on the Spark engine too, for features and for a
Transformer's scores. Tests skip (with the reason) only when PySpark,
SQLGlot or Java is missing; ``.ci/run`` installs Java and ``make venv`` the ``spark`` extra.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import warnings

import duckdb
import numpy as np
import pandas as pd
import pytest
from test_leakage import FEATURE_CFGS, TASKS, _worlds, perturb_after

from purchase_intent import pipeline
from purchase_intent.cli import main
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
from purchase_intent.engine import EngineConfig, EngineError, check_engine, parse_spark_conf
from purchase_intent.features import compute_features
from purchase_intent.labels import build_examples
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

# PySpark 4.3 warns about pandas 3 on every conversion; the parity checks below are what counts
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
SPARK = EngineConfig("spark")
KEY = "00112233445566778899aabbccddeeff"


def _spark_missing() -> str | None:
    try:
        check_engine(SPARK)
    except EngineError as e:
        return str(e)
    return None


needs_spark = pytest.mark.skipif(_spark_missing() is not None, reason=f"no Spark here: {_spark_missing()}")


@pytest.fixture(scope="session")
def spark():
    if _spark_missing():
        pytest.skip(_spark_missing())
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need this venv (torch, the package)
    session = (SparkSession.builder.master("local[2]").appName("purchase-intent-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "4").config("spark.log.level", "ERROR").getOrCreate())
    yield session
    session.stop()


def _duckdb(events: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events_df", events)
    con.execute("CREATE TABLE events AS SELECT * FROM events_df")
    con.unregister("events_df")
    return con


def _spark_build(spark, events: pd.DataFrame):
    from purchase_intent.spark_engine import CANONICAL, SparkBuild, spark_session

    spark_session(SPARK)  # our settings on the running test session
    df = spark.createDataFrame(events[list(CANONICAL)]).selectExpr(
        *[f"CAST({c} AS TIMESTAMP) AS {c}" if c == "ts" else c for c in CANONICAL])
    return SparkBuild(spark, df)


def _close(a: pd.DataFrame, b: pd.DataFrame, tol: float) -> None:
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(b.to_numpy(np.float64), a.to_numpy(np.float64), rtol=tol, atol=tol, equal_nan=True)


# --- the transpiler and the one-line errors: no JVM needed --------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("sqlglot") is None, reason="sqlglot (the spark extra) is not installed")
def test_to_spark_rewrites_what_spark_lacks():
    from purchase_intent.privacy import pseudonym_sql
    from purchase_intent.spark_sql import to_spark

    text = to_spark("SELECT k.t, epoch_us(e.ts), isodow(e.ts), length(list_distinct(flatten(list(e.x)))) "
                    "FROM e ASOF LEFT JOIN edges k ON e.ts >= k.t")
    assert "ASOF JOIN" not in text.upper() and "LEAD(t) OVER (ORDER BY t" in text and "LEFT JOIN" in text
    assert "UNIX_MICROS(e.ts)" in text and "DAYOFWEEK_ISO" in text and "SIZE(ARRAY_DISTINCT" in text
    # the key blocks are read from a relation, never written into the SQL text
    text = to_spark(f"SELECT {pseudonym_sql('u')} AS pid FROM t")
    assert "_pi_params.pseudonym_ipad" in text and "CROSS JOIN _pi_params" in text
    with pytest.raises(ValueError, match="ASOF join"):
        to_spark("SELECT * FROM e ASOF JOIN k ON e.ts = k.t")


def test_missing_extra_or_java_is_one_line(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyspark" else real(name, *a))
    with pytest.raises(EngineError, match=r"pip install 'purchase-intent\[spark\]'"):
        check_engine(SPARK)
    rc = main(["--workspace", str(tmp_path / "ws"), "build", "--engine", "spark"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "purchase-intent[spark]" in err[0]
    assert not (tmp_path / "ws").exists()  # refused before the workspace was touched
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError, match="apt-get install openjdk-17-jre-headless"):
        check_engine(SPARK)
    with pytest.raises(EngineError, match="KEY=VALUE"):
        parse_spark_conf(["executor.memory"])
    monkeypatch.setenv("PURCHASE_INTENT_ENCRYPTION_KEY", "correct horse battery staple 0123456789")
    with pytest.raises(EngineError, match="cannot keep a workspace encrypted"):  # before Java is looked for
        check_engine(SPARK)
    assert parse_spark_conf(["spark.driver.memory=4g"]) == {"spark.driver.memory": "4g"}


def test_a_python_error_on_an_executor_is_its_last_traceback_line():
    from purchase_intent.spark_engine import summary_line

    raw = ("org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
           '  File "/venv/lib/python3.11/site-packages/pyspark/worker.py", line 1247, in main\n'
           "    process()\n"
           '  File "/src/purchase_intent/spark_scoring.py", line 160, in predict\n'
           "    yield score_histories(model, batch, names, at)\n"
           "MemoryError: Unable to allocate 3.1 GiB for an array\n"
           "\tat org.apache.spark.api.python.BasePythonRunner.handlePythonException(PythonRunner.scala)\n")
    assert summary_line(raw) == "MemoryError: Unable to allocate 3.1 GiB for an array"
    assert summary_line("Exception thrown in awaitResult:\nPath does not exist: file:/x") == \
        "Exception thrown in awaitResult: Path does not exist: file:/x"
    one = "[PATH_NOT_FOUND] Path does not exist: file:/x."
    assert summary_line(one) == one


@needs_spark
def test_a_failing_executor_is_one_line_that_names_the_python_error(spark):
    from purchase_intent.spark_engine import SparkJobError, one_line

    def fail(batches):
        for _ in batches:
            raise ValueError("history of user 7 is not a list")
        yield from ()

    @one_line
    def job():
        return spark.range(4).mapInPandas(fail, "id long").collect()

    with pytest.raises(SparkJobError) as e:
        job()
    assert "\n" not in str(e.value) and "ValueError: history of user 7 is not a list" in str(e.value), str(e.value)


# --- parity on a real local Spark ---------------------------------------------------------------------


@needs_spark
@pytest.mark.parametrize("task,fname", [
    ("user", "all-history"),  # the one Spark test of the default run (a JVM start and a few seconds)
    pytest.param("session", "bounded-history", marks=pytest.mark.slow),
    pytest.param("session-gap-prefix", "all-history", marks=pytest.mark.slow)])
def test_examples_and_features_equal_duckdb(spark, tiny_events, task, fname):
    lcfg, fcfg = TASKS[task], FEATURE_CFGS[fname]
    con = _duckdb(tiny_events)
    want = build_examples(con, lcfg)
    sb = _spark_build(spark, tiny_events)
    got = sb.build_examples(lcfg)
    pd.testing.assert_frame_equal(got.to_pandas(), want.to_pandas())
    assert got.schema.metadata == want.schema.metadata  # the same counts, dropped rows by reason included
    ex = want.to_pandas()
    con.register("examples", ex)
    _close(compute_features(con, "examples", fcfg), sb.compute_features(ex, fcfg), 1e-9)


@needs_spark
@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_events_at_or_after_cutoff_change_no_feature_on_spark(spark, tiny_events, task):
    """``test_leakage``'s perturbation test, with the features computed by Spark."""
    fcfg = FEATURE_CFGS["bounded-history" if task == "session" else "all-history"]
    examples = build_examples(_duckdb(tiny_events), TASKS[task])
    ex = examples.to_pandas()
    cutoffs = np.sort(ex["cutoff"].unique())
    times = [pd.Timestamp(t) for t in cutoffs[:: max(1, len(cutoffs) // 4)]]
    plan = [(seed, t) for seed in range(2) for t in times]
    worlds = [tiny_events] + [perturb_after(tiny_events, t, np.random.default_rng([seed, i]))
                              for i, (seed, t) in enumerate(plan)]
    events, stacked = _worlds(tiny_events, examples, worlds)
    X = _spark_build(spark, events).compute_features(stacked.to_pandas(), fcfg).to_numpy()
    n = len(ex)
    for k, (seed, t) in enumerate(plan, start=1):
        keep = np.flatnonzero((ex["cutoff"] <= t).to_numpy())
        np.testing.assert_allclose(X[k * n + keep], X[keep], rtol=1e-12, atol=1e-9, equal_nan=True,
                                   err_msg=f"leak on Spark: seed {seed}, perturbed at/after {t}")
    # and the check can fail: a changed event before a cutoff moves that example's features
    before = tiny_events.copy()
    row = ex.iloc[len(ex) // 2]
    mine = before.index[(before["user_id"] == row["user_id"]) & (before["ts"] < row["cutoff"])]
    before.loc[mine[-1], "event"] = "purchase" if before.loc[mine[-1], "event"] != "purchase" else "view"
    events, stacked = _worlds(tiny_events, examples, [tiny_events, before])
    Y = _spark_build(spark, events).compute_features(stacked.to_pandas(), fcfg).to_numpy()
    i = len(ex) // 2
    assert not np.allclose(Y[i], Y[n + i], equal_nan=True)


@needs_spark
def test_pseudonyms_on_spark_equal_python_hmac_and_the_key_stays_out_of_the_plan(spark):
    from purchase_intent.privacy import hmac_pads, pseudonym_params, pseudonym_sql, pseudonymise
    from purchase_intent.spark_engine import register_params, spark_session, sql

    spark_session(SPARK)
    key = bytes.fromhex(KEY) + b"-spark"
    ids = ["u1", "ü-ß 😀", "", "x" * 200, None]
    spark.createDataFrame([(i,) for i in ids], "raw string").createOrReplaceTempView("ids")
    register_params(spark, pseudonym_params(key))
    df = sql(spark, f"SELECT raw, {pseudonym_sql('raw')} AS pid FROM ids")
    got = {r["raw"]: r["pid"] for r in df.collect()}
    assert [got[i] for i in ids] == pseudonymise(ids, key)
    plan = df._jdf.queryExecution().toString() + spark.sql("SHOW VIEWS").toPandas().to_string()
    for secret in (key.hex(), *(p.hex() for p in hmac_pads(key))):
        assert secret not in plan.lower()


@needs_spark
def test_float_ids_on_spark_are_named_as_duckdb_names_them(spark, tiny_events, tmp_path, monkeypatch):
    """A float64 id column (pandas' integer column with a missing value): 1001.0 is the user 1001 on both."""
    from test_events import float_id_logs

    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    _, floats = float_id_logs(tmp_path, tiny_events)
    pipeline.ingest(floats, DataConfig(format="parquet"), tmp_path / "duck", progress=False)
    pipeline.ingest(floats, DataConfig(format="parquet"), tmp_path / "spark", progress=False, engine=SPARK)
    a, b = (_events(Workspace(tmp_path / w)) for w in ("duck", "spark"))
    pd.testing.assert_frame_equal(a[["user_id", "item_id", "ts", "event"]], b[["user_id", "item_id", "ts", "event"]])
    assert not a["item_id"].str.contains(".", regex=False).any()
    # the row without a user is rejected on both, its timestamp written as text in the rejects file
    (ra,), (rb,) = (list((tmp_path / w / "rejects").glob("*.csv")) for w in ("duck", "spark"))
    da, db = (pd.read_csv(r) for r in (ra, rb))
    assert da["reason"].tolist() == db["reason"].tolist() == ["missing_user"]
    assert json.loads(da["raw"][0])["ts"] == json.loads(db["raw"][0])["ts"]
    # the same ids as float text ('1001.0', as pandas writes them to CSV) in a string column: the same users
    texts = tmp_path / "float_texts.parquet"
    df = pd.read_parquet(floats)
    df = df.assign(user_id=df["user_id"].map(lambda u: None if pd.isna(u) else f"{u:.1f}"))
    pd.concat([df, df.head(3).assign(user_id=["\\N", "undefined", "NA"])]).to_parquet(texts)
    pipeline.ingest(texts, DataConfig(format="parquet"), tmp_path / "duck_text", progress=False)
    pipeline.ingest(texts, DataConfig(format="parquet"), tmp_path / "spark_text", progress=False, engine=SPARK)
    c, d = (_events(Workspace(tmp_path / w)) for w in ("duck_text", "spark_text"))
    pd.testing.assert_frame_equal(c[["user_id", "ts", "event"]], d[["user_id", "ts", "event"]])
    # the missing-value texts are missing users on both, the rejected rows written alike (a column pandas names
    # __index_level_0__, which the events keep as index_level_0, and a mapped column, as the file names them)
    (rc,), (rd,) = (list((tmp_path / w / "rejects").glob("*.csv")) for w in ("duck_text", "spark_text"))
    rc, rd = pd.read_csv(rc), pd.read_csv(rd)
    assert rc["reason"].tolist() == rd["reason"].tolist() == ["missing_user"] * 4
    assert [json.loads(r) for r in rc["raw"]] == [json.loads(r) for r in rd["raw"]]
    assert "__index_level_0__" in json.loads(rd["raw"][0])
    assert sorted(c["user_id"]) == sorted(a["user_id"])


@needs_spark
def test_text_prices_and_times_read_alike_on_spark(spark, tmp_path, monkeypatch):
    """Prices as shops write them (decimal commas, currency, spaces grouping thousands) and times with an offset
    after a space: the same values on both engines, from one definition."""
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    prices = ["12,50", "€9.99", "1.234,00", "0,0508", "1 234,56", "1\u00a0234,56 €", "1\u202f234 567,8", "abc"]
    df = pd.DataFrame({"user_id": [f"u{i}" for i in range(len(prices))], "event": "purchase", "price": prices,
                       "ts": [f"2024-01-14 06:{i:02d}:36 +0100" for i in range(len(prices))]})
    df.to_parquet(tmp_path / "prices.parquet")
    for w, engine in (("duck", None), ("spark", SPARK)):
        pipeline.ingest(tmp_path / "prices.parquet", DataConfig(format="parquet"), tmp_path / w, progress=False,
                        **({"engine": engine} if engine else {}))
    a, b = (_events(Workspace(tmp_path / w)) for w in ("duck", "spark"))
    pd.testing.assert_frame_equal(a[["user_id", "ts", "price"]], b[["user_id", "ts", "price"]])
    a = a.sort_values("ts")
    assert a["price"].round(4).tolist() == [12.5, 9.99, 1234.0, 0.0508, 1234.56, 1234.56, 1234567.8]
    assert str(a["ts"].iloc[0]) == "2024-01-14 05:00:36"


# --- whole workspaces: the simulator and the Taobao slice -----------------------------------------------


def _same_workspace_files(a: Workspace, b: Workspace) -> None:
    ea, eb = (pd.read_parquet(w.examples_dir / "examples.parquet") for w in (a, b))
    pd.testing.assert_frame_equal(ea, eb)  # example ids, users, cutoffs, labels and splits
    _close(pd.read_parquet(a.examples_dir / "features.parquet"), pd.read_parquet(b.examples_dir / "features.parquet"),
           1e-9)
    ia, ib = (json.loads((w.examples_dir / "build.json").read_text()) for w in (a, b))
    for k in ("label_config", "feature_config", "feature_names", "n_examples", "positives", "dropped", "split"):
        assert ia[k] == ib[k], k
    assert (ia["engine"], ib["engine"]) == ("duckdb", "spark")


def _events(ws: Workspace) -> pd.DataFrame:
    df = pd.concat([pd.read_parquet(p) for p in ws.part_paths()], ignore_index=True)
    return df.sort_values(["user_id", "ts", "event", "item_id", "raw_event"], kind="stable").reset_index(drop=True)


@needs_spark
@pytest.mark.slow
def test_simulator_ingest_build_and_score_equal_duckdb(spark, tmp_path, monkeypatch):
    pytest.importorskip("lightgbm")
    from purchase_intent import score

    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    data = tmp_path / "sim.parquet"
    write_events(SimConfig(n_users=300, days=30, seed=3), data)
    wd, ws = Workspace(tmp_path / "duck"), Workspace(tmp_path / "spark")
    pipeline.ingest(data, DataConfig(format="parquet"), wd, progress=False)
    pipeline.ingest(data, DataConfig(format="parquet"), ws, progress=False, engine=SPARK)
    pd.testing.assert_frame_equal(_events(wd), _events(ws), check_dtype=False)  # pseudonyms included
    ma, mb = (json.loads(w.manifest_path.read_text()) for w in (wd, ws))
    assert ma["key_id"] == mb["key_id"] and ma["files"][0]["parts"] == mb["files"][0]["parts"]
    for k in ("rows_read", "accepted", "rejected", "filtered", "unmapped_events"):
        assert ma["files"][0][k] == mb["files"][0][k], k
    for lcfg in (LabelConfig(task="session", step="3d"), LabelConfig(lookback="7d", horizon="3d", step="3d")):
        pipeline.build(lcfg, workspace=wd, quiet=True)
        pipeline.build(lcfg, workspace=ws, quiet=True, engine=SPARK)
        _same_workspace_files(wd, ws)
    # the Spark workspace trains as any other; its run scores the same on both engines
    pipeline.train("lightgbm", workspace=ws, quiet=True, train_cfg=TrainConfig(min_positives=10, min_negatives=10))
    a = score.score("lightgbm", tmp_path / "duck.parquet", workspace=ws, progress=False)
    b = score.score("lightgbm", tmp_path / "spark.parquet", workspace=ws, progress=False, engine=SPARK)
    sa, sb = pd.read_parquet(a.out), pd.read_parquet(b.out)
    assert a.n_scored == b.n_scored > 50 and sa["user_id"].tolist() == sb["user_id"].tolist()
    np.testing.assert_allclose(sb["probability"], sa["probability"], rtol=0, atol=1e-6)
    assert (sa["rank"] == sb["rank"]).all() and (sa["decile"] == sb["decile"]).all()


def _taobao_parquet(src, out) -> None:
    """The Taobao slice's raw columns as Parquet (Spark ingests Parquet): no header, ts in epoch seconds."""
    con = duckdb.connect()
    con.execute(f"""COPY (SELECT * FROM read_csv('{src}', header = false, ignore_errors = true,
        columns = {{'user_id': 'BIGINT', 'item_id': 'BIGINT', 'category_id': 'BIGINT', 'behavior': 'VARCHAR',
                   'ts': 'BIGINT'}})) TO '{out}' (FORMAT parquet)""")


@needs_spark
@pytest.mark.slow
@pytest.mark.shared_data
def test_taobao_slice_equal_duckdb_with_mixed_engines(spark, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    data = tmp_path / "taobao.parquet"
    _taobao_parquet(shared_data / "taobao_userbehavior" / "UserBehavior_head.csv.gz", data)
    cfg = DataConfig(format="parquet", mapping={"category": "category_id", "event": "behavior"},
                     event_map={"pv": "view", "buy": "purchase", "fav": "wishlist"}, ts_unit="s",
                     since="2017-11-25T00:00:00+08:00", until="2017-12-04T00:00:00+08:00")
    wd, ws = Workspace(tmp_path / "duck"), Workspace(tmp_path / "spark")
    pipeline.ingest(data, cfg, wd, progress=False)
    pipeline.ingest(data, cfg, ws, progress=False, engine=SPARK)
    pd.testing.assert_frame_equal(_events(wd), _events(ws), check_dtype=False)
    assert json.loads(ws.manifest_path.read_text())["files"][0]["filtered"] == 35
    user = LabelConfig(lookback="3d", horizon="1d", step="1d", tz="Asia/Shanghai")
    pipeline.build(user, workspace=wd, quiet=True)
    pipeline.build(user, workspace=ws, quiet=True, engine=SPARK)
    _same_workspace_files(wd, ws)
    # the session task on mixed engines: DuckDB's ingest and build, then Spark's build of the same workspace
    session = LabelConfig(task="session", step="1d", tz="Asia/Shanghai")
    pipeline.build(session, workspace=wd, quiet=True)
    duck = Workspace(tmp_path / "duck-session")
    shutil.copytree(wd.examples_dir, duck.examples_dir)
    pipeline.build(session, workspace=wd, quiet=True, engine=SPARK)
    _same_workspace_files(duck, wd)


# --- Transformer runs: tokens on the executors, the run's ONNX graph --------------------------------------

SEQ_AT = "2024-01-22"  # the scoring time of the tests below: a week before the simulated log ends


@pytest.fixture(scope="module")
def transformer_shop(tmp_path_factory):
    """A simulated shop (200 users, 4 weeks; DuckDB ingest and build) and a tiny Transformer run of one
    epoch, saved with its ONNX graph."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("transformer-shop")
    write_events(SimConfig(n_users=200, days=28, seed=5), root / "sim.parquet")
    ws = Workspace(root / "ws")
    pipeline.ingest(root / "sim.parquet", DataConfig(format="parquet"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="7d", horizon="3d", step="3d"), workspace=ws, quiet=True)
    pipeline.train("transformer", params={"preset": "tiny", "max_epochs": 1, "max_seq_len": 16},
                   train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=ws, quiet=True)
    assert (ws.run_dir("transformer") / "model" / "model.onnx").is_file()
    return ws


def _spark_scores(ws: Workspace, run, out) -> pd.DataFrame:
    from purchase_intent import score

    res = score.score(str(run), out, score.ScoreConfig(at=SEQ_AT), workspace=ws, progress=False, engine=SPARK)
    return pd.read_parquet(res.out).set_index("user_id")["probability"]


@pytest.fixture(scope="module")
def transformer_spark_scores(spark, transformer_shop, tmp_path_factory):
    return _spark_scores(transformer_shop, "transformer", tmp_path_factory.mktemp("scores") / "spark.parquet")


@needs_spark
@pytest.mark.slow
@pytest.mark.parametrize("run", ["transformer", "transformer_pt"])
def test_transformer_scores_on_spark_equal_duckdb(transformer_shop, transformer_spark_scores, tmp_path, run):
    from purchase_intent import score
    from purchase_intent.pretrain import PretrainConfig, pretrain

    ws = transformer_shop
    if run == "transformer_pt":  # fine-tuned from the shop's pretrained encoder: the same ONNX path
        pretrain(ws, PretrainConfig(preset="tiny", max_seq_len=16, epochs=1, batch_size=64, seed=0))
        pipeline.train(run, params={"max_epochs": 1, "max_seq_len": 16},
                       train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=ws, quiet=True)
    a = score.score(run, tmp_path / "duck.parquet", score.ScoreConfig(at=SEQ_AT), workspace=ws, progress=False)
    want = pd.read_parquet(a.out).set_index("user_id")["probability"]
    got = transformer_spark_scores if run == "transformer" else _spark_scores(ws, run, tmp_path / "spark.parquet")
    assert len(want) == a.n_scored > 50 and sorted(got.index) == sorted(want.index)
    assert got.nunique() > 10  # a model that tells users apart, not a constant
    # DuckDB runs PyTorch on chunks of many users, Spark the ONNX graph: equal to 1e-6 all the same
    np.testing.assert_allclose(got.reindex(want.index), want, rtol=0, atol=1e-6)


def _world(ws: Workspace, root, change) -> Workspace:
    """A copy of ``ws`` (its runs included) whose events are ``change(events)``."""
    shutil.copytree(ws.root, root)
    out = Workspace(root)
    for part in out.part_paths():
        change(pd.read_parquet(part)).to_parquet(part, index=False)
    return out


@needs_spark
@pytest.mark.slow
def test_transformer_on_spark_reads_no_event_at_or_after_the_cutoff(transformer_shop, transformer_spark_scores,
                                                                    tmp_path):
    ws, base = transformer_shop, transformer_spark_scores
    run = ws.run_dir("transformer")
    at = pd.Timestamp(SEQ_AT)
    after = _world(ws, tmp_path / "after", lambda df: perturb_after(df, at, np.random.default_rng(7)))
    got = _spark_scores(after, run, tmp_path / "after.parquet")
    assert sorted(got.index) == sorted(base.index)
    np.testing.assert_allclose(got.reindex(base.index), base, rtol=0, atol=1e-9,
                               err_msg="an event at or after the cutoff moved a Spark score")
    # the converse: three purchases of one scored user just before the cutoff move that user's score only
    user = base.index[len(base) // 2]

    def buy(df: pd.DataFrame) -> pd.DataFrame:
        mine = df[(df["user_id"] == user) & (df["ts"] < at)].tail(1)
        new = pd.concat([mine] * 3, ignore_index=True).assign(event="purchase")
        new["ts"] = at - pd.to_timedelta([3, 2, 1], unit="min")
        return pd.concat([df, new], ignore_index=True)

    before = _spark_scores(_world(ws, tmp_path / "before", buy), run, tmp_path / "before.parquet")
    moved = (before.reindex(base.index) - base).abs()
    assert moved[user] > 1e-4 and moved.drop(user).max() < 1e-9


@needs_spark
def test_a_transformer_run_without_its_onnx_graph_is_refused_in_one_line(transformer_shop, tmp_path, capsys,
                                                                        monkeypatch):
    from purchase_intent import spark_scoring

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(transformer_shop.root, ws.root)
    src = ws.run_dir("transformer")
    for name, change in (("no-graph", lambda p: p.unlink()), ("other-graph", lambda p: p.write_bytes(b"x"))):
        shutil.copytree(src, ws.run_dir(name))
        change(ws.run_dir(name) / "model" / "model.onnx")
        with warnings.catch_warnings(record=True) as caught:  # a warning would print two lines before the error
            warnings.simplefilter("always")
            rc = main(["--workspace", str(ws.root), "score", "--run", name, "--engine", "spark", "--at", SEQ_AT])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1, err
        assert not [w for w in caught if "onnx" in str(w.message).lower()], [str(w.message) for w in caught]
        what = "has no ONNX graph" if name == "no-graph" else "does not match the saved weights"
        assert what in err[0] and "train the run again" in err[0], err[0]
    monkeypatch.setattr(spark_scoring, "onnxruntime_available", lambda: False)
    rc = main(["--workspace", str(ws.root), "score", "--run", "transformer", "--engine", "spark", "--at", SEQ_AT])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "pip install 'purchase-intent[onnx]'" in err[0], err
