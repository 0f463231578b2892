"""Side-by-side with a peer library: pytorch-lifestream's CoLES recipe on exactly our examples and folds.

The peer is pytorch-lifestream (``import ptls``): CoLES self-supervised embeddings of each user's event
sequence (``TrxEncoder`` + GRU ``RnnSeqEncoder``, hidden 128; ``ColesDataset`` with the random-slices
splitter ``SampleSlices(split_count=5, ...)``; ``CoLESModule`` with its default contrastive loss; a
pytorch_lightning ``Trainer`` on CPU), then LightGBM on [our tabular features + the CoLES embedding].

The two sides live in different virtualenvs, so this is one script with three subcommands:

``export`` (our venv)
    From a workspace where ``purchase-intent run ... --models lightgbm,lightgbm_emb --pretrain --backtest K``
    ran, write to OUT: ``examples.parquet`` (example_id, user_id, cutoff, label), ``features.parquet``
    (example_id + our feature columns, aligned to the examples), ``folds.parquet`` (example_id, fold,
    role in train/valid/test, from ``purchase_intent.splits.backtest_folds``), ``fold_cutoffs.parquet``
    (fold, test cutoff) and ``events.parquet`` (user_id, ts, event, category, price).
``fit`` (the ptls venv; never imports purchase_intent)
    For each fold: pretrain CoLES on every user's events with ts < the fold's test cutoff; embed each
    example's last ``--max-len`` events with ts < its own cutoff; fit LightGBM on the fold's train rows
    (early stopping on its valid rows) on features + embedding, and, as a control, on the features
    alone; predict the fold's test rows; refit both with ``--lgb-seeds`` LightGBM seeds to show its seed
    noise. Writes ``predictions.parquet`` (example_id, fold, probability, probability_tab and the other
    seeds' probability_seedI / probability_tab_seedI), ``embedding_fold{K}.npz`` and ``peer.json``
    (settings and timings).
``compare`` (our venv)
    Joins the peer's predictions with our runs' backtest predictions on (example_id, fold), refuses
    unless they cover the same rows, prints a markdown table with pooled ROC-AUC / PR-AUC and paired
    bootstrap differences ours - peer (``purchase_intent.evaluate.paired_auc_difference``), and times.

Driver: ``benchmarks/peer_ptls.sh OUT_DIR [taobao|sim]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROLES = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# export (our virtualenv)
def cmd_export(args) -> None:
    from purchase_intent.runs import load_built
    from purchase_intent.splits import backtest_folds
    from purchase_intent.workspace import Workspace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ws = Workspace(args.workspace)
    built = load_built(ws)
    ex = built.examples
    examples = ex[["example_id", "user_id", "cutoff", "label"]].reset_index(drop=True)
    examples.to_parquet(out / "examples.parquet", index=False)
    feats = built.features.to_frame()
    if len(feats) != len(examples):
        raise SystemExit(f"features ({len(feats)}) and examples ({len(examples)}) differ in length")
    feats.insert(0, "example_id", examples["example_id"].to_numpy())
    feats.to_parquet(out / "features.parquet", index=False)

    folds = backtest_folds(ex, args.backtest, built.label_cfg)
    rows, cuts = [], []
    ids = examples["example_id"].to_numpy()
    for fold in folds:
        for role, mask in zip(ROLES, (fold.train_mask, fold.valid_mask, fold.test_mask)):
            sel = ids[np.asarray(mask)]
            rows.append(pd.DataFrame({"example_id": sel, "fold": fold.index, "role": role}))
        cuts.append({"fold": fold.index, "test_cutoff": pd.Timestamp(fold.cutoff)})
    pd.concat(rows, ignore_index=True).to_parquet(out / "folds.parquet", index=False)
    pd.DataFrame(cuts).to_parquet(out / "fold_cutoffs.parquet", index=False)

    con = ws.connect()
    have = {r[0] for r in con.execute("DESCRIBE events").fetchall()}
    cols = [c if c in have else f"NULL AS {c}" for c in ("user_id", "ts", "event", "category", "price")]
    sql = f"SELECT {', '.join(cols)} FROM events ORDER BY user_id, ts"
    target = str(out / "events.parquet").replace("'", "''")
    con.execute(f"COPY ({sql}) TO '{target}' (FORMAT PARQUET)")
    n_events = con.execute(f"SELECT count(*) FROM read_parquet('{target}')").fetchone()[0]
    meta = {"workspace": str(Path(args.workspace).resolve()), "backtest": args.backtest,
            "build_id": built.info.get("build_id"), "label_config": built.info.get("label_config"),
            "n_examples": len(examples), "n_features": feats.shape[1] - 1, "n_events": int(n_events),
            "folds": [{"fold": f.index, "test_cutoff": str(f.cutoff), "train": int(np.sum(f.train_mask)),
                       "valid": int(np.sum(f.valid_mask)), "test": int(np.sum(f.test_mask))} for f in folds]}
    (out / "export.json").write_text(json.dumps(meta, indent=2, default=str))
    print(f"exported {len(examples):,} examples, {feats.shape[1] - 1} features, {len(folds)} folds, "
          f"{n_events:,} events -> {out}")


# ---------------------------------------------------------------------------------------------
# fit (the ptls virtualenv)
HOUR_S = 3600.0
EPOCH = pd.Timestamp(0, tz="UTC")


class EventTable:
    """Events sorted by (user, ts) as flat arrays, with each user's slice, for fast history cuts."""

    def __init__(self, events: pd.DataFrame):
        ev = events.sort_values(["user_id", "ts"], kind="mergesort").reset_index(drop=True)
        self.users, starts = np.unique(ev["user_id"].to_numpy(), return_index=True)
        self.bounds = np.r_[starts, len(ev)]
        ts = pd.to_datetime(ev["ts"], utc=True)
        self.t = ((ts - EPOCH) // pd.Timedelta(microseconds=1)).to_numpy(np.int64)  # microseconds since the epoch
        self.event = ev["event"].astype(str).to_numpy()
        self.category = ev["category"].astype("string").fillna("<none>").to_numpy(dtype=object)
        self.price = pd.to_numeric(ev["price"], errors="coerce").fillna(0.0).to_numpy(np.float64)
        self.hour = ts.dt.hour.to_numpy(np.int64)
        self.weekday = ts.dt.day_of_week.to_numpy(np.int64)
        dt = np.diff(self.t, prepend=self.t[:1]) / 1e6 / HOUR_S
        dt[starts] = 0.0  # first event of each user: no previous event
        self.dt_hours = dt

    def user_slice(self, user) -> tuple[int, int]:
        i = np.searchsorted(self.users, user)
        if i >= len(self.users) or self.users[i] != user:
            return 0, 0
        return int(self.bounds[i]), int(self.bounds[i + 1])


class Encoding:
    """Categorical codes fitted on the pretraining events only (ptls convention: 0 is padding,
    codes by decreasing frequency, rare categories share the last code)."""

    def __init__(self, table: EventTable, idx: np.ndarray, max_categories: int):
        ev, n_ev = np.unique(table.event[idx], return_counts=True)
        self.event = {v: i + 1 for i, v in enumerate(ev[np.argsort(-n_ev, kind="stable")])}
        cat, n_cat = np.unique(table.category[idx].astype(str), return_counts=True)
        order = cat[np.argsort(-n_cat, kind="stable")][: max_categories - 1]
        self.category = {v: i + 1 for i, v in enumerate(order)}
        self.n_event = len(self.event) + 2
        self.n_category = max_categories + 1  # codes 1..max-1 for the frequent ones, max for every other

    def codes(self, table: EventTable) -> dict[str, np.ndarray]:
        other_ev = self.n_event - 1
        other_cat = self.n_category - 1
        return {
            "event_type": np.array([self.event.get(v, other_ev) for v in table.event], dtype=np.int64),
            "category": np.array([self.category.get(v, other_cat) for v in table.category.astype(str)],
                                 dtype=np.int64),
        }


def _feature_dict(torch, table: EventTable, codes: dict, lo: int, hi: int) -> dict:
    sl = slice(lo, hi)
    return {
        "event_time": torch.from_numpy(table.t[sl].astype(np.float64) / 1e6),
        "event_type": torch.from_numpy(codes["event_type"][sl]),
        "category": torch.from_numpy(codes["category"][sl]),
        "hour": torch.from_numpy(table.hour[sl] + 1),
        "weekday": torch.from_numpy(table.weekday[sl] + 1),
        "price": torch.from_numpy(table.price[sl].astype(np.float32)),
        "dt_hours": torch.from_numpy(table.dt_hours[sl].astype(np.float32)),
    }


def _micros(t) -> int:
    """Microseconds since the epoch of a timestamp (naive = UTC)."""
    t = pd.Timestamp(t)
    return int(((t.tz_localize("UTC") if t.tzinfo is None else t) - EPOCH) // pd.Timedelta(microseconds=1))


def _lgb_params(seed: int, threads: int) -> dict:
    # the same LightGBM settings as our `lightgbm` / `lightgbm_emb` runs (purchase_intent defaults), so that
    # the two sides differ only in the embedding
    return {"objective": "binary", "metric": "binary_logloss", "learning_rate": 0.05, "num_leaves": 31,
            "min_data_in_leaf": 20, "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8,
            "lambda_l2": 1.0, "num_threads": threads, "seed": seed, "deterministic": True, "force_col_wise": True,
            "verbose": -1}


def _fit_lgb(lgb, X_tr, y_tr, X_va, y_va, X_te, seed: int, threads: int) -> tuple[np.ndarray, int]:
    train = lgb.Dataset(X_tr, label=y_tr, free_raw_data=True)
    valid = lgb.Dataset(X_va, label=y_va, reference=train)
    booster = lgb.train(_lgb_params(seed, threads), train, num_boost_round=400, valid_sets=[valid],
                        callbacks=[lgb.early_stopping(50, verbose=False)])
    best = booster.best_iteration or booster.num_trees()
    return booster.predict(X_te, num_iteration=best), int(best)


def auto_slices(lengths: np.ndarray, cnt_min: int, cnt_max: int) -> tuple[int, int]:
    """SampleSlices' cnt_min / cnt_max for these pretraining history lengths, unless given.

    The published recipe uses 25 / 200 on bank transactions (hundreds of events per client); here
    cnt_min is a quarter of the median history (5..25) and cnt_max its 90th percentile (2*cnt_min..200).
    """
    if cnt_min <= 0:
        cnt_min = int(np.clip(np.median(lengths) // 4, 5, 25))
    if cnt_max <= 0:
        cnt_max = int(np.clip(np.percentile(lengths, 90), 2 * cnt_min, 200))
    return cnt_min, cnt_max


def cmd_fit(args) -> None:
    from functools import partial

    import lightgbm as lgb
    import pytorch_lightning as pl
    import torch
    from ptls.data_load.datasets import MemoryMapDataset
    from ptls.data_load.utils import collate_feature_dict
    from ptls.frames import PtlsDataModule
    from ptls.frames.coles import ColesDataset, CoLESModule
    from ptls.frames.coles.split_strategy import SampleSlices
    from ptls.nn import RnnSeqEncoder, TrxEncoder

    src, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    examples = pd.read_parquet(src / "examples.parquet")
    feats = pd.read_parquet(src / "features.parquet")
    folds = pd.read_parquet(src / "folds.parquet")
    cutoffs = pd.read_parquet(src / "fold_cutoffs.parquet")
    t0 = time.perf_counter()
    table = EventTable(pd.read_parquet(src / "events.parquet"))
    print(f"loaded {len(table.t):,} events of {len(table.users):,} users in {time.perf_counter() - t0:.1f}s",
          flush=True)
    if not (feats["example_id"].to_numpy() == examples["example_id"].to_numpy()).all():
        raise SystemExit("features.parquet is not aligned to examples.parquet")
    X_tab = feats.drop(columns=["example_id"]).to_numpy(np.float64)
    ex_pos = pd.Series(np.arange(len(examples)), index=examples["example_id"].to_numpy())
    ex_cut = np.array([_micros(t) for t in examples["cutoff"]], dtype=np.int64)
    ex_user = examples["user_id"].to_numpy()
    y_all = examples["label"].to_numpy().astype(np.int64)
    if args.folds:
        cutoffs = cutoffs[cutoffs["fold"].isin(args.folds)]

    preds, fold_info = [], []
    for _, crow in cutoffs.sort_values("fold").iterrows():
        k = int(crow["fold"])
        t_cut = _micros(crow["test_cutoff"])
        seed = args.seed + k
        pl.seed_everything(seed, workers=True)
        # --- CoLES pretraining on every user's events before the fold's test cutoff
        t0 = time.perf_counter()
        records, pre_idx = [], []
        for u in range(len(table.users)):
            lo, hi = int(table.bounds[u]), int(table.bounds[u + 1])
            hi = lo + int(np.searchsorted(table.t[lo:hi], t_cut, side="left"))
            if hi > lo:
                pre_idx.append(np.arange(max(lo, hi - args.pretrain_max_len), hi))
        pre_idx_all = np.concatenate(pre_idx)
        enc = Encoding(table, pre_idx_all, args.max_categories)
        codes = enc.codes(table)
        lengths = np.array([len(i) for i in pre_idx])
        cnt_min, cnt_max = auto_slices(lengths, args.cnt_min, args.cnt_max)
        for i in pre_idx:
            if len(i) >= cnt_min:  # the recipe's SeqLenFilter(min_seq_len=cnt_min)
                records.append(_feature_dict(torch, table, codes, int(i[0]), int(i[-1]) + 1))
        seq_encoder = RnnSeqEncoder(
            trx_encoder=TrxEncoder(
                embeddings={"event_type": {"in": enc.n_event, "out": 8},
                            "category": {"in": enc.n_category, "out": 16},
                            "hour": {"in": 25, "out": 4}, "weekday": {"in": 8, "out": 2}},
                numeric_values={"price": "log", "dt_hours": "log"},
                embeddings_noise=0.003,
            ),
            hidden_size=args.hidden, type="gru",
        )
        module = CoLESModule(seq_encoder=seq_encoder,
                             optimizer_partial=partial(torch.optim.Adam, lr=args.lr),
                             lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=30, gamma=0.9))
        dm = PtlsDataModule(
            train_data=ColesDataset(MemoryMapDataset(data=records),
                                    splitter=SampleSlices(split_count=5, cnt_min=cnt_min, cnt_max=cnt_max)),
            train_num_workers=0, train_batch_size=args.batch_size)
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                             enable_checkpointing=False, logger=False, enable_model_summary=False,
                             deterministic=True)
        trainer.fit(module, dm)
        loss = trainer.callback_metrics.get("loss")
        t_pre = time.perf_counter() - t0
        print(f"fold {k}: CoLES on {len(records):,} users ({int(lengths.sum()):,} events before "
              f"{EPOCH + pd.Timedelta(microseconds=t_cut)}), slices {cnt_min}..{cnt_max}, {args.epochs} epochs: "
              f"{t_pre:.1f}s, last batch loss {float(loss) if loss is not None else float('nan'):.4f}", flush=True)

        # --- embed each example of the fold: its last max_len events before its own cutoff
        t0 = time.perf_counter()
        fk = folds[folds["fold"] == k]
        pos = ex_pos.loc[fk["example_id"].to_numpy()].to_numpy()
        enc_net = module.seq_encoder.eval()
        emb = np.zeros((len(pos), args.hidden), dtype=np.float64)
        n_empty = 0
        with torch.no_grad():
            for s in range(0, len(pos), 512):
                batch, rows = [], []
                for r, p in enumerate(pos[s:s + 512]):
                    lo, hi = table.user_slice(ex_user[p])
                    hi = lo + int(np.searchsorted(table.t[lo:hi], ex_cut[p], side="left"))
                    if hi <= lo:
                        n_empty += 1
                        continue
                    batch.append(_feature_dict(torch, table, codes, max(lo, hi - args.max_len), hi))
                    rows.append(s + r)
                if batch:
                    emb[rows] = enc_net(collate_feature_dict(batch)).double().numpy()
        t_emb = time.perf_counter() - t0

        # --- LightGBM on features + embedding (and on the features alone), train rows, early stop on valid
        t0 = time.perf_counter()
        role = fk["role"].to_numpy()
        Xf = np.hstack([X_tab[pos], emb])
        y = y_all[pos]
        m = {r: role == r for r in ROLES}
        p_emb, it_emb = _fit_lgb(lgb, Xf[m["train"]], y[m["train"]], Xf[m["valid"]], y[m["valid"]],
                                 Xf[m["test"]], seed, args.threads)
        t_lgb = time.perf_counter() - t0
        Xt = X_tab[pos]
        p_tab, it_tab = _fit_lgb(lgb, Xt[m["train"]], y[m["train"]], Xt[m["valid"]], y[m["valid"]],
                                 Xt[m["test"]], seed, args.threads)
        frame = pd.DataFrame({"example_id": fk["example_id"].to_numpy()[m["test"]], "fold": k,
                              "probability": p_emb, "probability_tab": p_tab})
        # LightGBM's own seed noise (bagging, feature sampling): refit with other seeds, same embedding
        for i in range(1, args.lgb_seeds):
            frame[f"probability_seed{i}"] = _fit_lgb(lgb, Xf[m["train"]], y[m["train"]], Xf[m["valid"]], y[m["valid"]],
                                                     Xf[m["test"]], seed + 1000 * i, args.threads)[0]
            frame[f"probability_tab_seed{i}"] = _fit_lgb(lgb, Xt[m["train"]], y[m["train"]], Xt[m["valid"]],
                                                         y[m["valid"]], Xt[m["test"]], seed + 1000 * i, args.threads)[0]
        preds.append(frame)
        np.savez_compressed(out / f"embedding_fold{k}.npz", example_id=fk["example_id"].to_numpy(), role=role,
                            embedding=emb.astype(np.float32))
        info = {"fold": k, "test_cutoff": str(EPOCH + pd.Timedelta(microseconds=t_cut)), "pretrain_users": len(records),
                "pretrain_events": int(lengths.sum()), "cnt_min": cnt_min, "cnt_max": cnt_max,
                "coles_seconds": round(t_pre, 2), "coles_last_batch_loss": float(loss) if loss is not None else None,
                "embed_seconds": round(t_emb, 2), "embedded_examples": len(pos), "empty_histories": n_empty,
                "lightgbm_seconds": round(t_lgb, 2), "lightgbm_trees": it_emb, "lightgbm_tab_trees": it_tab,
                "train": int(m["train"].sum()), "valid": int(m["valid"].sum()), "test": int(m["test"].sum())}
        fold_info.append(info)
        print(f"fold {k}: embedded {len(pos):,} examples in {t_emb:.1f}s; LightGBM {t_lgb:.1f}s "
              f"({it_emb} trees; features only {it_tab})", flush=True)

    pd.concat(preds, ignore_index=True).to_parquet(out / "predictions.parquet", index=False)
    from importlib.metadata import version
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "peer.json").write_text(json.dumps({
        "library": f"pytorch-lifestream {version('pytorch-lifestream')}", "torch": torch.__version__,
        "pytorch_lightning": pl.__version__, "lightgbm": lgb.__version__, "settings": settings,
        "folds": fold_info}, indent=2))
    print(f"wrote {out / 'predictions.parquet'}")


# ---------------------------------------------------------------------------------------------
# compare (our virtualenv)
def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"


def cmd_compare(args) -> None:
    from purchase_intent.evaluate import average_precision, paired_auc_difference, roc_auc, roc_auc_ci

    ws = Path(args.workspace)
    peer = pd.read_parquet(Path(args.peer) / "predictions.parquet")
    peer_meta = json.loads((Path(args.peer) / "peer.json").read_text())
    ours = {}
    for r in args.runs:
        p = pd.read_parquet(ws / "runs" / r / "predictions.parquet")
        ours[r] = p[p["split"] == "backtest"][["example_id", "fold", "label", "probability"]]
    key = ["example_id", "fold"]
    ref_keys = set(map(tuple, peer[key].to_numpy().tolist()))
    for r, p in ours.items():
        k = set(map(tuple, p[key].to_numpy().tolist()))
        if k != ref_keys or len(k) != len(p) or len(ref_keys) != len(peer):
            raise SystemExit(f"run {r!r} and the peer do not cover the same (example_id, fold) rows: "
                             f"{len(k - ref_keys)} only in ours, {len(ref_keys - k)} only in the peer")
    j = peer.rename(columns={"probability": "peer", "probability_tab": "peer_tab"})
    for r, p in ours.items():
        j = j.merge(p.rename(columns={"probability": r, "label": f"label_{r}"}), on=key, how="inner")
    y = j[f"label_{args.runs[0]}"].to_numpy()
    for r in args.runs[1:]:
        if not (j[f"label_{r}"].to_numpy() == y).all():
            raise SystemExit(f"labels of {r!r} and {args.runs[0]!r} differ")
    nb = args.n_boot
    names = {**{r: f"ours: {r}" for r in args.runs}, "peer": "peer: CoLES (ptls) + LightGBM",
             "peer_tab": "peer stage, features only (control)"}
    lines = [f"pooled backtest, {j['fold'].nunique()} folds, n = {len(j):,}, positives = {int(y.sum()):,}", "",
             "| model | ROC-AUC [95% CI] | PR-AUC | ΔROC-AUC vs peer [95% CI] | ΔPR-AUC vs peer [95% CI] |",
             "|---|---|---|---|---|"]
    for c in list(args.runs) + ["peer", "peer_tab"]:
        p = j[c].to_numpy()
        ci = roc_auc_ci(y, p, n_boot=nb)
        row = f"| {names[c]} | {roc_auc(y, p):.4f} {_fmt_ci(ci).replace('+', '')} | {average_precision(y, p):.4f} |"
        if c == "peer":
            row += " (reference) | (reference) |"
        else:
            d = paired_auc_difference(y, p, j["peer"].to_numpy(), n_boot=nb)
            row += f" {d['diff']:+.4f} {_fmt_ci(d['ci'])} | {d['pr_auc']['diff']:+.4f} {_fmt_ci(d['pr_auc']['ci'])} |"
        lines.append(row)
    lines += ["", "per fold ROC-AUC:", "",
              "| fold | n | " + " | ".join(names[c] for c in list(args.runs) + ["peer", "peer_tab"]) + " |",
              "|---|---|" + "---|" * (len(args.runs) + 2)]
    for k, g in j.groupby("fold"):
        yk = g[f"label_{args.runs[0]}"].to_numpy()
        cells = " | ".join(f"{roc_auc(yk, g[c].to_numpy()):.4f}" for c in list(args.runs) + ["peer", "peer_tab"])
        lines.append(f"| {k} | {len(g):,} | {cells} |")
    seeds = sorted(int(c[len("probability_seed"):]) for c in j.columns if c.startswith("probability_seed"))
    if seeds:
        lines += ["", f"LightGBM seed noise in the peer stage ({len(seeds) + 1} LightGBM seeds, the same CoLES "
                  "embedding and features; pooled ROC-AUC):", "",
                  "| | mean | sd | min | max |", "|---|---|---|---|---|"]
        for label, cols in (("features + CoLES", ["peer"] + [f"probability_seed{i}" for i in seeds]),
                            ("features only", ["peer_tab"] + [f"probability_tab_seed{i}" for i in seeds])):
            a = np.array([roc_auc(y, j[c].to_numpy()) for c in cols])
            lines.append(f"| {label} | {a.mean():.4f} | {a.std(ddof=1):.4f} | {a.min():.4f} | {a.max():.4f} |")
            j[f"avg {label}"] = j[cols].mean(axis=1)
        d = paired_auc_difference(y, j["avg features + CoLES"].to_numpy(), j["avg features only"].to_numpy(), n_boot=nb)
        c = paired_auc_difference(y, j[args.runs[0]].to_numpy(), j["peer_tab"].to_numpy(), n_boot=nb)
        lines += ["", f"Mean probability of the {len(seeds) + 1} LightGBM fits: features + CoLES "
                  f"{roc_auc(y, j['avg features + CoLES'].to_numpy()):.4f}, features only "
                  f"{roc_auc(y, j['avg features only'].to_numpy()):.4f}; difference {d['diff']:+.4f} "
                  f"{_fmt_ci(d['ci'])}. "
                  f"Ours {args.runs[0]} - the peer stage's features-only control (the same features and LightGBM "
                  f"settings, another seed): {c['diff']:+.4f} {_fmt_ci(c['ci'])}."]
    cfg_path = ws / "runs" / "pretrained" / "config.json"
    ours_s = json.loads(cfg_path.read_text())["result"]["seconds"] if cfg_path.exists() else None
    folds = peer_meta["folds"]
    lines += ["", "time (seconds):", "",
              "| | ours | peer |", "|---|---|---|",
              f"| encoder pretraining | {ours_s} (one encoder, before the earliest test window) | "
              f"{sum(f['coles_seconds'] for f in folds):.1f} in all, per fold "
              f"{', '.join(str(f['coles_seconds']) for f in folds)} |",
              f"| embedding the fold's examples | - | {', '.join(str(f['embed_seconds']) for f in folds)} |",
              f"| LightGBM on features + embedding | - | {', '.join(str(f['lightgbm_seconds']) for f in folds)} |"]
    s = peer_meta["settings"]
    slices = ", ".join(f"{f['cnt_min']}/{f['cnt_max']}" for f in folds)
    lines += ["", f"peer settings: {peer_meta['library']}, GRU hidden {s['hidden']}, SampleSlices(split_count=5, "
              f"cnt_min/cnt_max per fold {slices}), "
              f"{s['epochs']} epochs, batch {s['batch_size']} users, Adam lr {s['lr']}, last {s['max_len']} events "
              f"embedded, seed {s['seed']}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="our venv: examples, features, folds and events of a workspace")
    e.add_argument("--workspace", required=True)
    e.add_argument("--backtest", type=int, required=True, help="K of the runs' --backtest")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)
    f = sub.add_parser("fit", help="ptls venv: CoLES + LightGBM per fold")
    f.add_argument("--data", required=True, help="folder written by export")
    f.add_argument("--out", required=True)
    f.add_argument("--epochs", type=int, default=20)
    f.add_argument("--batch-size", type=int, default=64, help="users per batch (each gives split_count slices)")
    f.add_argument("--lr", type=float, default=0.001)
    f.add_argument("--hidden", type=int, default=128)
    f.add_argument("--cnt-min", type=int, default=0, help="SampleSlices cnt_min (0: from the history lengths)")
    f.add_argument("--cnt-max", type=int, default=0, help="SampleSlices cnt_max (0: from the history lengths)")
    f.add_argument("--max-len", type=int, default=150, help="events of each example's history embedded")
    f.add_argument("--pretrain-max-len", type=int, default=1000, help="last events per user in pretraining")
    f.add_argument("--max-categories", type=int, default=1000)
    f.add_argument("--lgb-seeds", type=int, default=5,
                   help="also refit LightGBM with this many seeds in all, to show its seed noise")
    f.add_argument("--folds", type=int, nargs="*", help="only these folds (default: all)")
    f.add_argument("--threads", type=int, default=1,
                   help="torch and LightGBM threads (1: on a busy machine two spin-waiting OpenMP pools crawl)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_fit)
    c = sub.add_parser("compare", help="our venv: the table")
    c.add_argument("--workspace", required=True)
    c.add_argument("--peer", required=True, help="folder written by fit")
    c.add_argument("--runs", nargs="+", default=["lightgbm", "lightgbm_emb"])
    c.add_argument("--n-boot", type=int, default=1000)
    c.add_argument("--out", help="also write the table here")
    c.set_defaults(func=cmd_compare)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
