"""``TransformerClassifier``: the behaviour-sequence Transformer behind the estimator contract.

A thin adapter: it standardises the tabular features with train statistics, turns arrays into
batches (:meth:`~TransformerClassifier.to_batch`, :func:`collate`), calls
:func:`purchase_intent.train.train` and calibrates the logits on valid. ``X`` is a dict of numpy
arrays as built by :func:`purchase_intent.sequences.build_sequences` plus ``"tabular"`` (N, F)
float (NaN allowed)::

    clf = TransformerClassifier(preset="tiny", vocab=vocab).fit(X, y, X_valid=Xv, y_valid=yv)
    p = clf.predict_proba(X_test)[:, 1]
    clf.save("runs/transformer"); clf = TransformerClassifier.load("runs/transformer")

``X`` of ``fit`` may instead be the train split written as Parquet shards
(:class:`~purchase_intent.sequence_shards.SequenceShards`, labels included, ``y=None``): the
network then trains from a stream of this rank's shards and never holds the whole train split
(the pipeline does this above ``stream_shard_rows`` train examples; valid stays in memory).

A saved directory holds ``model.safetensors`` and ``config.json`` (hyperparameters, the
architecture and loop configs, tabular statistics, calibration, the sequence vocab) and, when the
``onnx`` extra is installed, ``model.onnx``: the inference graph, checked against PyTorch before
it is written. Loading reads JSON, tensors and the ONNX graph only, never a pickle.

Inference (``decision_function``, ``predict_proba``) of a loaded model runs in ONNX Runtime
when the directory has ``model.onnx`` and onnxruntime is installed, and in PyTorch otherwise;
``PURCHASE_INTENT_INFERENCE=torch|onnx|auto`` chooses (see
:func:`~purchase_intent.models.onnx_inference.inference_mode`). Training and explanations
(:meth:`~TransformerClassifier.contributions`) always use the PyTorch module ``model_``.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from sklearn.base import BaseEstimator, ClassifierMixin

from .. import distributed, dp_tabular
from .. import dp as dpmod
from ..calibration import Calibrator, fit_calibrator
from ..config import from_dict
from ..sequence_shards import SequenceShards, ShardStream, check_shard_rows, read_shard
from ..sequences import SEQUENCE_FIELDS, SequenceVocab
from ..train import TrainLoopConfig, TrainResult, predict_logits, resolve_device, train
from ..workspace import atomic_write_bytes, atomic_write_text
from . import onnx_inference as ox
from .attribution import Contributions, integrated_gradients
from .prior import PRIOR_DIR, PRIOR_FEATURE, RollingPrior
from .settings import Setting, check_settings
from .transformer import BehaviourTransformer, SeedEnsemble, TransformerConfig, collate
from .transformer import preset as make_preset

# rows per ONNX Runtime call in decision_function: the cost per row is flat from about 64 rows,
# and the attention scores of 256 rows of length 200 already take 160 MB (small preset)
ONNX_BATCH_SIZE = 256
# the public range of the tabular features: log values clipped to it (the DP release's bound B) and
# standardised values clipped to it
TABULAR_BOUND = 10.0
# histogram bins per feature over [-TABULAR_BOUND, TABULAR_BOUND] for the quantile edges of tabular_bins
TABULAR_HISTOGRAM = 4096


def _as_vocab(vocab: Any) -> Optional[SequenceVocab]:
    if vocab is None or isinstance(vocab, SequenceVocab):
        return vocab
    return SequenceVocab.from_dict(vocab)


def _dp_logits(net: BehaviourTransformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``net.logits(batch)`` with the field embeddings summed from per-field lookups: ops that ``vmap``
    batches (``embedding_bag`` runs in its fallback loop), for the per-user gradients of DP training."""
    emb = None
    if net.cfg.use_sequence:
        ids = batch["tokens"] + net.embed.offsets  # (B, T, n_fields) rows of the big table
        emb = F.embedding(ids, net.embed.weight).sum(dim=2)  # (B, T, n_fields, D) -> (B, T, D)
    return net.logits(batch, emb=emb)


