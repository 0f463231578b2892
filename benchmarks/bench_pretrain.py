"""Pretrained encoder on the simulator: the three objectives, the two models that use it, and speed.

    .venv/bin/python benchmarks/bench_pretrain.py --users 2000 --days 63 --out benchmarks/results/pretrain.md

One workspace (simulated shop, default LabelConfig: lookback 28d, horizon 7d, step 7d; the test
split is the last period). For each objective the encoder is pretrained on every user's events
before the first test cutoff (``PretrainConfig`` cutoff "auto"), then ``transformer_pt`` and
``lightgbm_emb`` are fitted on train (valid for early stopping / calibration) and scored on test,
against ``lightgbm`` and the from-scratch ``transformer`` fitted the same way; differences come with
paired bootstrap 95% intervals (``evaluate.paired_auc_difference``). ``--label-fraction 0.1`` also
fits every model on the train examples of 10% of the users (pretraining still sees everyone).
``--pt-variant NAME:KEY=VALUE,...`` (repeatable) also fits ``transformer_pt`` with those parameters in
the same run (same examples, same resamples), compared with the default ``transformer_pt`` too;
``--seed`` is the models' seed (the data, the label subset and the encoder stay the same).
Speed: pretraining sequences/s of the tiny encoder at length 200 (masked objective) and embedding
extraction users/s, on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sim_shop import labelled_rows, simulated_shop
from sklearn.metrics import average_precision_score, roc_auc_score

from purchase_intent import pipeline
from purchase_intent.config import TrainConfig
from purchase_intent.evaluate import paired_auc_difference
from purchase_intent.models.pretraining import embed, load_encoder, make_objective, pretrain_encoder
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.pretrain import PretrainConfig, pretrain
from purchase_intent.runs import model_inputs, model_vocab
from purchase_intent.sequences import SequenceConfig, build_sequences
from purchase_intent.train import TrainLoopConfig
from purchase_intent.workspace import Workspace


def fit_and_score(name, params, built, tr, va, te, ws, seed=0):
    t0 = time.perf_counter()
    model = pipeline.fit_model(name, params, built, tr, va, ws, TrainConfig(min_positives=20, min_negatives=20,
                                                                           seed=seed))
    secs = time.perf_counter() - t0
    p = model.predict_proba(model_inputs(name, built, te, ws, model_vocab(model)))[:, 1]
    return p, secs


def speed(ws: Workspace, n: int = 2048) -> dict:
    con = ws.connect()
    con.execute("CREATE TABLE sp AS SELECT (row_number() OVER (ORDER BY user_id) - 1)::BIGINT AS example_id, "
                "user_id, (SELECT max(ts) FROM events) AS cutoff FROM (SELECT DISTINCT user_id FROM events)")
    a = build_sequences(con, "sp", SequenceConfig(max_seq_len=200))
    fields = ["event", "category", "price", "dt_cutoff", "dt_prev", "hour", "weekday", "item_state"]
    sizes = {f: int(a[f].max()) + 1 for f in fields}
    rows = np.sort(np.argsort(-a["mask"].sum(axis=1), kind="stable")[:n])  # the longest, in user order
    data = {f: a[f][rows] for f in fields}
    data["mask"] = a["mask"][rows]
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=200, use_tabular=False))
    res = pretrain_encoder(make_objective("masked", net), data, TrainLoopConfig(max_epochs=1, batch_size=256))
    t0 = time.perf_counter()
    embed(net, data)
    emb_200 = n / (time.perf_counter() - t0)
    data50 = {k: v[:, -50:] for k, v in data.items()}
    t0 = time.perf_counter()
    embed(net, data50)
    emb_50 = n / (time.perf_counter() - t0)
    return {"seq_per_s": res.sequences_per_s, "mean_len": float(data["mask"].sum(1).mean()),
            "embed_200": emb_200, "embed_50": emb_50, "n": n}


def parse_params(pairs):
    """KEY=VALUE strings -> dict; numbers, true/false as JSON, anything else a string."""
    out = {}
    for p in pairs:
        k, v = p.split("=", 1)
        out[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    return out


def fmt_ci(d):
    return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--epochs", type=int, default=4, help="pretraining epochs")
    ap.add_argument("--window", type=int, default=PretrainConfig.max_seq_len, help="pretraining events per user")
    ap.add_argument("--objectives", default="masked,contrastive,next")
    ap.add_argument("--label-fraction", type=float, default=0.0)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--pt-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter of transformer_pt (e.g. freeze_encoder=true, lr=3e-4); repeatable")
    ap.add_argument("--pt-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also fit transformer_pt with these parameters (e.g. lpft:freeze_epochs=3); repeatable")
    ap.add_argument("--seed", type=int, default=0, help="the models' seed")
    ap.add_argument("--workdir", default="/tmp/bench_pretrain")
    ap.add_argument("--out", default="benchmarks/results/pretrain.md")
    args = ap.parse_args()
    pt_params = parse_params(args.pt_param)
    variants = [("", {})]
    for v in args.pt_variant:
        vname, _, rest = v.partition(":")
        variants.append((vname, parse_params(rest.split(",") if rest else [])))
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    work = Path(args.workdir)
    ws, built, (tr, va, te) = simulated_shop(work, args.users, args.days)
    y = built.examples["label"].to_numpy()
    yt = y[te]
    lines = []
    log = print
    log(f"examples: train {len(tr)} valid {len(va)} test {len(te)}; test positives {int(yt.sum())}")

    subsets = [("100%", tr)]
    if args.label_fraction:
        subsets.append((f"{args.label_fraction:.0%}", labelled_rows(built.examples, tr, args.label_fraction)))

    preds: dict = {}
    secs: dict = {}
    for tag, rows in subsets:
        for name, params in (("lightgbm", {}), ("transformer", {})):
            preds[(tag, name)], secs[(tag, name)] = fit_and_score(name, params, built, rows, va, te, ws, args.seed)
            log(f"{tag} {name}: {roc_auc_score(yt, preds[(tag, name)]):.4f} ({secs[(tag, name)]:.0f}s)")
    pre: dict = {}
    for obj in args.objectives.split(","):
        t0 = time.perf_counter()
        enc = pretrain(ws, PretrainConfig(objective=obj, epochs=args.epochs, max_seq_len=args.window))
        pre[obj] = time.perf_counter() - t0
        keep = work / f"encoder_{obj}"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(enc, keep)
        _, meta = load_encoder(keep)
        log(f"pretrained {obj} in {pre[obj]:.0f}s, loss {meta['result']['loss_history']}")
        for tag, rows in subsets:
            fits = [(f"transformer_pt[{obj}]" + (f" {vname}" if vname else ""), "transformer_pt",
                     {**pt_params, **extra}) for vname, extra in variants]
            fits.append((f"lightgbm_emb[{obj}]", "lightgbm_emb", {}))
            for label, name, extra in fits:
                key = (tag, label)
                params = {"encoder": str(keep), **extra}
                preds[key], secs[key] = fit_and_score(name, params, built, rows, va, te, ws, args.seed)
                log(f"{tag} {key[1]}: {roc_auc_score(yt, preds[key]):.4f} ({secs[key]:.0f}s)")
    sp = speed(ws)
    load1 = open("/proc/loadavg").read().split()[:3]

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines += [f"## Pretrained encoder ({today})", "",
              f"Command: `.venv/bin/python benchmarks/bench_pretrain.py --users {args.users} --days {args.days} "
              f"--epochs {args.epochs}" + (f" --window {args.window}" if args.window != PretrainConfig.max_seq_len
                                           else "") + f" --objectives {args.objectives}"
              + (f" --label-fraction {args.label_fraction}" if args.label_fraction else "")
              + f" --n-boot {args.n_boot}" + "".join(f" --pt-param {p}" for p in args.pt_param)
              + "".join(f" --pt-variant {v}" for v in args.pt_variant)
              + (f" --seed {args.seed}" if args.seed else "") + "`",
              "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared VM), "
              f"load average at start {' '.join(load0)}, at end {' '.join(load1)}; total "
              f"{time.perf_counter() - t_start:.0f}s.",
              "",
              f"Simulator {args.users:,} users x {args.days} days (seed 0), default LabelConfig; train {len(tr):,}, "
              f"valid {len(va):,}, test {len(te):,} examples ({int(yt.sum())} test positives). Encoder: tiny preset, "
              f"window {args.window}, {args.epochs} epochs, cutoff = first test cutoff. Test-split metrics; "
              f"differences are paired bootstrap 95% intervals ({args.n_boot} resamples) against the reference named; "
              f"models' seed {args.seed}.", ""]
    for tag, _ in subsets:
        refs = ["lightgbm", "transformer"] + ([f"transformer_pt[{o}]" for o in pre] if len(variants) > 1 else [])
        lines += [f"### Labels: {tag} of the train examples' users", "",
                  "| model | ROC-AUC | PR-AUC | fit s | " + " | ".join(f"ROC-AUC - {r}" for r in refs) + " |",
                  "|---|---|---|---|" + "---|" * len(refs)]
        for key in [k for k in preds if k[0] == tag]:
            p = preds[key]
            cells = [fmt_ci(paired_auc_difference(yt, p, preds[(tag, r)], n_boot=args.n_boot))
                     if key[1] != r and (r in ("lightgbm", "transformer") or key[1].startswith(r[:-1])) else "-"
                     for r in refs]
            lines.append(f"| {key[1]} | {roc_auc_score(yt, p):.4f} | {average_precision_score(yt, p):.4f} | "
                         f"{secs[key]:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Pretraining time and speed", "",
              "| objective | pretraining s (build + train) |", "|---|---|"]
    lines += [f"| {o} | {s:.0f} |" for o, s in pre.items()]
    lines += ["",
              f"Tiny encoder, masked objective, {sp['n']} of the longest histories at window 200 "
              f"(mean {sp['mean_len']:.0f} events), batch 256, CPU: **{sp['seq_per_s']:.0f} sequences/s** "
              f"(goal 1000). Embedding extraction: **{sp['embed_200']:.0f} users/s** at window 200, "
              f"**{sp['embed_50']:.0f} users/s** at window 50 (goal 5000).", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
