"""Two models that use the pretrained sequence encoder (``purchase-intent pretrain``).

- :class:`PretrainedTransformerClassifier` (``transformer_pt``): the Transformer classifier whose
  sequence encoder starts from the pretrained weights (the tabular branch and the head start
  fresh); ``freeze_encoder=True`` trains only the tabular branch and the head.
- :class:`EmbeddingLightGBMModel` (``lightgbm_emb``): LightGBM on the tabular features plus the
  encoder's (B, D) summary of each example's history before its cutoff, computed from the token
  arrays of ``X`` (the same inputs as every sequence model, in batch scoring and the API).

Both save a self-contained folder: the encoder's files are copied into ``<run>/encoder/`` and
loading never reads the workspace's ``runs/pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from ..calibration import fit_calibrator
from ..sequences import CUTOFF_KEY, SequenceVocab
from ..train import train
from ..workspace import atomic_write_bytes, atomic_write_text
from .attribution import Contributions
from .baselines import LightGBMModel
from .classifier import TransformerClassifier, collate
from .pretraining import ENCODER_CONFIG, ENCODER_WEIGHTS, check_compatible, embed, encoder_inputs, load_encoder
from .prior import PRIOR_FEATURE, RollingPrior
from .transformer import BehaviourTransformer, SeedEnsemble

ENCODER_DIR = "encoder"
EMBEDDING_PREFIX = "history_embedding_"
_ENCODER_PARTS = ("embed.", "pos.", "cls", "blocks.", "ln_f.", "pool.")


def _copy_encoder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (ENCODER_WEIGHTS, ENCODER_CONFIG):
        atomic_write_bytes(dst / name, (Path(src) / name).read_bytes())


class PretrainedTransformerClassifier(TransformerClassifier):
    """:class:`TransformerClassifier` fine-tuned from a pretrained encoder.

    Parameters
    ----------
    encoder : str
        Folder written by ``purchase-intent pretrain`` (``<workspace>/runs/pretrained``). Its
        architecture (preset, d_model, layers, heads), token fields and window replace the
        classifier's; ``max_seq_len`` may only shorten the window.
    freeze_encoder : bool
        Keep the encoder's weights fixed; train the tabular branch and the head only.
    encoder_lr_scale : float in (0, 1]
        The encoder's parameters train at ``lr`` times this factor (the fresh tabular branch and head
        at ``lr``), so that fine-tuning moves the pretrained weights less.
    layer_lr_decay : float in (0, 1]
        Layer-wise decay of that factor: the top block, ``ln_f`` and ``pool`` get ``encoder_lr_scale``,
        each block below one more factor ``layer_lr_decay``, the embeddings (fields, positions,
        [CLS]) ``encoder_lr_scale * layer_lr_decay ** n_layers``. 1 = one factor for the whole encoder.
    freeze_epochs : int >= 0
        Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): train with the encoder frozen for
        up to this many epochs (early stopping applies), then unfreeze it for the remaining
        ``max_epochs - freeze_epochs`` with a fresh schedule (warm-up, cosine). The weights kept are
        those of the best valid epoch of either stage. Below ``max_epochs``; not with ``freeze_encoder``.
    reinit_layers : int >= 0
        Re-initialise the top this many encoder blocks (with ``ln_f`` and ``pool``) instead of
        loading their pretrained weights: the lower blocks transfer, the top ones are learnt afresh.
    Other parameters (``prior`` included): as :class:`TransformerClassifier`.

    Measured effects of these settings are in BENCHMARKS.md ("Fine-tuning recipes").
    """

    def __init__(self, encoder: Optional[str] = None, freeze_encoder: bool = False, encoder_lr_scale: float = 1.0,
                 layer_lr_decay: float = 1.0, freeze_epochs: int = 0, reinit_layers: int = 0, prior: bool = False,
                 preset: str = "tiny",
                 d_model: Optional[int] = None, n_layers: Optional[int] = None, n_heads: Optional[int] = None,
                 dropout: float = 0.1, inputs: str = "both", wide: bool = True, pooling: str = "cls+max",
                 drop_fields: Sequence[str] = ("item",), max_seq_len: Optional[int] = 50, pos_weight: Any = None,
                 max_epochs: int = 12, lr: float = 1e-3, batch_size: int = 512, weight_decay: float = 0.05,
                 warmup_frac: float = 0.05, patience: int = 3, grad_clip: float = 1.0, ema_decay: float = 0.0,
                 n_seeds: int = 1, min_steps_per_epoch: int = 16, valid_fraction: float = 0.1,
                 calibration: str = "platt",
                 tabular_log: bool = True, vocab: Any = None, device: str = "auto",
                 checkpoint_dir: Optional[str] = None, progress: bool = False, random_state: int = 0,
                 tabular_bins: int = 0):
        super().__init__(preset=preset, d_model=d_model, n_layers=n_layers, n_heads=n_heads, dropout=dropout,
                         inputs=inputs, wide=wide, pooling=pooling, drop_fields=drop_fields,
                         max_seq_len=max_seq_len, pos_weight=pos_weight, max_epochs=max_epochs, lr=lr,
                         batch_size=batch_size, weight_decay=weight_decay, warmup_frac=warmup_frac,
                         patience=patience, grad_clip=grad_clip, ema_decay=ema_decay, n_seeds=n_seeds,
                         min_steps_per_epoch=min_steps_per_epoch, valid_fraction=valid_fraction,
                         calibration=calibration, tabular_log=tabular_log,
                         vocab=vocab, device=device, checkpoint_dir=checkpoint_dir, progress=progress,
                         random_state=random_state, tabular_bins=tabular_bins)
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        self.encoder_lr_scale = encoder_lr_scale
        self.layer_lr_decay = layer_lr_decay
        self.freeze_epochs = freeze_epochs
        self.reinit_layers = reinit_layers
        self.prior = prior

    def check_finetune(self, n_layers: Optional[int] = None) -> None:
        """Raise ValueError (one line) for a fine-tuning setting of the wrong type or range; ``n_layers``
        (the encoder's, once known) bounds ``reinit_layers``."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

        def integer(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for key in ("encoder_lr_scale", "layer_lr_decay"):
            v = getattr(self, key)
            if not (number(v) and 0 < v <= 1):
                raise ValueError(f"transformer_pt: {key} must be a number in (0, 1], got {v!r} "
                                 f"(e.g. --param {key}=0.1)")
        for key in ("freeze_epochs", "reinit_layers"):
            v = getattr(self, key)
            if not (integer(v) and v >= 0):
                raise ValueError(f"transformer_pt: {key} must be an integer >= 0, got {v!r} (e.g. --param {key}=2)")
        self.check_prior()
        if self.reinit_layers and self.freeze_encoder:
            raise ValueError("transformer_pt: reinit_layers with freeze_encoder=true would keep the re-initialised "
                             "blocks frozen at random: give one of them")
        if self.freeze_epochs and self.freeze_encoder:
            raise ValueError("transformer_pt: freeze_epochs unfreezes the encoder after that many epochs, "
                             "freeze_encoder=true never does: give one of them")
        if self.freeze_epochs and not (integer(self.max_epochs) and self.freeze_epochs < self.max_epochs):
            raise ValueError(f"transformer_pt: freeze_epochs={self.freeze_epochs} leaves no epoch to fine-tune in "
                             f"max_epochs={self.max_epochs}: make it smaller (or use freeze_encoder=true)")
        if n_layers is not None and self.reinit_layers > n_layers:
            raise ValueError(f"transformer_pt: reinit_layers={self.reinit_layers} but the encoder has {n_layers} "
                             f"blocks: give at most {n_layers}")

    def lr_scales(self, n_layers: int) -> dict:
        """Parameter-name prefix -> factor on lr for the encoder (see ``encoder_lr_scale``, ``layer_lr_decay``)."""
        s, d = float(self.encoder_lr_scale), float(self.layer_lr_decay)
        if s == 1 and d == 1:
            return {}
        out = {p: s * d ** n_layers for p in ("embed.", "pos.", "cls")}
        out.update({f"blocks.{i}.": s * d ** (n_layers - 1 - i) for i in range(n_layers)})
        out.update({"ln_f.": s, "pool.": s})
        return out

    MODEL_NAME = "transformer_pt"
    SIZES_FROM_ENCODER = True

    def _check_fit_settings(self) -> None:
        """Nothing: ``fit`` checks the settings first, then builds through the parent's fit with no epoch."""

    def fit(self, X: dict, y, X_valid: Optional[dict] = None, y_valid=None) -> "PretrainedTransformerClassifier":
        """Build the classifier around the pretrained encoder, fine-tune on (X, y), calibrate on valid."""
        self.check_settings()
        self.check_finetune()
        self.prior_ = RollingPrior.load(self.encoder) if self.prior else None
        X, X_valid = self._with_prior(X), self._with_prior(X_valid)
        enc, meta = load_encoder(self.encoder)
        ecfg = enc.cfg
        self.check_finetune(ecfg.n_layers)
        if self.inputs == "tabular":
            raise ValueError("transformer_pt needs the sequence inputs (inputs='both' or 'sequence')")
        missing = [f for f in ecfg.field_sizes if f not in X]
        if missing or "mask" not in X:
            raise ValueError(f"the encoder {self.encoder} was pretrained on the fields {sorted(ecfg.field_sizes)} "
                             f"but X lacks {missing or ['mask']}")
        vocab = self.vocab
        if vocab is not None and not isinstance(vocab, SequenceVocab):
            vocab = SequenceVocab.from_dict(vocab)
        sizes = (vocab.field_sizes() if vocab is not None
                 else {f: max(int(np.asarray(X[f]).max(initial=0)) + 1, ecfg.field_sizes[f]) for f in ecfg.field_sizes})
        check_compatible(ecfg, {f: sizes[f] for f in ecfg.field_sizes}, self.d_model,
                         where=f"the encoder {self.encoder}")
        y = np.asarray(y).astype(int).ravel()
        if X_valid is None:  # the parent's temporal holdout, made here so both stages share it
            cut = len(y) - max(1, int(round(len(y) * self.valid_fraction)))
            X_valid, y_valid = {k: np.asarray(v)[cut:] for k, v in X.items()}, y[cut:]
            X, y = {k: np.asarray(v)[:cut] for k, v in X.items()}, y[:cut]
        drop = [f for f in X if f not in ecfg.field_sizes
                and f not in ("mask", "tabular", "label", "example_id", CUTOFF_KEY, PRIOR_FEATURE)]
        L = min(self.max_seq_len or ecfg.max_seq_len, ecfg.max_seq_len)
        saved = {k: getattr(self, k) for k in ("preset", "drop_fields", "max_seq_len", "d_model", "n_layers",
                                              "n_heads", "pooling", "max_epochs")}
        try:  # the parent builds config, vocab, tabular statistics with no training epoch
            self.preset = meta["pretrain_config"]["preset"]
            self.drop_fields, self.max_seq_len, self.pooling, self.max_epochs = drop, L, ecfg.pooling, 0
            self.d_model, self.n_layers, self.n_heads = ecfg.d_model, ecfg.n_layers, ecfg.n_heads
            super().fit(X, y, X_valid, y_valid)
        finally:
            for k, v in saved.items():
                setattr(self, k, v)
        check_compatible(ecfg, self.model_config_.field_sizes, where=f"the encoder {self.encoder}")
        members = list(self.model_.members) if hasattr(self.model_, "members") else [self.model_]
        fresh = tuple(f"blocks.{i}." for i in range(ecfg.n_layers - self.reinit_layers, ecfg.n_layers))
        fresh += ("ln_f.", "pool.") if self.reinit_layers else ()
        state = {k: v for k, v in enc.state_dict().items() if k.startswith(_ENCODER_PARTS) and not k.startswith(fresh)}
        state["pos.weight"] = state["pos.weight"][:L]
        scales = self.lr_scales(ecfg.n_layers)
        train_data, valid_data = self._arrays(X, y), self._arrays(X_valid, y_valid)
        nets, results = [], []
        for k in range(len(members)):
            torch.manual_seed(self.random_state + k)
            net = self.new_network()
            net.load_state_dict(state, strict=False)
            loop = dataclasses.replace(self.loop_config_, max_epochs=self.max_epochs, seed=self.random_state + k,
                                       lr_scales=scales)
            if len(members) > 1 and loop.checkpoint_dir is not None:
                loop = dataclasses.replace(loop, checkpoint_dir=str(Path(loop.checkpoint_dir) / f"seed{loop.seed}"))
            nets.append(net)
            results.append(self._fine_tune(net, train_data, valid_data, loop))
        self.loop_config_ = dataclasses.replace(self.loop_config_, max_epochs=self.max_epochs, lr_scales=scales)
        self.model_ = nets[0] if len(nets) == 1 else SeedEnsemble(nets)
        self.train_result_ = results[0] if len(nets) == 1 else {"members": results}
        self.encoder_meta_ = meta
        self.onnx_path_ = self.onnx_scorer_ = None
        self.calibrator_ = fit_calibrator(self.decision_function(X_valid), np.asarray(y_valid).astype(int).ravel(),
                                          self.calibration)
        return self

    def _fine_tune(self, net: BehaviourTransformer, train_data: dict, valid_data: dict, loop) -> dict:
        """Train ``net`` in place (encoder frozen throughout, for ``freeze_epochs`` first, or never);
        the train result as a dict (with ``freeze_epochs``: both stages' epochs in one history)."""
        encoder = [p for name, p in net.named_parameters() if name.startswith(_ENCODER_PARTS)]

        def frozen(flag: bool) -> None:
            for p in encoder:
                p.requires_grad_(not flag)

        if not self.freeze_epochs:
            frozen(self.freeze_encoder)
            try:
                return dataclasses.asdict(train(net, train_data, valid_data, loop, collate=collate))
            finally:
                frozen(False)
        ckpt = loop.checkpoint_dir
        frozen(True)
        try:  # stage 1: a probe of the pretrained features (the tabular branch and the head learn)
            probe = train(net, train_data, valid_data, dataclasses.replace(
                loop, max_epochs=self.freeze_epochs, checkpoint_dir=ckpt and str(Path(ckpt) / "probe")),
                collate=collate)
        finally:
            frozen(False)
        probe_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        tune = train(net, train_data, valid_data, dataclasses.replace(  # stage 2: everything, a fresh schedule
            loop, max_epochs=self.max_epochs - probe.epochs_run, checkpoint_dir=ckpt and str(Path(ckpt) / "finetune")),
            collate=collate)
        keep_probe = valid_data is not None and probe.best_metric > tune.best_metric
        if keep_probe:
            net.load_state_dict(probe_state)
        out = dataclasses.asdict(tune)
        n = probe.epochs_run
        out["history"] = ([{**r, "stage": "probe"} for r in probe.history]
                          + [{**r, "epoch": r["epoch"] + n, "stage": "finetune"} for r in tune.history])
        out["best_epoch"] = probe.best_epoch if keep_probe else tune.best_epoch + n
        out["best_metric"] = probe.best_metric if keep_probe else tune.best_metric
        for key in ("epochs_run", "steps", "time_batching_s", "time_compute_s", "time_eval_s"):
            out[key] = getattr(probe, key) + getattr(tune, key)
        return out

    def save(self, directory: str | Path) -> None:
        """The classifier's files plus a copy of the encoder's in ``encoder/`` (provenance; not read by load)."""
        super().save(directory)  # with the rolling encoders of ``prior`` in encoder/rolling/
        if self.encoder is not None and (Path(self.encoder) / ENCODER_CONFIG).exists():
            _copy_encoder(Path(self.encoder), Path(directory) / ENCODER_DIR)


class EmbeddingLightGBMModel(ClassifierMixin, BaseEstimator):
    """LightGBM on the tabular features plus the pretrained encoder's embedding of each history.

    Parameters
    ----------
    encoder : str
        Folder written by ``purchase-intent pretrain``.
    vocab : SequenceVocab, dict or None
        The vocab the sequences were built with (stored in the run; scoring builds with it).
    embedding : bool
        Hand LightGBM the encoder's D-dimensional summary of each history (default).
    prior : bool
        Hand LightGBM the rolling-origin prior (:mod:`~purchase_intent.models.prior`): the 7-day
        purchase log-odds of the `future` head of the encoder pretrained before each example's
        cutoff (``pretrain --objective future --rolling``). The run keeps a copy of those encoders.
    Other parameters: as :class:`~purchase_intent.models.baselines.LightGBMModel`.

    ``contributions`` gives TreeSHAP terms over the F tabular features and then the extra columns
    (``extra_names_``: history_embedding_0 .. D-1, then the prior).
    """

    def __init__(self, encoder: Optional[str] = None, n_estimators: int = 400, learning_rate: float = 0.05,
                 num_leaves: int = 31, min_child_samples: int = 20, subsample: float = 0.8, subsample_freq: int = 1,
                 colsample_bytree: float = 0.8, reg_lambda: float = 1.0, early_stopping_rounds: int = 50,
                 n_jobs: int = 2, vocab: Any = None, embedding: bool = True, prior: bool = False,
                 random_state=None):
        self.encoder = encoder
        self.embedding = embedding
        self.prior = prior
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.subsample_freq = subsample_freq
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs
        self.vocab = vocab
        self.random_state = random_state

    def _lgb_params(self) -> dict:
        return {k: v for k, v in self.get_params().items() if k not in ("encoder", "vocab", "embedding", "prior")}

    @property
    def extra_names_(self) -> list[str]:
        """The columns after the tabular features: the embedding's dimensions, then the prior."""
        return (self.embedding_names_ if self.embedding else []) + ([PRIOR_FEATURE] if self.prior else [])

    def check_settings(self) -> None:
        """Raise ValueError (one line) for ``embedding`` / ``prior`` settings that are not booleans or
        leave LightGBM nothing but the tabular features."""
        for key in ("embedding", "prior"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"lightgbm_emb: {key} must be true or false, got {getattr(self, key)!r} "
                                 f"(e.g. --param {key}=true)")
        if not (self.embedding or self.prior):
            raise ValueError("lightgbm_emb with embedding=false needs prior=true (else it is lightgbm)")

    def embed(self, X: dict) -> np.ndarray:
        """The encoder's summary of each row's history, (N, D), from the token arrays of ``X``."""
        if "mask" not in X:
            raise ValueError("lightgbm_emb needs the event sequences of X (a sequence model's inputs)")
        return embed(self.encoder_, encoder_inputs(self.encoder_.cfg, X))

    def _frame(self, X: dict) -> pd.DataFrame:
        tab = np.asarray(X["tabular"], dtype=np.float64)
        if tab.shape[1] != self.n_tabular_:
            raise ValueError(f"X['tabular'] has {tab.shape[1]} columns, the model was fitted on {self.n_tabular_}")
        parts = [tab]
        if self.embedding:
            parts.append(self.embed(X).astype(np.float64))
        if self.prior:
            parts.append(self.prior_.logodds(X)[:, None])
        cols = [f"tabular_{i}" for i in range(tab.shape[1])] + self.extra_names_
        return pd.DataFrame(np.hstack(parts), columns=cols)

    def explain_frame(self, X: dict, feature_names: Sequence[str]) -> pd.DataFrame:
        """The values ``contributions`` attributes: the tabular features under ``feature_names``, then
        the extra columns under ``extra_names_`` (for reason texts)."""
        frame = self._frame(X)
        frame.columns = list(feature_names) + self.extra_names_
        return frame

    def fit(self, X: dict, y, X_valid: Optional[dict] = None, y_valid=None) -> "EmbeddingLightGBMModel":
        """Embed every history with the encoder (and read its prior), then fit LightGBM (early stopping on valid)."""
        self.check_settings()
        self.encoder_, self.encoder_meta_ = load_encoder(self.encoder)
        self.prior_ = RollingPrior.load(self.encoder) if self.prior else None
        vocab = self.vocab
        if vocab is not None:
            vocab = vocab if isinstance(vocab, SequenceVocab) else SequenceVocab.from_dict(vocab)
            sizes = vocab.field_sizes()
            check_compatible(self.encoder_.cfg, {f: sizes[f] for f in sizes if f in self.encoder_.cfg.field_sizes},
                             where=f"the encoder {self.encoder}")
        self.vocab_ = vocab
        self.n_tabular_ = int(np.asarray(X["tabular"]).shape[1])
        self.embedding_names_ = [f"{EMBEDDING_PREFIX}{i}" for i in range(self.encoder_.cfg.d_model)]
        self.lgbm_ = LightGBMModel(**self._lgb_params())
        Xv = self._frame(X_valid) if X_valid is not None else None
        self.lgbm_.fit(self._frame(X), y, X_valid=Xv, y_valid=y_valid)
        self.classes_ = self.lgbm_.classes_
        return self

    def predict_proba(self, X: dict) -> np.ndarray:
        return self.lgbm_.predict_proba(self._frame(X))

    def predict(self, X: dict) -> np.ndarray:
        return self.lgbm_.predict(self._frame(X))

    def contributions(self, X: dict, *, n_steps: int = 32) -> Contributions:
        """Exact TreeSHAP log-odds terms: (N, F + extra) columns, tabular features then ``extra_names_``."""
        return self.lgbm_.contributions(self._frame(X))

    def save(self, directory: str | Path) -> None:
        """LightGBM's files, the encoder's files in ``encoder/`` and ``lightgbm_emb.json`` (no pickle)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.lgbm_.save(d)
        src = Path(self.encoder) if self.encoder is not None else None
        if src is not None and src.resolve() != (d / ENCODER_DIR).resolve():
            _copy_encoder(src, d / ENCODER_DIR)
            if self.prior_ is not None:
                self.prior_.copy_to(d / ENCODER_DIR)
        params = {**self.get_params(), "vocab": self.vocab_.to_dict() if self.vocab_ is not None else None}
        meta = {"estimator": "EmbeddingLightGBMModel", "params": params, "n_tabular": self.n_tabular_}
        atomic_write_text(d / "lightgbm_emb.json", json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "EmbeddingLightGBMModel":
        d = Path(directory)
        meta = json.loads((d / "lightgbm_emb.json").read_text())
        if meta.get("estimator") != "EmbeddingLightGBMModel":
            raise ValueError(f"{d} does not hold an EmbeddingLightGBMModel")
        model = cls(**meta["params"])
        v = meta["params"]["vocab"]
        model.vocab = model.vocab_ = SequenceVocab.from_dict(v) if v else None
        model.encoder_, model.encoder_meta_ = load_encoder(d / ENCODER_DIR)
        model.prior_ = RollingPrior.load(d / ENCODER_DIR) if model.prior else None
        model.lgbm_ = LightGBMModel.load(d)
        model.classes_ = model.lgbm_.classes_
        model.n_tabular_ = int(meta["n_tabular"])
        model.embedding_names_ = [f"{EMBEDDING_PREFIX}{i}" for i in range(model.encoder_.cfg.d_model)]
        return model
