"""The `future` pretraining objective's 7-day head as a score of examples, for the benchmarks that use it.

    from future_head import future_logits     # scripts under benchmarks/ run with this folder on sys.path
    logits = future_logits(ws, cutoff, users, examples, window=200, epochs=60, seed=0)

The pretraining runs the library's own pieces (``fit_vocab``, ``build_sequences(times=True)``,
``make_objective("future")``, ``pretrain_encoder``), so that the objective's head, which
``purchase-intent pretrain`` does not keep, can score examples.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from purchase_intent.models.pretraining import embed, make_objective, pretrain_encoder
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.sequences import SEQUENCE_FIELDS, SequenceConfig, build_sequences, fit_vocab, time_edges
from purchase_intent.train import TrainLoopConfig
from purchase_intent.workspace import Workspace

FIELDS = [f for f in SEQUENCE_FIELDS if f != "item"]  # as `purchase-intent pretrain`'s default drop_fields


def future_logits(ws: Workspace, cut, fit_users: np.ndarray, examples: pd.DataFrame, window: int, epochs: int,
                  seed: int) -> np.ndarray:
    """Pretrain the `future` objective on ``fit_users``' events before ``cut``; return its 7-day head's
    log-odds for each row of ``examples`` (user_id, cutoff), from that user's events before the row's cutoff."""
    con = ws.connect()
    con.register("fit_users", pd.DataFrame({"user_id": fit_users}))
    con.execute("CREATE OR REPLACE TEMP TABLE pre AS SELECT (row_number() OVER (ORDER BY user_id) - 1)::BIGINT "
                "AS example_id, user_id, ?::TIMESTAMP AS cutoff FROM (SELECT DISTINCT e.user_id FROM events e "
                "JOIN fit_users f USING (user_id) WHERE e.ts < ?)", [cut, cut])
    cfg = SequenceConfig(max_seq_len=window)
    vocab = fit_vocab(con, "pre", cfg)
    arrays = build_sequences(con, "pre", cfg, vocab, times=True)
    data = {f: arrays[f] for f in FIELDS}
    data["mask"], data["us_cut"] = arrays["mask"], arrays["us_cut"]
    torch.manual_seed(seed)
    net = BehaviourTransformer(preset("tiny", field_sizes={f: vocab.field_sizes()[f] for f in FIELDS},
                                      max_seq_len=window, use_tabular=False, n_tabular=0))
    objective = make_objective("future", net, time_edges(cfg))
    pretrain_encoder(objective, data, TrainLoopConfig(max_epochs=epochs, batch_size=256, lr=2e-3, weight_decay=0.05,
                                                      seed=seed, device="cpu", progress=False))
    ex = examples[["user_id", "cutoff"]].reset_index(drop=True)
    ex.insert(0, "example_id", np.arange(len(ex), dtype=np.int64))  # build_sequences returns rows in this order
    con.register("score_examples", ex)
    seq = build_sequences(con, "score_examples", cfg, vocab)
    rows = {f: seq[f] for f in FIELDS}
    rows["mask"] = seq["mask"]
    net.eval()
    objective.eval()
    with torch.no_grad():
        logits = objective.future(torch.as_tensor(embed(net, rows))).numpy()[:, 1].astype(np.float64)
    return np.where(rows["mask"].any(axis=1), logits, np.nan)  # no event before the cutoff: missing
