"""The `purchase-intent` command line: where its options go and what it says when a step cannot run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from purchase_intent import pipeline
from purchase_intent.cli import build_parser, main
from purchase_intent.workspace import WORKSPACE_ENV


@pytest.fixture
def events_csv(tmp_path, tiny_events) -> Path:
    """The tiny log (12 users, 21 days, about 200 events, session ids) as a CSV file."""
    path = tmp_path / "events.csv"
    tiny_events.to_csv(path, index=False)
    return path


def _ingested(ws: Path) -> bool:
    return (ws / "events" / "manifest.json").exists()


# ----------------------------------------------------------------------------- global options


@pytest.mark.parametrize("where", ["before", "after"])
def test_workspace_is_accepted_before_and_after_the_command(where, events_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "from-env"))
    ws = tmp_path / "ws"
    flag = ["--workspace", str(ws)]
    argv = flag + ["ingest", str(events_csv)] if where == "before" else ["ingest", *flag, str(events_csv)]
    assert main(argv) == 0
    assert "accepted" in capsys.readouterr().out
    assert _ingested(ws) and not _ingested(tmp_path / "from-env")


def test_workspace_not_given_falls_back_to_the_environment(events_csv, tmp_path, monkeypatch):
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "from-env"))
    assert main(["ingest", str(events_csv)]) == 0
    assert _ingested(tmp_path / "from-env")


def test_workspace_after_the_command_wins_over_the_one_before():
    args = build_parser().parse_args(["--workspace", "a", "build", "--workspace", "b"])
    assert args.workspace == "b"
    assert build_parser().parse_args(["--workspace", "a", "build"]).workspace == "a"


def test_every_command_takes_the_global_options_after_its_name():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # every registered command, new ones too
    for name, sub in commands.items():
        assert any("--workspace" in a.option_strings for a in sub._actions), name


# ----------------------------------------------------------------------------- start-up

# the libraries that make importing the pipeline take seconds
HEAVY = ("torch", "sklearn", "scipy", "lightgbm", "onnxruntime")


def test_parsing_the_command_line_imports_no_model_library(tmp_path):
    """A mistyped command or flag, and --help, are answered before PyTorch, the models and pandas load; the
    data steps (simulate, ingest, build) run without them too, and a command that trains imports them."""
    script = f"""
