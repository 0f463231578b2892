"""Quality benchmark of the behaviour-sequence Transformer against the baselines (pipeline API only).

Sections (each one workspace under ``--root``, each printed as the pipeline's comparison table
with paired bootstrap 95% intervals of the ROC-AUC difference to the best baseline):

* ``sim``      simulator at ``--sim-users`` users x 90 days (45k users ~ 200k examples):
               logreg, lightgbm, transformer, ensemble on the test window (and, with
               ``--sim-backtest K``, pooled over the last K weekly periods, each model refitted
               per fold: K times the test examples, so a narrower paired interval).
* ``ablation`` on the ``sim`` workspace: the Transformer on the sequence only and the features
               only; ``max_seq_len`` 20 / 100 / 200 (default 50); [CLS] alone instead of
               [CLS] + max-pool; with the hashed item id (``--ablations`` picks some).
* ``seeds``    on the ``sim`` workspace: the Transformer refitted with ``--seeds`` other random
               seeds (same data, same backtest) and the mean of all seeds' calibrated
               probabilities (``tx_seeds``, no LightGBM in it): how much of the Transformer's
               error is the variance of one network. ``--seed-ensemble K`` also fits the
               estimator's own seed ensemble (``n_seeds=K``, mean logit, one calibration) as ``tx_nK``.
* ``taobao``   Taobao UserBehavior head slice: user task (3d lookback, 1d horizon, 1d step,
               pooled backtest of 3 folds) and session task (30 min gap), all four models.
* ``curve``    simulator learning curve: test ROC-AUC of lightgbm and the Transformer vs users.

Usage::

    python benchmarks/bench_quality.py --sections sim,ablation,taobao,curve --out quality.md
    python benchmarks/bench_quality.py --sections taobao \
        --taobao ../shared/data/taobao_userbehavior/UserBehavior_head.csv.gz

The Taobao slice is small (815 users), so training uses ``TrainConfig(min_positives=20,
min_negatives=20)`` to pass the minimum-data gate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from purchase_intent import pipeline, runs
from purchase_intent.config import DataConfig, FeatureConfig, LabelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TAOBAO = ROOT.parent / "shared" / "data" / "taobao_userbehavior" / "UserBehavior_head.csv.gz"
MODELS = ("logreg", "lightgbm", "transformer", "ensemble")


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _tx_params(epochs: int | None) -> dict:
    return {} if epochs is None else {"max_epochs": epochs}


def _sim_workspace(root: Path, users: int, days: int = 90, seed: int = 0, reuse: bool = False) -> Path:
    from purchase_intent.simulate import SimConfig, write_events

    ws = root / f"sim-{users}u"
    if reuse and (ws / "events" / "manifest.json").exists():  # written when an ingest completes
        return ws  # the same seeded log: ingest is kept, build and models rerun
    ws = _fresh(root / f"sim-{users}u")
    data = ws / "events.csv.gz"
    write_events(SimConfig(n_users=users, days=days, seed=seed), data)
    pipeline.ingest(data, DataConfig(format="csv"), ws, progress=False)
    return ws


def _runs_table(ws: Path, runs: list[str]) -> str:
    return pipeline.compare(runs, ws, quiet=True)


def section_sim(root: Path, users: int, epochs: int | None, reuse: bool = False,
                backtest: int = 0) -> tuple[str, Path]:
    ws = _sim_workspace(root, users, reuse=reuse)
    table = pipeline.run(None, DataConfig(format="csv"), LabelConfig(), FeatureConfig(), models=MODELS,
                         params={"transformer": _tx_params(epochs)}, workspace=ws, report=False, quiet=True,
                         backtest=backtest)
    n = runs.load_built(ws).info["n_examples"]
    return (f"simulator, {users:,} users x 90 days, {n:,} examples "
            f"(transformer max_epochs={epochs or 'default'}, backtest {backtest})\n\n{table}", ws)


ABLATIONS = {"tx_sequence": {"inputs": "sequence"}, "tx_features": {"inputs": "tabular"},
             "tx_len20": {"max_seq_len": 20}, "tx_len100": {"max_seq_len": 100},
             "tx_len200": {"max_seq_len": 200}, "tx_cls": {"pooling": "cls"},
             "tx_item": {"drop_fields": []}}


def _fit_transformer(ws: Path, run: str, params: dict, train_cfg: TrainConfig | None = None,
                     backtest: int = 0) -> float:
    """Train and evaluate one Transformer run on the built workspace; its seconds."""
    t0 = time.perf_counter()
    pipeline.train("transformer", run=run, params=params, train_cfg=train_cfg, workspace=ws, quiet=True)
    pipeline.evaluate(run, ws, backtest=backtest, quiet=True)
    return round(time.perf_counter() - t0, 1)


def section_ablation(ws: Path, epochs: int | None, variants: list[str] | None = None) -> str:
    variants = {v: ABLATIONS[v] for v in (variants or ABLATIONS)}
    seconds = {run: _fit_transformer(ws, run, {**params, **_tx_params(epochs)}) for run, params in variants.items()}
    table = _runs_table(ws, ["lightgbm", "transformer", *variants])
    return (f"ablation on {ws.name} (transformer = the defaults; fit+evaluate seconds {json.dumps(seconds)})"
            f"\n\n{table}")


def _kept(ws: Path, run: str, backtest: int, params: dict, build_id: str) -> bool:
    """True when ``run`` can be kept: trained on the workspace's current build ``build_id`` with ``params``, and
    evaluated with a pooled backtest of exactly ``backtest`` folds (any, when only the test window is
    asked for: folds are numbered from the oldest, so runs of other fold counts would not line up)."""
    run_dir = ws / "runs" / run
    if not (run_dir / "metrics.json").exists() or not (run_dir / "run.json").exists():
        return False
    meta = json.loads((run_dir / "run.json").read_text())
    if meta.get("build_id") != build_id or meta.get("params", {}) != params:
        return False
    folds = json.loads((run_dir / "metrics.json").read_text()).get("backtest", {}).get("folds", [])
    return backtest == 0 or len(folds) == backtest


def section_seeds(ws: Path, seeds: int, epochs: int | None, backtest: int = 0, reuse: bool = False,
                  seed_ensemble: int = 0) -> str:
    from purchase_intent.ensemble import evaluate_ensemble
    from purchase_intent.workspace import Workspace

    build_id = runs.load_built(ws).info["build_id"]  # what a kept run must have been trained on
    seconds = {}
    for seed in range(1, seeds + 1):
        run = f"tx_seed{seed}"
        if reuse and _kept(ws, run, backtest, _tx_params(epochs), build_id):
            seconds[run] = "kept"  # same build, parameters and backtest: a resumed section
            continue
        seconds[run] = _fit_transformer(ws, run, _tx_params(epochs), TrainConfig(seed=seed), backtest)
    members = ["transformer", *seconds]
    evaluate_ensemble(Workspace(ws), members=members, run="tx_seeds")
    extra = []
    if seed_ensemble:  # the estimator's own seed ensemble: one model, mean logit, calibrated once
        run, params = f"tx_n{seed_ensemble}", {**_tx_params(epochs), "n_seeds": seed_ensemble}
        kept = reuse and _kept(ws, run, backtest, params, build_id)
        seconds[run] = "kept" if kept else _fit_transformer(ws, run, params, None, backtest)
        extra.append(run)
    table = _runs_table(ws, ["lightgbm", *members, "tx_seeds", *extra])
    return (f"seeds on {ws.name}: tx_seeds = mean of {len(members)} Transformers (seeds 0-{seeds}), backtest "
            f"{backtest} (fit+evaluate seconds {json.dumps(seconds)})\n\n{table}")


def section_taobao(root: Path, path: Path) -> str:
    data_cfg = DataConfig(format="taobao", since="2017-11-25T00:00:00+08:00", until="2017-12-04T00:00:00+08:00")
    train_cfg = TrainConfig(min_positives=20, min_negatives=20)
    out = []
    tasks = {
        "user (lookback 3d, horizon 1d, step 1d, backtest 3)":
            (LabelConfig(lookback="3d", horizon="1d", step="1d", tz="Asia/Shanghai"), 3),
        "session (gap 30min, step 1d)":
            (LabelConfig(task="session", session_gap="30min", step="1d", tz="Asia/Shanghai"), 3),
    }
    for i, (name, (label_cfg, backtest)) in enumerate(tasks.items()):
        ws = _fresh(root / f"taobao-{i}")
        t0 = time.perf_counter()
        table = pipeline.run(path, data_cfg, label_cfg, FeatureConfig(), models=MODELS, backtest=backtest,
                             train_cfg=train_cfg, workspace=ws, report=False, quiet=True)
        n = runs.load_built(ws).info["n_examples"]
        out.append(f"taobao head, {name}: {n:,} examples, {time.perf_counter() - t0:.0f}s\n\n{table}")
    return "\n\n".join(out)


def section_curve(root: Path, sizes: list[int], epochs: int | None) -> str:
    rows = ["users   examples  lightgbm AUC  transformer AUC  ΔAUC [95% CI]"]
    for users in sizes:
        ws = _sim_workspace(root, users)
        pipeline.run(None, DataConfig(format="csv"), LabelConfig(), FeatureConfig(), models=("lightgbm", "transformer"),
                     params={"transformer": _tx_params(epochs)}, workspace=ws, report=False, quiet=True)
        m = {r: json.loads((ws / "runs" / r / "metrics.json").read_text()) for r in ("lightgbm", "transformer")}
        p = m["transformer"]["paired"]["test"]
        lo, hi = p["ci"] or (float("nan"), float("nan"))
        rows.append(f"{users:6d}  {runs.load_built(ws).info['n_examples']:8d}  "
                    f"{m['lightgbm']['test']['roc_auc']:.4f}        {m['transformer']['test']['roc_auc']:.4f}"
                    f"           {p['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        shutil.rmtree(ws)
    return "simulator learning curve (test window)\n\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="sim,ablation,taobao,curve")
    ap.add_argument("--root", default="/tmp/pi-bench-quality", help="workspaces are created here")
    ap.add_argument("--sim-users", type=int, default=45_000)
    ap.add_argument("--epochs", type=int, default=None, help="transformer max_epochs (default: the model's)")
    ap.add_argument("--sim-backtest", type=int, default=0, help="sim: also a pooled backtest of this many folds")
    ap.add_argument("--reuse", action="store_true", help="sim: keep an existing simulated log and its ingest; "
                    "seeds: keep the seeds' runs already trained on this build with the same "
                    "parameters and evaluated with the same backtest")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated: " + ",".join(ABLATIONS))
    ap.add_argument("--seeds", type=int, default=2, help="seeds: how many extra Transformer seeds")
    ap.add_argument("--seed-ensemble", type=int, default=0,
                    help="seeds: also fit TransformerClassifier(n_seeds=K) as run tx_nK (0 = no)")
    ap.add_argument("--curve-users", default="2500,5000,10000,20000")
    ap.add_argument("--taobao", default=str(TAOBAO))
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    unknown = set(args.ablations.split(",")) - set(ABLATIONS)
    if unknown:
        ap.error(f"unknown ablations {sorted(unknown)}: choose from {', '.join(ABLATIONS)}")
    parts, sim_ws = [], None
    for s in sections:
        t0 = time.perf_counter()
        if s == "sim":
            text, sim_ws = section_sim(root, args.sim_users, args.epochs, reuse=args.reuse,
                                       backtest=args.sim_backtest)
        elif s == "ablation":
            sim_ws = sim_ws or (root / f"sim-{args.sim_users}u")
            text = section_ablation(sim_ws, args.epochs, args.ablations.split(","))
        elif s == "seeds":
            sim_ws = sim_ws or (root / f"sim-{args.sim_users}u")
            text = section_seeds(sim_ws, args.seeds, args.epochs, args.sim_backtest, reuse=args.reuse,
                                 seed_ensemble=args.seed_ensemble)
        elif s == "taobao":
            text = section_taobao(root, Path(args.taobao))
        elif s == "curve":
            text = section_curve(root, [int(u) for u in args.curve_users.split(",")], args.epochs)
        else:
            raise SystemExit(f"unknown section {s!r}")
        text += f"\n\n({s}: {time.perf_counter() - t0:.0f}s, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})"
        print(text + "\n", flush=True)
        parts.append("```\n" + text + "\n```")
    if args.out:
        Path(args.out).write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
