"""The rolling-origin prior: the `future` head's purchase log-odds, by the encoder of each example's cutoff.

``purchase-intent pretrain --objective future --rolling`` writes, beside the encoder, one `future`
encoder *with its head* per cutoff of the built examples (each pretrained on every user's events
before that cutoff) and one on every event (for scoring now): ``runs/pretrained/rolling/<k>/``
(``model.safetensors`` + ``config.json`` as any encoder folder, and ``future_head.safetensors``).
They share one token vocabulary, the main encoder's, fitted on the events before the earliest of
them.

:class:`RollingPrior` reads an example's history (the token arrays of a sequence model's ``X``)
with the latest encoder whose cutoff is at or before the example's own (``X["cutoff_us"]``), and
returns the head's log-odds that the user buys within 7 days. That encoder read only events
before its cutoff, so the value depends on events before the example's cutoff alone: in a
backtest as in production, where the encoder on every event reads a scoring time after the data.
An example with no encoder at or before its cutoff, or with no event, gets NaN.

Measured in BENCHMARKS.md ("The `future` head's prediction as a feature"): handed to a model as
one more feature it lifts the Transformer and LightGBM with 10% of the labels.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from ..sequences import CUTOFF_KEY
from ..workspace import atomic_write_bytes
from .pretraining import ENCODER_CONFIG, ENCODER_WEIGHTS, FUTURE_HORIZONS, embed, encoder_inputs, load_encoder
from .transformer import BehaviourTransformer

ROLLING_DIR = "rolling"
PRIOR_DIR = "encoder"  # a run's copy: <run>/model/encoder/rolling/ (beside transformer_pt's and lightgbm_emb's encoder)
HEAD_WEIGHTS = "future_head.safetensors"
HORIZON = "7d"  # the head's column handed to the models
PRIOR_FEATURE = f"future_purchase_{HORIZON}_logodds"


def head_files(head: nn.Module) -> dict[str, bytes]:
    """The `future` head's weights as the file of a rolling encoder folder (name -> bytes)."""
    return {HEAD_WEIGHTS: save_tensors({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()})}


def make_head(d_model: int) -> nn.Module:
    """The `future` objective's head (as ``FutureEventsObjective.future``), for loading its weights."""
    D = int(d_model)
    return nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, len(FUTURE_HORIZONS)))


def to_us(t) -> int:
    """A cutoff (datetime, pandas or numpy time, or ISO string; naive = UTC) in microseconds since the epoch."""
    ts = np.datetime64(datetime.fromisoformat(t) if isinstance(t, str) else t, "us")
    return int(ts.astype(np.int64))


class RollingPrior:
    """The rolling encoders of a pretrained folder, sorted by cutoff, and their `future` heads."""

    def __init__(self, cutoffs_us: np.ndarray, nets: list[BehaviourTransformer], heads: list[nn.Module],
                 folders: list[Path]):
        self.cutoffs_us = np.asarray(cutoffs_us, dtype=np.int64)
        self.nets, self.heads, self.folders = nets, heads, folders
        self.column = [h for h, _ in FUTURE_HORIZONS].index(HORIZON)

    @classmethod
    def load(cls, encoder: str | Path) -> "RollingPrior":
        """From ``<encoder>/rolling/``; FileNotFoundError (one line, what to run) when there is none."""
        root = Path(encoder) / ROLLING_DIR
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not folders:
            raise FileNotFoundError(f"prior=true needs the rolling encoders in {root}: run `purchase-intent pretrain "
                                    "--objective future --rolling` first")
        entries = []
        for d in folders:
            net, meta = load_encoder(d)
            head = make_head(net.cfg.d_model)
            head.load_state_dict(load_file(str(d / HEAD_WEIGHTS)))
            entries.append((to_us(meta["cutoff"]), net, head.eval(), d))
        entries.sort(key=lambda e: e[0])
        return cls(np.array([e[0] for e in entries]), [e[1] for e in entries], [e[2] for e in entries],
                   [e[3] for e in entries])

    @property
    def window(self) -> int:
        return self.nets[0].cfg.max_seq_len

    def cutoffs(self) -> list[str]:
        return [str(np.datetime64(int(c), "us")) for c in self.cutoffs_us]

    def encoder_index(self, cutoffs_us: np.ndarray) -> np.ndarray:
        """Per example, the latest encoder whose cutoff is at or before the example's (-1: none)."""
        return np.searchsorted(self.cutoffs_us, np.asarray(cutoffs_us, dtype=np.int64), side="right") - 1

    @torch.inference_mode()
    def logodds(self, X: dict) -> np.ndarray:
        """(N,) float64: the 7-day purchase log-odds of each row of ``X`` (token arrays, ``mask`` and
        ``cutoff_us``); NaN where no encoder precedes the row's cutoff or the row has no event."""
        if CUTOFF_KEY not in X or "mask" not in X:
            raise ValueError("the prior needs the event sequences and the example cutoffs of X (a sequence "
                             "model's inputs)")
        which = self.encoder_index(X[CUTOFF_KEY])
        mask = np.asarray(X["mask"])
        out = np.full(len(mask), np.nan)
        for k in np.unique(which[which >= 0]):
            rows = np.flatnonzero(which == k)
            data = encoder_inputs(self.nets[k].cfg, X, rows, where="the rolling encoder")
            h = torch.as_tensor(embed(self.nets[k], data))
            out[rows] = self.heads[k](h).float().numpy()[:, self.column]
        out[~mask.any(axis=1)] = np.nan
        return out

    def copy_to(self, dst: Path) -> None:
        """Copy the rolling encoder folders into ``dst/rolling/`` (a run's own copy; no workspace read later)."""
        for d in self.folders:
            out = Path(dst) / ROLLING_DIR / d.name
            out.mkdir(parents=True, exist_ok=True)
            for name in (ENCODER_WEIGHTS, ENCODER_CONFIG, HEAD_WEIGHTS):
                atomic_write_bytes(out / name, (d / name).read_bytes())


def describe(prior: RollingPrior) -> dict:
    """What a run records of its prior (run.json ``prior``): the feature and the encoders' cutoffs."""
    return {"feature": PRIOR_FEATURE, "encoders": len(prior.nets), "cutoffs": prior.cutoffs(),
            "window": prior.window, "rule": "the latest encoder whose cutoff is at or before the example's"}