import contextlib, io, sys
from purchase_intent import cli
heavy = {HEAVY!r}
for argv in (["buld"], ["build", "--lookbak", "3d"], ["score", "--help"], ["pretrain", "--help"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code
    loaded = [m for m in heavy + ("pandas", "pyarrow.dataset") if m in sys.modules]  # pandas: ~0.3 s
    assert not loaded, (argv, loaded)
    assert code == (0 if "--help" in argv else 2), (argv, code)
    assert "Traceback" not in err.getvalue()
    if argv[-1] == "--help":  # the command module's docstring, read without importing it
        assert "usage: purchase-intent " + argv[0] in out.getvalue() and len(out.getvalue()) > 2000, argv
    else:
        lines = err.getvalue().strip().splitlines()  # argparse's usage, then one line: the error
        assert lines[0].startswith("usage:") and lines[-1].startswith("purchase-intent") and "error:" in lines[-1]
        assert sum("error" in line for line in lines) == 1, lines
ws = ["--workspace", {str(tmp_path / "ws")!r}]
assert cli.main(ws + ["simulate", "--users", "300", "--days", "40", "--out", {str(tmp_path / "sim.csv")!r}]) == 0
assert cli.main(ws + ["ingest", {str(tmp_path / "sim.csv")!r}, "--format", "csv"]) == 0
assert cli.main(ws + ["build", "--lookback", "7d", "--horizon", "3d", "--step", "3d"]) == 0
loaded = [m for m in heavy if m in sys.modules]
assert not loaded, ("simulate, ingest, build", loaded)
assert cli.main(ws + ["train", "--model", "logreg", "--min-positives", "10", "--min-negatives", "10"]) == 0
assert "sklearn" in sys.modules  # a command that fits a model imports the model libraries
"""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "sim.csv").exists()


def test_every_parsed_command_and_check_has_its_function():
    from purchase_intent import commands, config, models

    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices
    assert set(names) == set(commands.COMMANDS)
    checks = {sub.get_default("check") for sub in names.values()} - {None}
    assert checks <= set(commands.CHECKS) and checks
    # the choices the command line offers are the registries' own
    assert config.MODEL_NAMES == tuple(models.MODELS)
    from purchase_intent.models.pretraining import OBJECTIVES
    assert set(OBJECTIVES) == set(config.PRETRAIN_OBJECTIVES)


# ----------------------------------------------------------------------------- --param


def test_unknown_model_parameter_is_one_clear_line_listing_the_known_ones(tmp_path, capsys):
    ws = tmp_path / "ws"
    rc = main(["--workspace", str(ws), "train", "--model", "transformer", "--param", "dropout_ratee=3"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "dropout_ratee" in err and "max_epochs" in err and "n_seeds" in err and "sequence" in err
    assert not (ws / "runs").exists()


def test_model_parameters_come_from_the_estimator_signatures():
    assert pipeline.model_parameters("logreg")[:2] == ["C", "max_iter"]
    assert "dp_epsilon" in pipeline.model_parameters("logreg")
    assert "num_leaves" in pipeline.model_parameters("lightgbm")
    pipeline.check_params("logreg", {"C": 0.5, "max_iter": 10})  # known ones pass
    pipeline.check_params("transformer", {"max_epochs": 1, "sequence": {"max_seq_len": 20}})
    with pytest.raises(ValueError, match="logreg has no parameter 'num_leaves'"):
        pipeline.check_params("logreg", {"num_leaves": 7})
    with pytest.raises(ValueError, match="--seed"):
        pipeline.check_params("logreg", {"random_state": 1})


@pytest.mark.parametrize("model, key, value", [
    ("lightgbm", "num_leaves", "abc"), ("lightgbm", "learning_rate", "0,1"), ("lightgbm", "n_estimators", 1.5),
    ("lightgbm", "num_leaves", -3), ("lightgbm", "subsample", 2), ("lightgbm", "min_child_samples", True),
    ("lightgbm_emb", "num_leaves", 1), ("lightgbm", "num_leaves", 31.0), ("logreg", "max_iter", 1e3),
    ("transformer", "d_model", 64.0), ("transformer", "lr", "abc"), ("transformer", "max_epochs", 1.5),
    ("transformer", "d_model", -4), ("transformer", "batch_size", 0), ("transformer", "dropout", 2),
    ("transformer", "n_heads", 3), ("transformer", "ema_decay", 1), ("transformer", "lr", float("nan")),
    ("transformer_pt", "lr", 0), ("transformer_pt", "patience", -1)])
def test_a_setting_of_the_wrong_type_or_range_is_refused_in_one_line(model, key, value):
    """Values LightGBM or PyTorch would fail on with a traceback (or train on, as dropout=2) are refused
    before any data is read, in one line naming the setting."""
    with pytest.raises(ValueError) as e:
        pipeline.check_params(model, {key: value})
    assert key in str(e.value) and "\n" not in str(e.value)
    pipeline.check_params(model, {})  # the defaults pass
    pipeline.check_params(model, {"lr" if "transformer" in model else "C" if model == "logreg" else "num_leaves": 8})


def test_train_refuses_a_mistyped_lightgbm_setting_before_reading_the_data(tmp_path, capsys):
    ws = tmp_path / "ws"
    rc = main(["--workspace", str(ws), "train", "--model", "lightgbm", "--param", "num_leaves=abc"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: lightgbm: num_leaves must be a whole number")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (ws / "runs").exists()


def test_run_checks_parameters_before_ingesting(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    rc = main(["--workspace", str(ws), "run", "--data", str(events_csv), "--models", "logreg",
               "--param", "num_leaves=7"])
    assert rc == 1 and "num_leaves" in capsys.readouterr().err
    assert not _ingested(ws)


def test_run_gives_each_model_the_parameters_it_has():
    """max_epochs to the Transformer only, num_leaves to LightGBM only; dp_* to all (a model without DP must refuse
    it, not train without it); a name no model has is one line with the closest one."""
    from purchase_intent.commands import _params_by_model
    from purchase_intent.pipeline import check_params, model_parameters

    models = ["logreg", "lightgbm", "transformer", "ensemble"]
    got = _params_by_model({"max_epochs": 1, "num_leaves": 7, "dp_epsilon": 8}, models, model_parameters)
    assert got["transformer"] == {"max_epochs": 1, "dp_epsilon": 8}
    assert got["lightgbm"] == {"num_leaves": 7, "dp_epsilon": 8} and "ensemble" not in got
    assert got["logreg"] == {"dp_epsilon": 8}
    with pytest.raises(SystemExit, match=r"--param max_epoch: no model of logreg,lightgbm,transformer has it: did "
                                         r"you mean max_epochs \(transformer\)\?"):
        _params_by_model({"max_epoch": 1}, models, model_parameters)
    assert _params_by_model({"nope": 1}, ["lightgbm"], model_parameters) == {"lightgbm": {"nope": 1}}  # its check
    ok = _params_by_model({"max_epochs": 1, "num_leaves": 7}, models, model_parameters)
    for m, p in ok.items():
        check_params(m, p)  # each model has what it is given


# ----------------------------------------------------------------------------- short logs, dropped examples


def test_short_log_names_a_step_that_fits_and_that_step_builds(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    # 21 days with a 7d lookback and a 7d horizon leave 2 weekly cutoffs: too few for train, valid, test
    rc = main(["build", "--workspace", str(ws), "--lookback", "7d", "--horizon", "3d", "--step", "7d"])
    assert rc == 1
    err = capsys.readouterr().err
    m = re.search(r"--step (\d+[dh])\b", err)
    assert m and "smaller step" in err, err
    rc = main(["build", "--workspace", str(ws), "--lookback", "7d", "--horizon", "3d", "--step", m.group(1)])
    assert rc == 0, capsys.readouterr().err


def test_backtest_error_names_the_most_folds_that_fit():
    from purchase_intent.config import LabelConfig
    from purchase_intent.splits import TooFewPeriods, backtest_folds

    ex = pd.DataFrame({"period": [0, 1, 2, 3], "cutoff": pd.date_range("2024-03-01", periods=4, freq="7D"),
                       "label": [0, 1, 0, 1]})
    ex["label_end"] = ex["cutoff"] + pd.Timedelta("7D")
    with pytest.raises(TooFewPeriods, match="--backtest 2 or fewer"):
        backtest_folds(ex, 5, LabelConfig())
    assert len(backtest_folds(ex, 2, LabelConfig())) == 2


def test_build_says_what_it_dropped_by_reason(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    rc = main(["--workspace", str(ws), "build", "--task", "session", "--step", "2d"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    info = json.loads((ws / "examples" / "build.json").read_text())
    dropped = info["dropped"]
    assert set(dropped) == {"no event before the cutoff", "may continue after the end of the data"}
    assert dropped["no event before the cutoff"] > 0  # sessions that start with a purchase exist in the tiny log
    for reason, n in dropped.items():
        if n:
            assert f"dropped {n:,} of" in out and reason in out
    ex = pd.read_parquet(ws / "examples" / "examples.parquet")
    assert info["positives"] == int(ex["label"].sum()) and info["n_examples"] == len(ex)
    # session cutoffs are 1us after the last visible event: printed as that event's time
    assert ".000001" not in out


def test_user_task_build_counts_users_never_active(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    assert main(["--workspace", str(ws), "build", "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 0
    info = json.loads((ws / "examples" / "build.json").read_text())
    assert list(info["dropped"]) == ["users never active in a lookback window"]
    out = capsys.readouterr().out
    n = info["dropped"]["users never active in a lookback window"]
    assert f"dropped {n:,} of " in out or (n == 0 and "dropped nothing" in out)


def test_minimum_data_gate_says_how_many_positives_the_data_has(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    assert main(["--workspace", str(ws), "build", "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 0
    capsys.readouterr()
    assert main(["--workspace", str(ws), "train", "--model", "logreg"]) == 1
    err = capsys.readouterr().err
    total = json.loads((ws / "examples" / "build.json").read_text())["positives"]
    assert f"hold {total:,} positives in all" in err and "--min-positives" in err


# ----------------------------------------------------------------------------- score


def test_score_out_is_optional():
    args = build_parser().parse_args(["score", "--run", "logreg"])
    assert args.out is None
    assert build_parser().parse_args(["score", "--run", "logreg", "--out", "s.csv"]).out == "s.csv"


def test_score_without_out_writes_into_the_run_folder_and_prints_the_path(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    assert main(["build", "--workspace", str(ws), "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 0
    assert main(["train", "--workspace", str(ws), "--model", "logreg",
                 "--min-positives", "1", "--min-negatives", "1"]) == 0
    capsys.readouterr()
    assert main(["score", "--workspace", str(ws), "--run", "logreg", "--quiet"]) == 0
    out = capsys.readouterr().out
    written = [Path(p) for p in re.findall(r"wrote (\S+)", out)]
    assert written and written[0].exists(), out
    assert written[0].resolve().parent == (ws / "runs" / "logreg").resolve()


def test_a_model_that_takes_any_keyword_is_not_second_guessed(monkeypatch):
    def make_open(**params):  # no return annotation: the estimator's parameters cannot be listed
        return params

    monkeypatch.setitem(pipeline.MODELS, "open_model", make_open)
    assert pipeline.model_parameters("open_model") is None
    pipeline.check_params("open_model", {"anything": 1})
    with pytest.raises(ValueError, match="--seed"):
        pipeline.check_params("open_model", {"random_state": 1})


# ----------------------------------------------------------------------------- one writer at a time


def test_a_writing_command_on_a_busy_workspace_fails_at_once_with_one_line(events_csv, tmp_path, capsys):
    import threading

    from purchase_intent.workspace import Workspace
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    held, release = threading.Event(), threading.Event()

    def hold():
        with Workspace(ws).lock("train"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        capsys.readouterr()
        assert main(["build", "--workspace", str(ws), "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another train is running" in err, err
        assert not (ws / "examples").exists()  # nothing was written
        assert main(["pseudonym", "--workspace", str(ws), "u1"]) == 0  # a reading command goes on
    finally:
        release.set()
        t.join()
    assert main(["build", "--workspace", str(ws), "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 0


def test_a_damaged_run_is_named_with_what_to_do(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "ingest", str(events_csv)]) == 0
    assert main(["build", "--workspace", str(ws), "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 0
    assert main(["train", "--workspace", str(ws), "--model", "logreg",
                 "--min-positives", "1", "--min-negatives", "1"]) == 0
    run_json = ws / "runs" / "logreg" / "run.json"
    good = run_json.read_text()
    for damage in (good[: len(good) // 2], "[]", "\xff\xfe garbage"):
        run_json.write_text(damage, errors="surrogateescape")
        capsys.readouterr()
        assert main(["score", "--workspace", str(ws), "--run", "logreg", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged" in err and "train it again" in err, err
    run_json.write_text(good)
    model_dir = ws / "runs" / "logreg" / "model"
    for f in model_dir.iterdir():
        if f.is_file():
            f.write_bytes(f.read_bytes()[:10])
    assert main(["evaluate", "--workspace", str(ws), "--run", "logreg", "--n-boot", "10"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train it again" in err, err


# ----------------------------------------------------------------------------- time zones of presets


def _taobao_file(tiny_events, path: Path) -> Path:
    """The tiny log in the Taobao UserBehavior layout (no header; user, item, category, behaviour, epoch s)."""
    codes = {"view": "pv", "cart": "cart", "wishlist": "fav", "purchase": "buy"}
    t = tiny_events
    pd.DataFrame({"u": t["user_id"].str[1:], "i": t["item_id"].str[1:], "c": t["category"].str[1:],
                  "b": t["event"].map(codes), "ts": t["ts"].astype("int64") // 10**6}).to_csv(
        path, header=False, index=False)
    return path


@pytest.mark.parametrize("tz, hour", [(None, 16), ("UTC", 0), ("Europe/Berlin", 23)])
def test_a_preset_carries_its_sources_time_zone_unless_tz_says_otherwise(tiny_events, tmp_path, tz, hour, capsys):
    ws = tmp_path / "ws"
    src = _taobao_file(tiny_events, tmp_path / "UserBehavior.csv")
    assert main(["ingest", "--workspace", str(ws), str(src), "--format", "taobao"]) == 0
    flags = ["--lookback", "3d", "--horizon", "1d", "--step", "1d"] + (["--tz", tz] if tz else [])
    assert main(["build", "--workspace", str(ws), *flags]) == 0
    info = json.loads((ws / "examples" / "build.json").read_text())
    assert info["label_config"]["tz"] == (tz or "Asia/Shanghai")
    cutoffs = pd.read_parquet(ws / "examples" / "examples.parquet")["cutoff"]
    assert set(pd.to_datetime(cutoffs).dt.hour) == {hour}  # local midnight, in UTC (no DST in March 1-21)
    if tz is None:
        assert "midnight Asia/Shanghai" in capsys.readouterr().out


def test_a_plain_csv_keeps_utc_and_an_unknown_zone_is_one_line(events_csv, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["ingest", "--workspace", str(ws), str(events_csv)]) == 0
    assert main(["build", "--workspace", str(ws), "--lookback", "3d", "--horizon", "1d", "--step", "1d"]) == 0
    assert json.loads((ws / "examples" / "build.json").read_text())["label_config"]["tz"] == "UTC"
    capsys.readouterr()
    assert main(["build", "--workspace", str(ws), "--lookback", "3d", "--horizon", "1d", "--step", "1d",
                 "--tz", "Mars/Olympus"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown time zone 'Mars/Olympus'" in err


def test_a_field_mapped_twice_is_one_line(events_csv, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: --map gives 'ts' twice \('ts' and 'user_id'\); give it once$"):
        main(["ingest", "--workspace", str(tmp_path / "ws"), str(events_csv), "--map", "ts=ts", "--map", "ts=user_id"])


def test_ingest_that_accepts_no_row_fails_in_the_cli_with_the_values(tmp_path, capsys):
    src = tmp_path / "log.csv"
    src.write_text("user_id,ts,event\nu1,01.03.2024 10:00,view\nu2,02.03.2024 10:00,view\n")
    assert main(["--workspace", str(tmp_path / "ws"), "ingest", str(src)]) == 1
    err = capsys.readouterr().err
    assert "error: no row was accepted, nothing was stored" in err and "values shaped '99.99.9999 99:99'" in err
    assert "Traceback" not in err
    assert main(["--workspace", str(tmp_path / "ws"), "ingest", str(src), "--ts-format", "%d.%m.%Y %H:%M"]) == 0


def test_run_says_when_ingest_accepted_no_row(tmp_path, capsys):
    """Not 'run ingest first' (it just ran): every row rejected, with the reasons and where the rejects are."""
    src = tmp_path / "log.csv"
    src.write_text("user_id,ts,event\nu1,2024-03-01T10:00:00Z,view\nu2,2024-03-02T10:00:00Z,view\n")
    rc = main(["--workspace", str(tmp_path / "ws"), "run", "--data", str(src), "--until", "2020-01-01",
               "--models", "logreg"])
    out, err = capsys.readouterr()
    assert rc == 1 and "no row accepted" in out + err
    assert err.strip().splitlines()[-1] == f"error: ingest accepted no row of {src} (2 filtered): nothing to build"


def test_table_mode_warns_in_one_line_and_refuses_a_backtest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 600
    x = rng.normal(size=n)
    pd.DataFrame({"x": x, "y": (x + rng.normal(size=n) > 1).astype(int)}).to_csv(tmp_path / "t.csv", index=False)
    ws = str(tmp_path / "ws")
    assert main(["--workspace", ws, "run", "--table", str(tmp_path / "t.csv"), "--label", "y", "--models", "logreg",
                 "--min-positives", "10"]) == 0
    err = capsys.readouterr().err
    assert "warning: no time column given" in err and "UserWarning" not in err
    with pytest.raises(SystemExit, match="leave --backtest out"):
        main(["--workspace", ws, "run", "--table", str(tmp_path / "t.csv"), "--label", "y", "--backtest", "2"])


def test_pseudonym_of_an_empty_id_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="an empty id has no pseudonym"):
        main(["--workspace", str(tmp_path / "ws"), "pseudonym", "u1", " "])


def test_a_bad_inference_setting_and_a_table_folder_are_named_as_such(tmp_path, monkeypatch):
    """Not 'run ... is damaged; train it again' for a bad $PURCHASE_INTENT_INFERENCE, nor 'no run: train one' for
    the folder `run --table` writes."""
    from purchase_intent import runs

    run_dir = tmp_path / "runs" / "transformer"
    run_dir.mkdir(parents=True)
    (run_dir / runs.RUN_JSON).write_text(json.dumps({"model": "transformer"}))
    monkeypatch.setenv("PURCHASE_INTENT_INFERENCE", "bogus")
    with pytest.raises(ValueError, match="^PURCHASE_INTENT_INFERENCE='bogus': choose one of"):
        runs.load_run_dir(run_dir)
    table = tmp_path / "runs" / "table"
    table.mkdir()
    (table / "metrics.json").write_text('{"table": "split: ..."}')
    with pytest.raises(FileNotFoundError, match="holds the comparison of `run --table`"):
        runs.read_meta(table)
