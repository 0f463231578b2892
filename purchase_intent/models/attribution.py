"""What every model's ``contributions(X, *, n_steps=32)`` returns, and integrated gradients.

Each estimator splits its logit for each example into additive terms, in log-odds::

    base + features.sum(1) (+ events.sum(1)) == logit

- logistic regression: ``coef * standardised value``, base the intercept (exact);
- LightGBM: TreeSHAP ``pred_contrib``, base the expected raw score (exact);
- Transformer: integrated gradients (Captum, the ``explain`` extra) from a zero embedding for
  every event (mask kept) and the mean tabular vector to the input; base is the logit of that
  baseline, and the sum matches the logit up to the integral's error (``n_steps``).

``n_steps`` is a keyword of every model's ``contributions`` so that callers never ask which
model they hold; the exact methods have no integral and ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .transformer import SeedEnsemble


@dataclass(frozen=True)
class Contributions:
    """Additive log-odds terms of N examples.

    features : (N, F) one column per tabular feature, in the model's input order.
    base : (N,) the reference logit (bias / expected value / logit of the baseline input).
    events : (N, T) per event position of the input (right-aligned like the sequences, 0 on
        padding), or None for models that read no sequence.
    """

    features: np.ndarray
    base: np.ndarray
    events: Optional[np.ndarray] = None

    def __post_init__(self):  # float64 throughout (a no-op for float64 arrays)
        object.__setattr__(self, "features", np.asarray(self.features, dtype=np.float64))
        object.__setattr__(self, "base", np.asarray(self.base, dtype=np.float64))
        if self.events is not None:
            object.__setattr__(self, "events", np.asarray(self.events, dtype=np.float64))

    def total(self) -> np.ndarray:
        """base + all terms: the model's logit, (N,)."""
        s = self.base + self.features.sum(axis=1)
        return s + self.events.sum(axis=1) if self.events is not None else s


def _integrated_gradients_class():
    try:
        from captum.attr import IntegratedGradients
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError("Transformer explanations need captum: pip install 'purchase-intent[explain]'") from e
    return IntegratedGradients


def module_integrated_gradients(net, batch: dict, n_steps: int = 32, internal_batch_size: Optional[int] = None
                                ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Integrated gradients of a ``BehaviourTransformer`` (or ``SeedEnsemble``) for one batch of tensors.

    Baseline: every event's summed embedding at zero (the mask and recency ranks are kept) and
    the tabular vector at 0 (the training mean, as it is standardised). Only the inputs the
    network uses are attributed. A ``SeedEnsemble`` (logit = mean of its members' logits) gets
    the mean of its members' attributions: each member moves its own embeddings from zero, and
    completeness carries over to the mean.

    Returns (tabular (B, F), events (B, T) or None, base (B,)) as float64 arrays in log-odds.
    """
    if isinstance(net, SeedEnsemble):
        parts = [module_integrated_gradients(m, batch, n_steps, internal_batch_size) for m in net.members]
        tabular, events, base = (None if parts[0][i] is None else np.mean([p[i] for p in parts], axis=0)
                                 for i in range(3))
        return tabular, events, base
    IntegratedGradients = _integrated_gradients_class()
    net.eval()
    cfg = net.cfg
    B = (batch["mask"] if cfg.use_sequence else batch["tabular"]).shape[0]
    with torch.no_grad():
        inputs = []
        if cfg.use_sequence:  # the summed field embeddings, moved from zero to their value
            inputs.append(sum(net.embed[f](batch[f].long()) for f in net.fields))  # (B, T, d_model)
        if cfg.use_tabular:
            inputs.append(batch["tabular"].float())  # (B, F)

    def logit(*xs):  # captum repeats the inputs n_steps times along the batch; the mask must follow
        rows = {"mask": batch["mask"].repeat(xs[0].shape[0] // B, 1)} if cfg.use_sequence else {}
        return net.logits(rows, emb=xs[0] if cfg.use_sequence else None, tab=xs[-1] if cfg.use_tabular else None)

    zeros = tuple(torch.zeros_like(x) for x in inputs)
    attrs = IntegratedGradients(logit).attribute(tuple(inputs), baselines=zeros, n_steps=n_steps,
                                                 internal_batch_size=internal_batch_size)
    with torch.no_grad():
        base = logit(*zeros)
    events = attrs[0].sum(dim=-1).detach().double().numpy() if cfg.use_sequence else None
    tabular = attrs[-1].detach().double().numpy() if cfg.use_tabular else np.zeros((B, 0))
    return tabular, events, base.detach().double().numpy()


def integrated_gradients(net, batch: dict[str, torch.Tensor], X: dict, n_steps: int = 32,
                         internal_batch_size: int = 64) -> Contributions:
    """:class:`Contributions` of network ``net`` for the estimator input ``X`` and its tensors ``batch``.

    ``batch`` is what the estimator feeds ``net`` for ``X`` (``to_batch(X)``). It is trimmed to
    its longest real sequence (all-padding columns carry no attribution) and the event
    attributions are padded back to ``X``'s width; a sequence-only network gets zero feature
    terms, one for each column of ``X["tabular"]``.
    """
    mask = batch.get("mask")  # absent for a features-only network
    trimmed = batch
    if mask is not None:
        T = mask.shape[1]
        first = int(torch.nonzero(mask.any(dim=0)).min()) if bool(mask.any()) else T - 1
        trimmed = {k: (v[:, first:] if v.dim() == 2 and v.shape == mask.shape else v) for k, v in batch.items()}
    n = (mask if mask is not None else batch["tabular"]).shape[0]
    tab, ev, base = module_integrated_gradients(net, trimmed, n_steps=n_steps,
                                                internal_batch_size=max(internal_batch_size, n))
    events = None
    if "mask" in X:
        N, T_x = np.asarray(X["mask"]).shape
        events = np.zeros((N, T_x))
        if ev is not None:
            events[:, T_x - ev.shape[1]:] = ev
    if tab.shape[1] == 0:
        tab = np.zeros((n, np.asarray(X["tabular"]).shape[1] if "tabular" in X else 0))
    return Contributions(features=tab, base=base, events=events)
