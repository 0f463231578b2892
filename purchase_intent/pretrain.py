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

``init`` (``pretrain --init PATH``) starts from the encoder folder of another workspace (another
shop, whose export may differ): the new encoder takes its architecture, token fields and bucket
counts (the window may only shorten), copies every weight that keeps its meaning in this shop and
re-initialises the rest, one log line each (:mod:`~purchase_intent.models.transfer`), then trains
``epochs`` more epochs on this workspace's events before the cutoff (0 keeps the copied weights).
config.json records the init folder, its cutoff and what was transferred or re-initialised.

``rolling`` (``pretrain --objective future --rolling``) also fits the rolling-origin encoders of
:mod:`~purchase_intent.models.prior`: one `future` encoder, with its purchase head, per cutoff of the
built examples (each on every user's events before it), and one on every event; they share one
vocabulary, fitted on the events before the earliest of them (the main encoder takes it too, and is
the rolling encoder at the main cutoff). They go to ``runs/pretrained/rolling/<k>/`` in the same
atomic swap; models with ``prior=true`` read each example with the latest one at or before its cutoff.

``dp_epsilon`` (``pretrain --param dp_epsilon=E``, with ``dp_delta``, ``dp_max_grad_norm``,
``dp_users_per_step``, ``dp_epochs``, ``dp_lr`` as for ``train``) pretrains with user-level DP-SGD
(:mod:`~purchase_intent.models.dp_pretraining` on :mod:`~purchase_intent.dp`): one sequence per user,
Poisson-sampled users, per-user clipping, Gaussian noise, Rényi accounting; config.json gets the
accountant's ε, δ, the noise and the steps under ``"privacy"``. The price field (quantile bucket
edges of the events) and dropout are left out; the contrastive objective and ``init`` are refused.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from . import splits
from .config import DP_PARAMS, PretrainConfig, from_dict
from .dp import DPConfig, check_budget
from .dp import plan as dp_plan
from .models.dp_pretraining import DATA_FITTED_FIELDS, check_objective, pretrain_encoder_dp
from .models.pretraining import OBJECTIVES, encoder_files, make_objective, pretrain_encoder
from .models.prior import ROLLING_DIR, head_files
from .models.transfer import TransferReport, load_init, transfer_config, transfer_state
from .models.transformer import PRESETS, BehaviourTransformer
from .models.transformer import preset as make_preset
from .runs import load_built
from .sequences import SEQUENCE_FIELDS, SequenceConfig, SequenceVocab, build_sequences, fit_vocab, time_edges
from .times import parse_time
from .train import TrainLoopConfig
from .workspace import Workspace, as_workspace, atomic_dir, atomic_write_bytes

PRETRAINED_RUN = "pretrained"
MIN_USERS = 8  # users with events before the cutoff
ONE_US = timedelta(microseconds=1)


def dp_config(cfg: PretrainConfig) -> Optional[DPConfig]:
    """The :class:`~purchase_intent.dp.DPConfig` of a DP pretraining (None without ``dp_epsilon``); raises
    ValueError for dp_* settings without dp_epsilon, a bad budget, an objective that cannot be made per
    user (contrastive) or an init encoder."""
    if cfg.dp_epsilon is None:
        given = [k for k in DP_PARAMS if getattr(cfg, k) != getattr(PretrainConfig, k)]
        if given:
            raise ValueError(f"{', '.join(given)} given without dp_epsilon: add --param dp_epsilon=E for a DP encoder")
        return None
    check_budget(cfg.dp_epsilon, cfg.dp_delta)
    check_objective(cfg.objective)
    if cfg.init is not None:
        raise ValueError("dp_epsilon with --init is not supported: pretrain the DP encoder from scratch")
    for name, kind in (("dp_delta", float), ("dp_max_grad_norm", float), ("dp_users_per_step", int),
                       ("dp_epochs", float), ("dp_lr", float)):
        value = getattr(cfg, name)
        if name == "dp_delta" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"{name}={value!r} is not {'a whole number' if kind is int else 'a number'}: "
                             f"give e.g. --pretrain-param {name}={getattr(PretrainConfig, name) or 1e-5}")
    return DPConfig(epsilon=float(cfg.dp_epsilon), delta=None if cfg.dp_delta is None else float(cfg.dp_delta),
                    max_grad_norm=float(cfg.dp_max_grad_norm), users_per_step=int(cfg.dp_users_per_step),
                    examples_per_user=1, epochs=float(cfg.dp_epochs), lr=float(cfg.dp_lr))


