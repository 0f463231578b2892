"""``purchase-intent pretrain``: self-supervised training of the sequence encoder on a workspace's events.

One sequence per user: the tokens of that user's last ``max_seq_len`` events before the cutoff,
built by the same DuckDB query as the models' inputs (``sequences.build_sequences``; events are
streamed through SQL and Arrow, never one Python object per event). Every user with an event
before the cutoff takes part, labelled or not. The encoder and its objective are in
:mod:`~purchase_intent.models.pretraining`; the result is ``<workspace>/runs/pretrained/``:
``model.safetensors`` (the encoder) and ``config.json`` (this config, the encoder's architecture,
the vocab and the cutoff), written as one atomic directory swap.

The cutoff keeps evaluation honest. ``cutoff="auto"`` (default) is the start of the earliest test
window of the built examples (with ``backtest=K`` the earliest of the last K folds' test windows,
which is what ``evaluate --backtest K`` tests on), so the encoder never reads an event of a test
period; without built examples (production) it reads every event. One encoder serves all
backtest folds: the one fitted before the earliest fold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from . import splits
from .config import from_dict
from .models.pretraining import OBJECTIVES, encoder_files, make_objective, pretrain_encoder
from .models.transformer import BehaviourTransformer
from .models.transformer import preset as make_preset
from .runs import load_built
from .sequences import SEQUENCE_FIELDS, SequenceConfig, build_sequences, fit_vocab
from .times import parse_time
from .train import TrainLoopConfig
from .workspace import Workspace, as_workspace, atomic_dir, atomic_write_bytes

PRETRAINED_RUN = "pretrained"
MIN_USERS = 8  # users with events before the cutoff
ONE_US = timedelta(microseconds=1)


@dataclass
class PretrainConfig:
    """What ``pretrain`` trains (saved in the encoder's config.json)."""

    # masked | contrastive | next; none won beyond the paired intervals (benchmarks/results/pretrain.md)
    objective: str = "masked"
    preset: str = "tiny"  # TransformerClassifier presets: tiny | small | base
    max_seq_len: int = 50  # most recent events per user (the classifier's default window)
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    dropout: float = 0.1
    seed: int = 0
    cutoff: Optional[str] = "auto"  # "auto" | "all" (every event) | an ISO 8601 time
    backtest: int = 0  # with cutoff="auto": the earliest of the last K backtest folds' test windows
    drop_fields: list = field(default_factory=lambda: ["item"])  # as TransformerClassifier's default


def evaluation_cutoff(workspace: Workspace | str | Path | None, backtest: int = 0) -> Optional[datetime]:
    """The first cutoff of the earliest test window of the built examples (None when none are built).

    With ``backtest=K``, the earliest test window of the last K backtest folds (never later than
    the test split's own start).
    """
    try:
        built = load_built(workspace)
    except FileNotFoundError:
        return None
    ex = built.examples
    test = ex["split"].to_numpy() == "test"
    starts = [pd.Timestamp(ex["cutoff"][test].min())] if test.any() else []
    if backtest:
        folds = splits.backtest_folds(ex, int(backtest), built.label_cfg)
        starts.append(pd.Timestamp(min(f.cutoff for f in folds)))
    if not starts:
        return None
    t = min(starts)
    return (t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t).to_pydatetime()


def _resolve_cutoff(ws: Workspace, con, cfg: PretrainConfig, cutoff) -> tuple[datetime, str]:
    """(cutoff, how it was chosen): events with ts < cutoff are read."""
    c = cfg.cutoff if cutoff is None else cutoff
    if isinstance(c, datetime):
        return c.replace(tzinfo=None), "given"
    if c in (None, "auto"):
        t = evaluation_cutoff(ws, cfg.backtest)
        if t is not None:
            folds = f" of {cfg.backtest} backtest folds" if cfg.backtest else ""
            return t, f"start of the earliest test window{folds}"
        c = "all"
    if c == "all":
        hi = con.execute("SELECT max(ts) FROM events").fetchone()[0]
        if hi is None:
            raise ValueError(f"the workspace {ws.root} has no events: run `purchase-intent ingest` first")
        return hi + ONE_US, "every event"
    t = parse_time(c)
    return t.replace(tzinfo=None) if t.tzinfo is not None else t, "given"


def pretrain(workspace: Workspace | str | Path | None = None, cfg: Optional[PretrainConfig] = None,
             cutoff=None, log: Optional[Callable[[str], None]] = None) -> Path:
    """Pretrain the encoder on the workspace's events with ``ts < cutoff``; write ``runs/pretrained/``.

    ``cutoff`` (a datetime, an ISO string, "auto" or "all") overrides ``cfg.cutoff``. Returns the folder.
    Raises ValueError when fewer than ``MIN_USERS`` users have events before the cutoff.
    """
    cfg = cfg or PretrainConfig()
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {cfg.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    unknown = set(cfg.drop_fields) - set(SEQUENCE_FIELDS)
    if unknown:
        raise ValueError(f"drop_fields has unknown fields {sorted(unknown)}: choose from {', '.join(SEQUENCE_FIELDS)}")
    ws = as_workspace(workspace)
    con = ws.connect()  # NothingIngestedError (a RuntimeError) on an empty workspace
    t_cut, how = _resolve_cutoff(ws, con, cfg, cutoff)
    n_events, n_users, n_before, n_users_before = con.execute(
        "SELECT count(*), count(DISTINCT user_id), count(*) FILTER (WHERE ts < ?), "
        "count(DISTINCT user_id) FILTER (WHERE ts < ?) FROM events", [t_cut, t_cut]).fetchone()
    if n_users_before < MIN_USERS:
        raise ValueError(f"pretraining needs events of at least {MIN_USERS} users before the cutoff {t_cut} "
                         f"({how}); the workspace holds {n_events:,} events of {n_users:,} users, "
                         f"{n_before:,} events of {n_users_before:,} users before it")
    con.execute("SET enable_progress_bar = false")
    con.execute("CREATE OR REPLACE TEMP TABLE pretrain_examples AS "
                "SELECT (row_number() OVER (ORDER BY user_id) - 1)::BIGINT AS example_id, user_id, "
                "?::TIMESTAMP AS cutoff FROM (SELECT DISTINCT user_id FROM events WHERE ts < ?)", [t_cut, t_cut])
    seq_cfg = SequenceConfig(max_seq_len=int(cfg.max_seq_len))
    vocab = fit_vocab(con, "pretrain_examples", seq_cfg)
    arrays = build_sequences(con, "pretrain_examples", seq_cfg, vocab)
    fields = [f for f in SEQUENCE_FIELDS if f not in set(cfg.drop_fields)]
    sizes = vocab.field_sizes()
    data = {f: arrays[f] for f in fields}
    data["mask"] = arrays["mask"]
    torch.manual_seed(cfg.seed)
    net = BehaviourTransformer(make_preset(cfg.preset, field_sizes={f: sizes[f] for f in fields},
                                           max_seq_len=int(cfg.max_seq_len), dropout=cfg.dropout,
                                           use_tabular=False, n_tabular=0))
    objective = make_objective(cfg.objective, net)
    loop = TrainLoopConfig(max_epochs=int(cfg.epochs), batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                           weight_decay=float(cfg.weight_decay), seed=int(cfg.seed), device="cpu", progress=False)
    if log is not None:
        log(f"pretraining the {cfg.preset} encoder ({cfg.objective}) on {int(data['mask'].any(axis=1).sum()):,} "
            f"users, {n_before:,} events before {t_cut} ({how})")
    res = pretrain_encoder(objective, data, loop, log)
    meta = {"pretrain_config": dataclasses.asdict(cfg), "vocab": vocab.to_dict(), "fields": fields,
            "cutoff": t_cut.isoformat(), "cutoff_source": how, "n_users": int(n_users_before),
            "n_events": int(n_before),
            "result": {"steps": res.steps, "seconds": round(res.seconds, 3), "loss_history": res.history,
                       "sequences_per_s": round(res.sequences_per_s, 1)}}
    out = ws.run_dir(PRETRAINED_RUN)
    with atomic_dir(out) as tmp:
        for name, blob in encoder_files(net, meta).items():
            atomic_write_bytes(tmp / name, blob)
    if log is not None:
        log(f"saved the pretrained encoder to {out} ({res.seconds:.1f}s, {res.sequences_per_s:,.0f} sequences/s)")
    return out


def config_from_dict(d: dict) -> PretrainConfig:
    """A :class:`PretrainConfig` from a (JSON) dict; unknown keys raise."""
    return from_dict(PretrainConfig, d)