class TransformerClassifier(ClassifierMixin, BaseEstimator):
    """Purchase-intent classifier over event sequences and tabular features.

    Parameters
    ----------
    preset : {"tiny", "small", "base"}
        Architecture size; ``d_model``, ``n_layers``, ``n_heads`` override it when not None.
    dropout : float
    inputs : {"both", "sequence", "tabular"}
        Ablation switch: which inputs the model sees.
    wide : bool
        Add a linear ("wide") term of the tabular features to the logit.
    pooling : {"cls+max", "cls"}
        Sequence summary: the [CLS] output plus a masked max-pool of the token states, or [CLS] alone.
    drop_fields : sequence of str
        Token fields left out (names of ``SEQUENCE_FIELDS``). Default: the hashed item id, whose
        large table lets the model memorise shoppers (``item_state`` keeps what they did with an item).
    max_seq_len : int or None
        Keep only the most recent ``max_seq_len`` events of each sequence (None = all columns).
    pos_weight : float, "balanced" or None
        BCE weight of positives; "balanced" = n_negative / n_positive of the train labels.
    max_epochs, lr, batch_size, weight_decay, warmup_frac, patience, grad_clip, ema_decay :
        The :class:`~purchase_intent.train.TrainLoopConfig` fields of the same names (a cosine
        schedule; early stopping on valid PR-AUC).
    min_steps_per_epoch : int
        On a small train set the batch shrinks (not below 32) so that an epoch takes at least this
        many optimizer steps: with 577 train examples a batch of 512 gave 12 steps in all and a
        network that had not learned (BENCHMARKS.md, "Scaling study"). From ``batch_size *
        min_steps_per_epoch`` train examples on, ``batch_size`` is used as given.
    n_seeds : int
        Train this many networks, from seeds ``random_state``, ``random_state + 1``, ...; the
        logit is the mean of theirs (:class:`~purchase_intent.models.transformer.SeedEnsemble`),
        calibrated once: less variance from the seed, at ``n_seeds`` times the cost.
    valid_fraction : float
        Without ``X_valid``, the last rows (latest cutoffs: rows are in example_id order) are held
        out for early stopping and calibration.
    calibration : {"platt", "temperature", "none"}
        Fitted on the validation rows. Platt by default: logits biased by early stopping or a
        positive-class weight need a shift, which a temperature alone cannot give.
    tabular_scaling : {"train", "fixed", "dp"} or None
        Tabular features (after ``tabular_log``) standardised with the train mean and standard
        deviation ("train"), left as they are ("fixed": public constants only), or standardised with
        a differentially private release of the mean and scale ("dp", DP fits only:
        :mod:`purchase_intent.dp_tabular`, spending ``dp_tabular_share`` of ``dp_epsilon``, both
        accounted together). None: "train", or for a DP fit
        :data:`~purchase_intent.dp_tabular.DEFAULT_DP_SCALING`. A DP fit refuses "train".
    tabular_nan : float or None
        What a missing tabular feature (NaN: the hours since an event the user never had) becomes
        after the transform; None = 0 (the train mean when standardised; with fixed scaling the
        value of "0 hours ago"). A DP fit's features are all >= 0 after sign-log1p, so -1 marks
        "missing" apart from every real value without reading any data.
    tabular_log : bool
        ``sign(x) * log1p(|x|)`` before standardising (counts and durations are heavy-tailed).
    vocab : SequenceVocab, dict or None
        The vocab the sequences were built with; stored in the saved run. Without one, field
        sizes are taken from the train arrays.
    device : {"auto", "cpu", "cuda"}
    checkpoint_dir : str or None
        Per-epoch checkpoints (resume after a kill).
    progress : bool
    stream_shard_rows : int or None
        A train split of more than this many examples is written as Parquet shards of at most
        this many examples and streamed (:mod:`purchase_intent.sequence_shards`; under torchrun
        each rank reads only its own shards); None keeps it in memory. 50,000 by default: a
        train split that fits one shard gains nothing from streaming (BENCHMARKS.md, "Streamed
        train shards").
    random_state : int
    dp_epsilon, dp_delta, dp_max_grad_norm, dp_users_per_step, dp_examples_per_user, dp_epochs, dp_lr :
        With ``dp_epsilon`` set, train with user-level DP-SGD (:mod:`purchase_intent.dp`): an
        (ε, δ)-DP guarantee per user (δ default 1/n_users), clip norm of a user's summed gradient,
        expected users per step, most examples of a user per step, expected passes over the users,
        Adam's learning rate on the noisy gradient (fixed: no schedule, no early stopping).
        ``fit`` then needs ``groups`` (the user of each example); the tabular features are
        transformed with fixed constants (sign-log1p, no train mean or scale) or, with
        ``tabular_scaling="dp"``, standardised with a DP release of their mean and scale, the ``price`` field
        is left out unless its bucket edges are public (``vocab`` with ``price_bucketing="log"``;
        quantile edges are statistics of the train events), dropout is 0, and the validation data is
        not used (no early stopping, no calibration). One network (``n_seeds=1``).
    dp_tabular_share : float
        With ``tabular_scaling="dp"``: the share of ``dp_epsilon`` that the release of the tabular
        mean and scale alone would spend; the training's noise is then calibrated so that release
        and training composed spend at most ``dp_epsilon`` (:func:`purchase_intent.dp.plan`).
    dp_noise_seed : int or None
        None (the default): the DP noise, the users sampled at each step and the release's noise come
        from the operating system's entropy, which nobody can replay (``random_state`` seeds only the
        initial weights). An int makes them reproducible, for tests and experiments only.
    prior : bool
        One more tabular input: the rolling-origin prior (:mod:`~purchase_intent.models.prior`), the
        7-day purchase log-odds of the `future` head of the encoder pretrained before each example's
        cutoff (``pretrain --objective future --rolling``), read from ``encoder``. The inputs must be
        built with that encoder's vocabulary (``purchase-intent train`` does). The run keeps a copy
        of the encoders; the train split stays in memory (no shards); not with ``dp_epsilon``.
    encoder : str or None
        The pretrained folder whose ``rolling/`` encoders give the prior (``<workspace>/runs/pretrained``).

    Measured effects of the defaults are in BENCHMARKS.md.
    """

    def __init__(self, preset: str = "tiny", d_model: Optional[int] = None, n_layers: Optional[int] = None,
                 n_heads: Optional[int] = None, dropout: float = 0.1, inputs: str = "both", wide: bool = True,
                 pooling: str = "cls+max", drop_fields: Sequence[str] = ("item",),
                 max_seq_len: Optional[int] = 50, pos_weight: Any = None, max_epochs: int = 12,
                 lr: float = 2e-3, batch_size: int = 512, weight_decay: float = 0.05, warmup_frac: float = 0.05,
                 patience: int = 3, grad_clip: float = 1.0, ema_decay: float = 0.0, n_seeds: int = 1,
                 min_steps_per_epoch: int = 16, valid_fraction: float = 0.1,
                 calibration: str = "platt", tabular_log: bool = True, tabular_scaling: Optional[str] = None,
                 tabular_nan: Optional[float] = None, vocab: Any = None,
                 device: str = "auto", checkpoint_dir: Optional[str] = None, progress: bool = False,
                 stream_shard_rows: Optional[int] = 50_000, random_state: int = 0,
                 dp_epsilon: Optional[float] = None, dp_delta: Optional[float] = None,
                 dp_max_grad_norm: float = 1.0, dp_users_per_step: int = 512, dp_examples_per_user: int = 2,
                 dp_epochs: float = 20.0, dp_lr: float = 1e-2, dp_tabular_share: float = 0.1,
                 prior: bool = False, encoder: Optional[str] = None, tabular_bins: int = 0,
                 dp_noise_seed: Optional[int] = None):
        self.preset = preset
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dropout = dropout
        self.inputs = inputs
        self.wide = wide
        self.pooling = pooling
        self.drop_fields = drop_fields
        self.max_seq_len = max_seq_len
        self.pos_weight = pos_weight
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.min_steps_per_epoch = min_steps_per_epoch
        self.weight_decay = weight_decay
        self.warmup_frac = warmup_frac
        self.patience = patience
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.n_seeds = n_seeds
        self.valid_fraction = valid_fraction
        self.calibration = calibration
        self.tabular_log = tabular_log
        self.tabular_scaling = tabular_scaling
        self.tabular_nan = tabular_nan
        self.vocab = vocab
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.stream_shard_rows = stream_shard_rows
        self.random_state = random_state
        self.dp_epsilon = dp_epsilon
        self.dp_delta = dp_delta
        self.dp_max_grad_norm = dp_max_grad_norm
        self.dp_users_per_step = dp_users_per_step
        self.dp_examples_per_user = dp_examples_per_user
        self.dp_epochs = dp_epochs
        self.dp_lr = dp_lr
        self.dp_tabular_share = dp_tabular_share
        self.prior = prior
        self.encoder = encoder
        self.tabular_bins = tabular_bins
        self.dp_noise_seed = dp_noise_seed

    # ------------------------------------------------------------------ arrays -> batches
    def _tabular(self, X: dict) -> Optional[np.ndarray]:
        if not self.model_config_.use_tabular:
            return None
        t = np.asarray(X["tabular"], dtype=np.float64)  # (N, F)
        if self.tabular_log:
            t = np.sign(t) * np.log1p(np.abs(t))
        t = (t - self.tab_mean_) / self.tab_scale_
        # NaN (no such event: hours since a purchase never made) -> tabular_nan, default 0: the train
        # mean when standardised, the value of a zero count when not
        nan = 0.0 if getattr(self, "tabular_nan", None) is None else float(self.tabular_nan)
        return np.nan_to_num(np.clip(t, -TABULAR_BOUND, TABULAR_BOUND), nan=nan).astype(np.float32)

    def _arrays(self, X: dict, y: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """The model's inputs as arrays: fields cut to the last max_seq_len columns, clipped ids."""
        out: dict[str, np.ndarray] = {}
        cfg = self.model_config_
        if cfg.use_sequence:
            L = cfg.max_seq_len
            out["mask"] = np.asarray(X["mask"])[:, -L:]
            for f, size in cfg.field_sizes.items():
                a = np.asarray(X[f])[:, -L:]
                out[f] = np.minimum(a, size - 1) if a.max(initial=0) >= size else a  # unseen -> last row
        if cfg.use_tabular:
            out["tabular"] = self._tabular(X)
        if y is not None:
            out["label"] = np.asarray(y, dtype=np.float32)
        return out

    # ------------------------------------------------------------------ the rolling-origin prior
    @property
    def extra_names_(self) -> list[str]:
        """The tabular columns after the run's features: the prior when ``prior``."""
        return [PRIOR_FEATURE] if self.prior else []

    MODEL_NAME = "transformer"  # the model's name in messages (the registry's)
    SIZES_FROM_ENCODER = False  # d_model and n_heads come from a pretrained encoder, not the preset
    # the numeric settings, checked before any data is read (tabular_bins, stream_shard_rows and the DP budget
    # have their own checks)
    SETTINGS = (Setting("d_model", int, 1, none=True), Setting("n_layers", int, 1, none=True),
                Setting("n_heads", int, 1, none=True), Setting("dropout", float, 0, 1, hi_in=False),
                Setting("max_seq_len", int, 1, none=True), Setting("max_epochs", int, 1),
                Setting("lr", float, 0, lo_in=False), Setting("batch_size", int, 1),
                Setting("weight_decay", float, 0), Setting("warmup_frac", float, 0, 1),
                Setting("patience", int, 0), Setting("grad_clip", float, 0),
                Setting("ema_decay", float, 0, 1, hi_in=False), Setting("n_seeds", int, 1),
                Setting("min_steps_per_epoch", int, 1),
                Setting("valid_fraction", float, 0, 1, lo_in=False, hi_in=False),
                Setting("random_state", int, none=True), Setting("dp_max_grad_norm", float, 0, lo_in=False),
                Setting("dp_users_per_step", int, 1), Setting("dp_examples_per_user", int, 1),
                Setting("dp_epochs", float, 0, lo_in=False), Setting("dp_lr", float, 0, lo_in=False),
                Setting("dp_noise_seed", int, 0, none=True))

    def check_settings(self) -> None:
        """Raise ValueError (one line) for a numeric setting of the wrong type or out of range (``lr="0,1"``,
        ``max_epochs=1.5``, ``dropout=2``), and for ``d_model`` not a multiple of ``n_heads``."""
        name = self.MODEL_NAME
        check_settings(name, self, self.SETTINGS)
        if self.SIZES_FROM_ENCODER:
            return
        base = make_preset(self.preset)  # an unknown preset: one line naming the presets
        d_model, n_heads = self.d_model or base.d_model, self.n_heads or base.n_heads
        if d_model % n_heads:
            raise ValueError(f"{name}: d_model ({d_model}) must be a multiple of n_heads ({n_heads}); "
                             f"preset {self.preset} has d_model {base.d_model} and n_heads {base.n_heads}")

    def _check_fit_settings(self) -> None:
        self.check_settings()

    def check_prior(self) -> None:
        """Raise ValueError (one line) for a ``prior`` setting that is not a boolean, or with ``dp_epsilon``."""
        if not isinstance(self.prior, bool):
            raise ValueError(f"prior must be true or false, got {self.prior!r} (e.g. --param prior=true)")
        if self.prior and getattr(self, "dp_epsilon", None) is not None:
            raise ValueError("prior=true with dp_epsilon: the rolling encoders are not differentially private, "
                             "so the model would not be; leave one of them out")

    def _with_prior(self, X: Optional[dict]) -> Optional[dict]:
        """``X`` with the prior appended to its tabular features (once: a dict that has it is returned)."""
        if not self.prior or X is None or PRIOR_FEATURE in X:
            return X
        if getattr(self, "prior_", None) is None:
            raise ValueError("this run reads the rolling encoders' prior, which only its folder's PyTorch scoring "
                             "computes (not the ONNX graph alone, as on Spark)")
        value = self.prior_.logodds(X)
        return {**X, "tabular": np.column_stack([np.asarray(X["tabular"], dtype=np.float32), value]),
                PRIOR_FEATURE: value}

    def explain_frame(self, X: dict, feature_names: Sequence[str]) -> pd.DataFrame:
        """The tabular values ``contributions`` attributes, under ``feature_names`` and ``extra_names_``."""
        return pd.DataFrame(np.asarray(self._with_prior(X)["tabular"], dtype=np.float64),
                            columns=list(feature_names) + self.extra_names_)

    def to_batch(self, X: dict) -> dict[str, torch.Tensor]:
        """The tensors the network scores for all rows of ``X``: what ``predict_proba`` sees.

        Fields cut to the last ``max_seq_len`` columns (unseen ids clipped), tabular features
        standardised with the train statistics, columns that are padding in every row dropped.
        """
        data = self._arrays(self._with_prior(X))
        return collate(data, np.arange(len(next(iter(data.values())))))

    def contributions(self, X: dict, *, n_steps: int = 32) -> Contributions:
        """Integrated-gradients log-odds terms of the uncalibrated logit (needs the ``explain`` extra).

        Features (N, F), events (N, T) at ``X``'s positions and base (N,): the logit with every
        event embedding at zero and the tabular features at their train mean; ``n_steps``
        integration steps. A seed ensemble gets the mean of its networks' terms.
        """
        X = self._with_prior(X)
        return integrated_gradients(self.model_, self.to_batch(X), X, n_steps=n_steps)

    # ------------------------------------------------------------------ estimator API
    def effective_batch_size(self, n_train: int) -> int:
        """``batch_size``, or for fewer than ``batch_size * min_steps_per_epoch`` train examples the
        batch (at least 32) that gives ``min_steps_per_epoch`` steps per epoch."""
        steps = max(1, int(self.min_steps_per_epoch))
        return int(min(self.batch_size, max(32, -(-int(n_train) // steps))))

    def streams(self, n_train: int) -> bool:
        """Whether a train split of ``n_train`` examples is trained from shards (``stream_shard_rows``
        checked: a ValueError of one line when it is not a positive integer or None)."""
        rows = getattr(self, "stream_shard_rows", None)
        if rows is None or self.prior:  # the prior reads each example's cutoff, which the shards do not keep
            return False
        return check_shard_rows(rows) < n_train and self.dp_epsilon is None

    def fit(self, X: "dict | SequenceShards", y, X_valid: Optional[dict] = None, y_valid=None,
            groups=None) -> "TransformerClassifier":
        """Train on (X, y); early stopping and calibration on (X_valid, y_valid) or a temporal holdout.

        With ``dp_epsilon``: DP-SGD over the users ``groups`` (n,), and (X_valid, y_valid) unused.
        With ``X`` a :class:`~purchase_intent.sequence_shards.SequenceShards`: ``y=None`` (the
        labels are in the shards) and ``X_valid``, ``y_valid`` given.
        """
        self._check_fit_settings()
        self.check_prior()
        if isinstance(X, SequenceShards):
            if self.prior:
                raise ValueError("prior=true trains from the inputs in memory, not from shards")
            return self._fit(X, None, X_valid, y_valid, None)
        if not self.prior:
            self.prior_ = None
        elif PRIOR_FEATURE not in X:  # (transformer_pt loads the encoders and hands X with the prior)
            self.prior_ = RollingPrior.load(self.encoder)
        X, X_valid = self._with_prior(X), self._with_prior(X_valid)
        return self._fit(X, np.asarray(y).astype(int).ravel(), X_valid, y_valid, groups)

    def _shard_summary(self, shards: SequenceShards, fields: Sequence[str]) -> dict:
        """What fit reads from the train arrays, from one pass over this rank's shards summed over
        the ranks: rows, positives, the maximum of each field, the tabular mean and scale."""
        cols = shards.schema()
        n_tab = cols["tabular"][0] if "tabular" in cols else 0
        fields = [f for f in fields if f in cols]
        sums = np.zeros(2 + 3 * n_tab)  # rows, positives, then count / sum / sum of squares per column
        maxes = np.zeros(max(1, len(fields)))
        for i in shards.own():
            d = read_shard(shards.paths[i])
            sums[0] += len(d["label"])
            sums[1] += float(np.sum(d["label"]))
            maxes[:len(fields)] = np.maximum(maxes[:len(fields)], [int(d[f].max(initial=0)) for f in fields])
            if n_tab:
                t = np.asarray(d["tabular"], dtype=np.float64)
                if self.tabular_log:
                    t = np.sign(t) * np.log1p(np.abs(t))
                ok = ~np.isnan(t)
                t = np.where(ok, t, 0.0)
                sums[2:] += np.concatenate([ok.sum(axis=0), t.sum(axis=0), (t * t).sum(axis=0)])
        sums, maxes = distributed.all_reduce(sums), distributed.all_reduce(maxes, "max")
        count, total, squares = sums[2:2 + n_tab], sums[2 + n_tab:2 + 2 * n_tab], sums[2 + 2 * n_tab:]
        with np.errstate(all="ignore"):
            mean = total / count
            std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
        return {"n": int(sums[0]), "positives": int(sums[1]), "columns": cols, "n_tabular": n_tab,
                "field_max": dict(zip(fields, maxes.astype(int).tolist())),
                "tab_mean": np.nan_to_num(mean, nan=0.0),
                "tab_scale": np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)}

    def _fit(self, X: "dict | SequenceShards", y: Optional[np.ndarray], X_valid: Optional[dict], y_valid,
             groups) -> "TransformerClassifier":
        streamed = isinstance(X, SequenceShards)
        if streamed and (X_valid is None or self.dp_epsilon is not None):
            raise ValueError("a fit from train shards needs X_valid and y_valid, and no dp_epsilon "
                             "(set stream_shard_rows=null for a DP fit)")
        if streamed:
            # the statistics of the train split are summed over the ranks
            distributed.setup(resolve_device(TrainLoopConfig(device=self.device))[0].type)
            summary = self._shard_summary(X, SEQUENCE_FIELDS)
        dp = self._dp_config(groups, len(y)) if not streamed else None
        scaling = dp_tabular.resolve_scaling(self.tabular_scaling, dp is not None)
        if dp is not None and scaling == "dp":
            dp = dataclasses.replace(dp, tabular_share=dpmod.check_share(self.dp_tabular_share))
        dp_plan = dpmod.plan(dp, len(np.unique(groups))) if dp is not None else None  # refuses before training
        self.privacy_ = None
        if dp is not None:
            X_valid, y_valid = X, y  # placeholders: a DP model is neither selected nor calibrated on data
        if int(self.n_seeds) != self.n_seeds or self.n_seeds < 1:
            raise ValueError(f"n_seeds must be a positive integer, got {self.n_seeds!r}")
        self.onnx_path_ = self.onnx_scorer_ = None  # a refit must never score with an old graph
        self.classes_ = np.array([0, 1])
        if not streamed and set(np.unique(y)) - {0, 1}:
            raise ValueError("TransformerClassifier expects binary 0/1 labels")
        if X_valid is None:
            n_valid = max(1, int(round(len(y) * self.valid_fraction)))
            cut = len(y) - n_valid
            X_valid = {k: np.asarray(v)[cut:] for k, v in X.items()}
            y_valid = y[cut:]
            X = {k: np.asarray(v)[:cut] for k, v in X.items()}
            y = y[:cut]
        y_valid = np.asarray(y_valid).astype(int).ravel()
        self.vocab_ = _as_vocab(self.vocab)
        drop = (self.drop_fields,) if isinstance(self.drop_fields, str) else tuple(self.drop_fields or ())
        if dp is not None and not (self.vocab_ is not None and self.vocab_.cfg.price_bucketing == "log"):
            drop += ("price",)  # its bucket edges are quantiles of the train events (public "log" edges are kept)
        unknown = set(drop) - set(SEQUENCE_FIELDS)
        if unknown:
            raise ValueError(f"drop_fields has unknown fields {sorted(unknown)}: "
                             f"choose from {', '.join(SEQUENCE_FIELDS)}")
        columns = summary["columns"] if streamed else X
        fields = [f for f in SEQUENCE_FIELDS if f in columns and f not in drop]
        use_seq = self.inputs in ("both", "sequence") and bool(fields) and "mask" in columns
        n_tab = summary["n_tabular"] if streamed else (np.asarray(X["tabular"]).shape[1] if "tabular" in X else 0)
        use_tab = self.inputs in ("both", "tabular") and n_tab > 0
        n_tab = n_tab if use_tab else 0
        if not (use_seq or use_tab):
            raise ValueError(f"inputs={self.inputs!r} but X has no usable sequence fields / tabular array")
        if use_seq:
            if self.vocab_ is not None:
                sizes = self.vocab_.field_sizes()
            elif streamed:
                sizes = {f: m + 1 for f, m in summary["field_max"].items()}
            else:
                sizes = {f: int(np.asarray(X[f]).max(initial=0)) + 1 for f in fields}
            field_sizes = {f: sizes[f] for f in fields}
            T = summary["columns"]["mask"][0] if streamed else np.asarray(X["mask"]).shape[1]
            L = min(T, self.max_seq_len) if self.max_seq_len else T
        else:
            field_sizes, L = {}, 1
        release = None
        if use_tab and streamed and scaling == "fixed":
            self.tab_mean_, self.tab_scale_ = np.zeros(n_tab), np.ones(n_tab)
        elif use_tab and streamed:
            self.tab_mean_, self.tab_scale_ = summary["tab_mean"], summary["tab_scale"]
        elif use_tab and scaling == "dp":  # the DP release of the mean and scale, accounted with the training
            t = dp_tabular.public_transform(X["tabular"], TABULAR_BOUND, log=self.tabular_log)
            self.tab_mean_, self.tab_scale_, release = dp_tabular.release(
                t, np.asarray(groups), dp.examples_per_user, dp_plan.release_noise_multiplier, TABULAR_BOUND,
                dpmod.noise_rng(dp, 1), labels=y)
        elif use_tab:
            t = np.asarray(X["tabular"], dtype=np.float64)
            if self.tabular_log:
                t = np.sign(t) * np.log1p(np.abs(t))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: mean 0, scale 1 below
                mean, std = np.nanmean(t, axis=0), np.nanstd(t, axis=0)
            self.tab_mean_ = np.nan_to_num(mean, nan=0.0)
            self.tab_scale_ = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
            if scaling == "fixed":  # fixed public constants: no statistic of the data
                self.tab_mean_, self.tab_scale_ = np.zeros(n_tab), np.ones(n_tab)
        n_train, n_pos = (summary["n"], summary["positives"]) if streamed else (len(y), int((y == 1).sum()))
        pw = self.pos_weight
        if pw == "balanced":
            pw = float((n_train - n_pos) / max(n_pos, 1))
        overrides = {k: getattr(self, k) for k in ("d_model", "n_layers", "n_heads") if getattr(self, k) is not None}
        self.model_config_ = make_preset(self.preset, field_sizes=field_sizes, n_tabular=n_tab, max_seq_len=L,
                                         dropout=0.0 if dp is not None else self.dropout,
                                         use_sequence=use_seq, use_tabular=use_tab,
                                         wide=self.wide, pooling=self.pooling,
                                         tabular_bins=self.check_tabular_bins(dp is not None) if use_tab else 0,
                                         pos_weight=None if pw is None else float(pw), **overrides)
        self.loop_config_ = TrainLoopConfig(
            max_epochs=self.max_epochs, batch_size=self.effective_batch_size(n_train), lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_frac=self.warmup_frac, patience=self.patience, grad_clip=self.grad_clip,
            ema_decay=self.ema_decay, seed=self.random_state, device=self.device, checkpoint_dir=self.checkpoint_dir,
            progress=self.progress)
        train_data = None if streamed else self._arrays(X, y)
        self.tab_edges_ = None
        if self.model_config_.tabular_bins:  # the train features as the network reads them: a shard at a time
            self.tab_edges_ = self._tabular_edges(
                (self._tabular(read_shard(X.paths[i])) for i in X.own()) if streamed else [train_data["tabular"]],
                streamed)
        if dp is not None:
            return self._fit_dp(train_data, np.asarray(groups), dp, dp_plan, release)
        valid_data = self._arrays(X_valid, y_valid)
        members, results = [], []
        for k in range(int(self.n_seeds)):  # each member: its own seed, init, batch order and early stop
            seed = self.random_state + k
            loop = self.loop_config_
            if self.n_seeds > 1:
                ckpt = None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / f"seed{seed}")
                loop = dataclasses.replace(loop, seed=seed, checkpoint_dir=ckpt)
            if self.progress and self.n_seeds > 1 and distributed.is_main():
                print(f"network {k + 1} of {self.n_seeds} (seed {seed})", flush=True)
            torch.manual_seed(seed)
            net = self.new_network()
            data = (ShardStream(X, loop.batch_size, seed, transform=lambda d: self._arrays(d, d["label"]))
                    if streamed else train_data)
            result: TrainResult = train(net, data, valid_data, loop, collate=collate)
            members.append(net)
            results.append(dataclasses.asdict(result))
        if len(members) == 1:
            self.model_, self.train_result_ = members[0], results[0]
        else:
            self.model_ = SeedEnsemble(members)
            self.train_result_ = {"members": results}
        self.calibrator_ = fit_calibrator(self.decision_function(X_valid), y_valid, self.calibration)
        return self

    def check_tabular_bins(self, dp: bool) -> int:
        """``tabular_bins`` checked: a ValueError of one line unless an integer in [0, 64], or with DP (``dp``)."""
        k = self.tabular_bins
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= 64:
            raise ValueError(f"tabular_bins must be an integer from 0 to 64, got {k!r} (e.g. --param tabular_bins=16)")
        if k and dp:
            raise ValueError("tabular_bins with dp_epsilon: the bin edges are quantiles of the private train "
                             "features; leave tabular_bins at 0 for a DP fit")
        return int(k)

    def _tabular_edges(self, tables: Iterable[np.ndarray], streamed: bool) -> np.ndarray:
        """(F, K+1) bin edges of the tabular features as the network reads them (``tables``: the train split's,
        standardised and clipped to ±TABULAR_BOUND, in one or more parts): their quantiles, from a histogram of
        TABULAR_HISTOGRAM bins per feature, summed over the parts and, when ``streamed``, over the ranks."""
        K, n_bins = self.model_config_.tabular_bins, TABULAR_HISTOGRAM
        F = self.model_config_.n_tabular
        counts = np.zeros((F, n_bins))
        scale = n_bins / (2 * TABULAR_BOUND)
        for t in tables:
            b = np.clip(((t + TABULAR_BOUND) * scale).astype(np.int64), 0, n_bins - 1)  # (N, F)
            for f in range(F):
                counts[f] += np.bincount(b[:, f], minlength=n_bins)
        if streamed:
            counts = distributed.all_reduce(counts.ravel()).reshape(F, n_bins)
        cum = np.cumsum(counts, axis=1)  # (F, n_bins)
        right = -TABULAR_BOUND + (np.arange(n_bins) + 1) / scale  # each histogram bin's upper edge
        edges = np.empty((F, K + 1))
        for f in range(F):
            n = cum[f, -1]
            nonempty = np.flatnonzero(counts[f])
            if n == 0:
                edges[f] = 0.0
                continue
            at = np.searchsorted(cum[f], np.linspace(0, 1, K + 1)[1:-1] * n)  # the bin holding each inner quantile
            edges[f] = np.concatenate([[right[nonempty[0]] - 1 / scale], right[at], [right[nonempty[-1]]]])
        return edges.astype(np.float32)

    def new_network(self) -> BehaviourTransformer:
        """A freshly initialised network of ``model_config_``, holding the fitted tabular bin edges."""
        net = BehaviourTransformer(self.model_config_)
        if self.model_config_.use_tabular and self.model_config_.tabular_bins:
            with torch.no_grad():
                net.tab_edges.copy_(torch.as_tensor(self.tab_edges_))
        return net

    def _dp_config(self, groups, n: int):
        """The :class:`~purchase_intent.dp.DPConfig` of a DP fit (None without ``dp_epsilon``)."""
        if self.dp_epsilon is None:
            return None
        dpmod.check_budget(self.dp_epsilon, self.dp_delta)
        if groups is None or len(groups) != n:
            raise ValueError("dp_epsilon needs the user of each train example: fit(X, y, groups=user_ids)")
        if int(self.n_seeds) != 1:
            raise ValueError("dp_epsilon trains one network: each seed would spend the budget again (n_seeds=1)")
        if self.pos_weight == "balanced":
            raise ValueError("pos_weight='balanced' is a statistic of the private labels: "
                             "give a number with dp_epsilon")
        return dpmod.DPConfig(epsilon=float(self.dp_epsilon), delta=self.dp_delta,
                              max_grad_norm=float(self.dp_max_grad_norm), users_per_step=int(self.dp_users_per_step),
                              examples_per_user=int(self.dp_examples_per_user), epochs=float(self.dp_epochs),
                              lr=float(self.dp_lr), noise_seed=self.dp_noise_seed)

    def _fit_dp(self, train_data: dict, groups: np.ndarray, dp, dp_plan, release: Optional[dict]
                ) -> "TransformerClassifier":
        if dp_plan.release_noise_multiplier is not None and release is None:  # the model reads no tabular input
            dp_plan = dpmod.plan(dataclasses.replace(dp, tabular_share=0.0), dp_plan.n_users)
        torch.manual_seed(self.random_state)
        self.model_ = self.new_network()
        bias = dp_tabular.initial_bias(release)
        if bias is not None:  # the released share of positives: centred features no longer carry the mean logit
            with torch.no_grad():
                self.model_.head[-1].bias.fill_(bias)
        self.privacy_ = dpmod.train_dp(self.model_, train_data, groups, dp, dp_plan, collate,
                                       seed=self.random_state, progress=self.progress, logits=_dp_logits)
        if release is not None:
            self.privacy_["tabular_release"] = release
        self.train_result_ = {"steps": dp_plan.steps, "dp": True}
        self.calibrator_ = fit_calibrator(np.zeros(0), np.zeros(0), "none")
        return self

    def decision_function(self, X: dict) -> np.ndarray:
        """Uncalibrated logits, (N,)."""
        data = self._arrays(self._with_prior(X))
        n = len(next(iter(data.values())))
        scorer = self._onnx_scorer(n)
        if scorer is not None:
            out = np.empty(n, dtype=np.float32)
            for lo in range(0, n, ONNX_BATCH_SIZE):
                idx = np.arange(lo, min(n, lo + ONNX_BATCH_SIZE))
                out[idx] = scorer.logits(collate(data, idx))
            return out
        _, amp = resolve_device(self.loop_config_)
        return predict_logits(self.model_, data, self.loop_config_.eval_batch_size,
                              collate, next(self.model_.parameters()).device, amp)

    def predict_proba(self, X: dict) -> np.ndarray:
        """Calibrated probabilities, (N, 2): column 1 is P(purchase)."""
        p = self.calibrator_.transform(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: dict) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)

    # ------------------------------------------------------------------ ONNX Runtime
    def _onnx_scorer(self, n_rows: int) -> Optional["ox.OnnxScorer"]:
        """The ONNX Runtime session to score ``n_rows`` rows with, or None for PyTorch."""
        if getattr(self, "model_", None) is None and getattr(self, "onnx_scorer_", None) is not None:
            return self.onnx_scorer_  # loaded by load_onnx: the graph is the only runtime
        mode = ox.inference_mode()
        if mode == "torch":
            return None
        if getattr(self, "onnx_path_", None) is None:
            if mode == "onnx" and not getattr(self, "_onnx_warned", False):
                self._onnx_warned = True
                warnings.warn(f"{ox.INFERENCE_ENV}=onnx but this model has no usable {ox.ONNX_FILE} "
                              "(or onnxruntime is not installed): running PyTorch", RuntimeWarning, stacklevel=3)
                ox.record_fallback("no_graph")
            return None
        on_cpu = next(self.model_.parameters()).device.type == "cpu"
        if mode == "auto" and not (on_cpu and ox.prefer_onnx(n_rows)):
            return None
        if getattr(self, "onnx_scorer_", None) is None:
            try:
                self.onnx_scorer_ = ox.OnnxScorer(self.onnx_path_)
            except Exception as e:  # a corrupt file, an unsupported opset: PyTorch still works
                warnings.warn(f"cannot open {self.onnx_path_} with onnxruntime ({e!r}): running PyTorch",
                              RuntimeWarning, stacklevel=3)
                ox.record_fallback("open_failed")
                self.onnx_path_ = None
                return None
        return self.onnx_scorer_

    # ------------------------------------------------------------------ artifacts
    def save(self, directory: str | Path) -> None:
        """Write model.safetensors, model.onnx (when exportable) and config.json into `directory`.

        Each file is written atomically, config.json last: it records the sha256 of the
        model.onnx written with these weights, so a stale graph is never used. Main rank only.
        """
        if not distributed.is_main():
            return
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        params["vocab"] = self.vocab_.to_dict() if self.vocab_ is not None else None
        tab = ({"mean": self.tab_mean_.tolist(), "scale": self.tab_scale_.tolist()}
               if self.model_config_.use_tabular else None)
        meta = {"estimator": "TransformerClassifier", "params": params,
                "transformer": dataclasses.asdict(self.model_config_),
                "train_loop": dataclasses.asdict(self.loop_config_), "tabular": tab,
                "calibration": self.calibrator_.to_dict(), "train_result": self.train_result_,
                "privacy": getattr(self, "privacy_", None)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        atomic_write_bytes(d / "model.safetensors", save_tensors(state))
        onnx_bytes = ox.export_checked(self.model_)
        if onnx_bytes is not None:
            atomic_write_bytes(d / ox.ONNX_FILE, onnx_bytes)
            meta["onnx"] = {"file": ox.ONNX_FILE, "sha256": ox.sha256(onnx_bytes), "opset": ox.OPSET}
        else:
            (d / ox.ONNX_FILE).unlink(missing_ok=True)
        if getattr(self, "prior_", None) is not None:  # the run's own copy: scoring never reads the workspace's
            self.prior_.copy_to(d / PRIOR_DIR)
        atomic_write_text(d / "config.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "TransformerClassifier":
        """Rebuild a saved classifier from JSON, safetensors and model.onnx (no pickle)."""
        d = Path(directory)
        meta = json.loads((d / "config.json").read_text())
        clf = cls._configured(meta, device)
        n_seeds = int(meta["params"].get("n_seeds", 1))
        clf.model_ = (BehaviourTransformer(clf.model_config_) if n_seeds == 1
                      else SeedEnsemble([BehaviourTransformer(clf.model_config_) for _ in range(n_seeds)]))
        clf.model_.load_state_dict(load_file(str(d / "model.safetensors")))
        clf.model_.to(device).eval()
        clf.onnx_path_ = ox.saved_onnx(d, meta.get("onnx"))
        clf.prior_ = RollingPrior.load(d / PRIOR_DIR) if clf.prior else None
        if ox.inference_mode() != "torch":
            clf._onnx_scorer(1)  # open the session now, not in the first request
        return clf

    @classmethod
    def load_onnx(cls, config: dict, graph: bytes, n_threads: Optional[int] = None) -> "TransformerClassifier":
        """A saved classifier that scores in ONNX Runtime only: its config.json (parsed) and the bytes
        of its model.onnx, no PyTorch weights (what batch scoring on Spark executors rebuilds).

        ``decision_function`` and ``predict_proba`` run the graph whatever ``PURCHASE_INTENT_INFERENCE``
        says, on the inputs and with the calibration of :meth:`load`; ``contributions`` and ``fit``
        need the weights. ``n_threads``: ONNX Runtime's intra-op threads (see ``OnnxScorer``).
        Raises ValueError when config.json records no graph or another one (its sha256).
        """
        entry = config.get("onnx") or {}
        if entry.get("file") != ox.ONNX_FILE:
            raise ValueError(f"the saved model records no {ox.ONNX_FILE}")
        if ox.sha256(graph) != entry.get("sha256"):
            raise ValueError(f"{ox.ONNX_FILE} does not match the saved weights (sha256)")
        clf = cls._configured(config, "cpu")
        clf.model_ = clf.onnx_path_ = None
        clf.onnx_scorer_ = ox.OnnxScorer(graph, n_threads=n_threads)
        return clf

    @classmethod
    def _configured(cls, meta: dict, device: str) -> "TransformerClassifier":
        """A classifier with everything config.json holds (parameters, configs, tabular statistics,
        calibration), before any network is attached."""
        names = cls().get_params().keys()
        # runs saved before these parameters existed: [CLS] alone, every token field
        params = {"pooling": "cls", "drop_fields": [], **meta["params"]}
        clf = cls(**{k: v for k, v in params.items() if k in names})
        clf.vocab = clf.vocab_ = _as_vocab(clf.vocab)
        clf.classes_ = np.array([0, 1])
        clf.model_config_ = from_dict(TransformerConfig, {"pooling": "cls", **meta["transformer"]})
        clf.loop_config_ = from_dict(TrainLoopConfig, {**meta["train_loop"], "device": device})
        if meta.get("tabular"):
            clf.tab_mean_ = np.asarray(meta["tabular"]["mean"], dtype=np.float64)
            clf.tab_scale_ = np.asarray(meta["tabular"]["scale"], dtype=np.float64)
        clf.calibrator_ = Calibrator.from_dict(meta["calibration"])
        clf.train_result_ = meta.get("train_result", {})
        clf.privacy_ = meta.get("privacy")
        return clf