def evaluation_cutoff(workspace: Workspace | str | Path | None, backtest: int = 0) -> Optional[datetime]:
    """The start of the earliest test window of the built examples (None when none are built): its
    first cutoff for the user task; for the session task the start of its earliest session (a
    session's cutoff lies inside it, and the encoder reads none of a test session's events).

    With ``backtest=K``, the earliest test window of the last K backtest folds (never later than
    the test split's own start).
    """
    try:
        built = load_built(workspace)
    except FileNotFoundError:
        return None
    ex = built.examples
    col = "session_start" if built.label_cfg.task == "session" else "cutoff"
    test = ex["split"].to_numpy() == "test"
    starts = [pd.Timestamp(ex[col][test].min())] if test.any() else []
    if backtest:
        for f in splits.backtest_folds(ex, int(backtest), built.label_cfg):
            starts.append(pd.Timestamp(f.cutoff))
            fold_test = np.asarray(f.test_mask)
            if fold_test.any():
                starts.append(pd.Timestamp(ex[col][fold_test].min()))
    if not starts:
        return None
    t = min(starts)
    return (t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t).to_pydatetime()


def check_rolling(cfg: PretrainConfig) -> None:
    """Raise ValueError (one line) for rolling encoders that cannot be made: they are the `future`
    objective's (its purchase head is what they keep), trained from scratch, without DP."""
    if not cfg.rolling:
        return
    if cfg.objective != "future":
        raise ValueError(f"--rolling keeps the purchase head of the future objective: give --objective future "
                         f"(not {cfg.objective})")
    if cfg.dp_epsilon is not None:
        raise ValueError("--rolling with dp_epsilon is not supported: pretrain the DP encoder without --rolling")
    if cfg.init is not None:
        raise ValueError("--rolling with --init is not supported: each rolling encoder is pretrained from scratch")


def rolling_cutoffs(ws: Workspace, con, t_cut: datetime, log: Optional[Callable[[str], None]] = None
                    ) -> dict[datetime, tuple[int, int]]:
    """The cutoffs of the rolling encoders, in order, each with (events, users) before it: every cutoff
    of the built examples (user task), the main encoder's ``t_cut`` and the end of the data
    (``max(ts) + 1us``, for scoring now); those with events of fewer than ``MIN_USERS`` users before
    them are left out (their examples get no prior)."""
    try:
        built = load_built(ws)
    except FileNotFoundError:
        raise ValueError("--rolling pretrains one encoder per cutoff of the built examples: run "
                         "`purchase-intent build` first") from None
    if built.label_cfg.task != "user":
        raise ValueError(f"--rolling needs the user task's cutoffs; the examples are built for the "
                         f"{built.label_cfg.task} task (its cutoffs lie inside sessions)")
    cuts = {pd.Timestamp(c).to_pydatetime().replace(tzinfo=None) for c in pd.unique(built.examples["cutoff"])}
    cuts |= {t_cut, con.execute("SELECT max(ts) FROM events").fetchone()[0] + ONE_US}
    keep = {}
    for c in sorted(cuts):
        n_ev, n = con.execute("SELECT count(*), count(DISTINCT user_id) FROM events WHERE ts < ?", [c]).fetchone()
        if n >= MIN_USERS or c == t_cut:
            keep[c] = (int(n_ev), int(n))
        elif log is not None:
            log(f"no rolling encoder at {c}: events of {n} users before it (fewer than {MIN_USERS})")
    return keep


def _users_table(con, cut: datetime) -> None:
    """``pretrain_examples``: one row per user with an event before ``cut``, with that cutoff."""
    con.execute("CREATE OR REPLACE TEMP TABLE pretrain_examples AS "
                "SELECT (row_number() OVER (ORDER BY user_id) - 1)::BIGINT AS example_id, user_id, "
                "?::TIMESTAMP AS cutoff FROM (SELECT DISTINCT user_id FROM events WHERE ts < ?)", [cut, cut])


def _pretrain_data(con, seq_cfg: SequenceConfig, vocab: SequenceVocab, fields: list[str],
                   objective: str) -> dict[str, np.ndarray]:
    """The token arrays of ``pretrain_examples`` (with ``us_cut`` for the future objective, whose
    targets are the events after a random cutoff in each history)."""
    times = objective == "future"
    arrays = build_sequences(con, "pretrain_examples", seq_cfg, vocab, times=times)
    data = {f: arrays[f] for f in fields}
    data["mask"] = arrays["mask"]
    if times:
        data["us_cut"] = arrays["us_cut"]
    return data


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
    Raises ValueError when fewer than ``MIN_USERS`` users have events before the cutoff. With
    ``cfg.init``: FileNotFoundError when the folder does not exist, ValueError when it holds no
    encoder or one that cannot be mapped (unknown fields, another ``d_model`` than ``cfg.d_model``).
    """
    cfg = cfg or PretrainConfig()
    dp = dp_config(cfg)  # refused before any data is read
    check_rolling(cfg)
    if dp is not None:  # no data-fitted bucket edges, no dropout (train_dp runs the encoder in eval mode)
        cfg = dataclasses.replace(cfg, dropout=0.0,
                                  drop_fields=list(dict.fromkeys([*cfg.drop_fields, *DATA_FITTED_FIELDS])))
    src_net, src_meta = load_init(cfg.init) if cfg.init is not None else (None, None)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {cfg.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    unknown = set(cfg.drop_fields) - set(SEQUENCE_FIELDS)
    if unknown:
        raise ValueError(f"drop_fields has unknown fields {sorted(unknown)}: choose from {', '.join(SEQUENCE_FIELDS)}")
    if src_net is not None:  # the init encoder's architecture, fields and token buckets
        arch = transfer_config(src_net.cfg, int(cfg.max_seq_len), cfg.dropout, cfg.d_model,
                               where=f"the init encoder {cfg.init}")
        src_vocab = SequenceVocab.from_dict(src_meta["vocab"])
        seq_cfg = dataclasses.replace(src_vocab.cfg, max_seq_len=arch.max_seq_len)
        fields = list(arch.field_sizes)
        used = dataclasses.replace(cfg, preset=src_meta.get("pretrain_config", {}).get("preset", cfg.preset),
                                   max_seq_len=arch.max_seq_len, d_model=arch.d_model,
                                   drop_fields=[f for f in SEQUENCE_FIELDS if f not in fields])
    else:
        if cfg.d_model is not None and cfg.preset in PRESETS and int(cfg.d_model) % PRESETS[cfg.preset]["n_heads"]:
            raise ValueError(f"d_model={cfg.d_model} is not a multiple of the {cfg.preset} preset's "
                             f"{PRESETS[cfg.preset]['n_heads']} heads")
        seq_cfg = SequenceConfig(max_seq_len=int(cfg.max_seq_len))
        fields = [f for f in SEQUENCE_FIELDS if f not in set(cfg.drop_fields)]
        used = cfg
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
    rolling = rolling_cutoffs(ws, con, t_cut, log) if cfg.rolling else {}
    _users_table(con, min(rolling) if rolling else t_cut)  # the vocab: from the events before the earliest cutoff
    vocab = fit_vocab(con, "pretrain_examples", seq_cfg)
    sizes = vocab.field_sizes()
    sources = sorted({e["sha256"] for e in ws.read_manifest()["files"]})  # the ingested files, by content
    if dp is not None:  # a budget the data cannot give is refused here, before anything is trained
        dp_plan(dp, n_users_before)
    init = None
    if src_net is not None:
        _check_init_cutoff(cfg.init, src_meta, sources, t_cut)

    def fit_at(cut: datetime, seed: int, what: str):
        """(net, objective, result, privacy) of the encoder pretrained on the events before ``cut``."""
        nonlocal init
        _users_table(con, cut)
        data = _pretrain_data(con, seq_cfg, vocab, fields, cfg.objective)
        torch.manual_seed(seed)
        if src_net is not None:
            net = BehaviourTransformer(dataclasses.replace(arch, field_sizes={f: sizes[f] for f in fields}))
            lacking = [f for f in fields if not data[f][data["mask"]].any()]
            report = transfer_state(src_net, src_meta, net, vocab, lacking=lacking)
            init = {"path": str(Path(cfg.init).resolve()), "cutoff": src_meta.get("cutoff"),
                    "preset": used.preset, "objective": src_meta.get("pretrain_config", {}).get("objective"),
                    **report.to_dict()}
            if log is not None:
                _log_init(log, cfg, used, src_meta, report, t_cut)
        else:
            extra = {"d_model": int(cfg.d_model)} if cfg.d_model is not None else {}
            net = BehaviourTransformer(make_preset(cfg.preset, field_sizes={f: sizes[f] for f in fields},
                                                   max_seq_len=int(cfg.max_seq_len), dropout=cfg.dropout,
                                                   use_tabular=False, n_tabular=0, **extra))
        objective = make_objective(cfg.objective, net, time_edges(seq_cfg))
        loop = TrainLoopConfig(max_epochs=int(cfg.epochs), batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                               weight_decay=float(cfg.weight_decay), seed=seed, device="cpu", progress=False)
        if log is not None:
            log(f"pretraining the {used.preset} encoder ({cfg.objective}) on {int(data['mask'].any(axis=1).sum()):,} "
                f"users' events before {cut} ({what})")
        if dp is not None:
            res, privacy = pretrain_encoder_dp(objective, cfg.objective, data, dp, seed=seed, log=log)
            return net, objective, res, privacy
        return net, objective, pretrain_encoder(objective, data, loop, log), None

    fitted = {}
    for k, cut in enumerate(rolling):
        fitted[cut] = fit_at(cut, int(cfg.seed) + k, f"rolling encoder {k + 1} of {len(rolling)}")
    net, objective, res, privacy = fitted[t_cut] if t_cut in fitted else fit_at(t_cut, int(cfg.seed), how)
    meta = {"pretrain_config": dataclasses.asdict(used), "init": init, "vocab": vocab.to_dict(), "fields": fields,
            "cutoff": t_cut.isoformat(), "cutoff_source": how, "sources": sources, "n_users": int(n_users_before),
            "n_events": int(n_before),
            "result": {"steps": res.steps, "seconds": round(res.seconds, 3), "loss_history": res.history,
                       "sequences_per_s": round(res.sequences_per_s, 1)}}
    if privacy is not None:  # (epsilon, delta) per user of the encoder's weights, the noise and the steps
        meta["privacy"] = privacy
    if rolling:
        meta["rolling"] = [{"folder": f"{ROLLING_DIR}/{k:03d}", "cutoff": c.isoformat()} for k, c in enumerate(rolling)]
    out = ws.run_dir(PRETRAINED_RUN)
    with atomic_dir(out) as tmp:
        for name, blob in encoder_files(net, meta).items():
            atomic_write_bytes(tmp / name, blob)
        for k, c in enumerate(rolling):
            r_net, r_obj, r_res, _ = fitted[c]
            folder = tmp / ROLLING_DIR / f"{k:03d}"
            folder.mkdir(parents=True)
            n_ev, n_us = rolling[c]
            r_meta = {**meta, "cutoff": c.isoformat(), "cutoff_source": "rolling", "rolling": None,
                      "n_users": n_us, "n_events": n_ev,
                      "result": {"steps": r_res.steps, "seconds": round(r_res.seconds, 3),
                                 "loss_history": r_res.history}}
            for name, blob in {**encoder_files(r_net, r_meta), **head_files(r_obj.future)}.items():
                atomic_write_bytes(folder / name, blob)
    if log is not None:
        log(f"saved the pretrained encoder to {out} ({res.seconds:.1f}s, {res.sequences_per_s:,.0f} sequences/s)"
            + (f" and {len(rolling)} rolling encoders with their purchase heads in {out / ROLLING_DIR}" if rolling
               else ""))
        if privacy is not None:
            log(f"privacy: {privacy['guarantee']} (target epsilon {privacy['epsilon_target']:g}, noise "
                f"{privacy['noise_multiplier']:.3g}, {privacy['steps']} steps)")
    return out


def _check_init_cutoff(init: str, src_meta: dict, sources: list[str], t_cut: datetime) -> None:
    """Refuse an init encoder that read some of this workspace's own files past its cutoff: evaluated
    here, it would have seen the test period."""
    src_cut = src_meta.get("cutoff")
    shared = set(src_meta.get("sources") or []) & set(sources)
    if src_cut and shared and datetime.fromisoformat(src_cut) > t_cut:
        raise ValueError(f"the init encoder {init} was pretrained on {len(shared)} of this workspace's own files "
                         f"up to {src_cut}, after this cutoff {t_cut}: it has seen the test period; pretrain it "
                         f"there with --cutoff {t_cut.isoformat()} or earlier")


def _log_init(log: Callable[[str], None], cfg: PretrainConfig, used: PretrainConfig, src_meta: dict,
              report: TransferReport, t_cut: datetime) -> None:
    """What starting from ``cfg.init`` changed, one line each."""
    log(f"starting from the encoder {cfg.init} (pretrained on {src_meta.get('n_users', '?')} users before "
        f"{src_meta.get('cutoff')})")
    if used.preset != cfg.preset:
        log(f"preset: {used.preset}, the init encoder's (preset {cfg.preset} is not used)")
    if used.max_seq_len != cfg.max_seq_len:
        log(f"max_seq_len: {used.max_seq_len}, the init encoder's window (it may only shorten)")
    if set(used.drop_fields) != set(cfg.drop_fields):
        log(f"fields: the init encoder's ({', '.join(f for f in SEQUENCE_FIELDS if f not in used.drop_fields)})")
    for line in report.lines():
        log(line)
    src_cut = src_meta.get("cutoff")
    if src_cut and datetime.fromisoformat(src_cut) > t_cut:  # other files than this workspace's (else it raised)
        log(f"note: the init encoder read events up to {src_cut}, after this cutoff {t_cut}: if both workspaces "
            "hold the same shop (from other files), it has seen this workspace's test period")
    if cfg.epochs == 0:
        log("0 epochs: the transferred weights are kept as they are")


def config_from_dict(d: dict) -> PretrainConfig:
    """A :class:`PretrainConfig` from a (JSON) dict; unknown keys raise."""
    return from_dict(PretrainConfig, d)

