"""Differentially private pretraining of the sequence encoder: the objectives as per-user losses for
:func:`purchase_intent.dp.train_dp` (the same user-level DP-SGD as the DP classifiers).

Pretraining reads one sequence per user, so a user's whole contribution to a step is the gradient of
the loss of their one row: Poisson-sample users, clip each row's gradient, add noise, account
(``dp.train_dp`` with ``examples_per_user=1``). The guarantee is (ε, δ)-DP per user for the
encoder's weights (and the heads of the objective, which are not kept).

Two objectives can be written per row:

- ``masked``: the masks are drawn for the whole batch by the collate step (torch's generator, outside
  ``vmap``), and each row's loss is the mean over its masked events of the heads' cross-entropy
  (token states of every column, the heads read the masked ones by weight, not by indexing);
- ``next``: the prefix length of each row is drawn by the collate step, the prefixes are cropped
  there, and each row's loss is the heads' cross-entropy of its next event (0 for a row with one
  event).

``contrastive`` cannot: its InfoNCE loss scores each user's pair against the other users of the
batch, so one user's data reaches every other row's gradient, and clipping rows does not bound a
user's contribution. It is refused (:func:`check_objective`).

The encoder runs in eval mode (dropout off) with its field embeddings summed from plain lookups,
which ``vmap`` batches (as the DP classifier's ``_dp_logits``).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dp as dpmod
from .pretraining import MASK_RATE, PretrainResult, crop, history_span, token_states
from .transformer import BehaviourTransformer, collate

DP_OBJECTIVES = ("masked", "next")
# token fields whose buckets are fitted on the data (price: quantile edges of the events); a DP encoder
# leaves them out, as the DP Transformer does, so that no statistic of the private events shapes its inputs
DATA_FITTED_FIELDS = ("price",)


def check_objective(name: str) -> None:
    """Raise ValueError for an objective that cannot be trained with user-level DP-SGD."""
    if name == "contrastive":
        raise ValueError("the contrastive objective cannot be pretrained with differential privacy: its in-batch "
                         "negatives put every user's data into the other users' gradients, so per-user clipping "
                         "does not bound a user's contribution; use --objective masked or next with dp_epsilon")
    if name not in DP_OBJECTIVES:
        raise ValueError(f"no DP pretraining for the objective {name!r}: choose one of {', '.join(DP_OBJECTIVES)}")


def _embeddings(net: BehaviourTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The summed field embeddings (B, T, D) from per-field lookups (``vmap`` batches them)."""
    ids = tokens.long() + net.embed.offsets  # (B, T, n_fields)
    return F.embedding(ids, net.embed.weight).sum(dim=2)  # (B, T, n_fields, D) -> (B, T, D)


def _heads_ce(objective: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each head from ``h`` (..., D) against its field of ``target`` (..., nf),
    averaged over the heads, per position (...)."""
    out = 0.0
    for f, i in zip(objective.targets, objective.index):
        logits = objective.heads[f](h).float()  # (..., V)
        out = out + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[..., i].reshape(-1).long(),
                                    reduction="none").reshape(target.shape[:-1])
    return out / len(objective.targets)


def _masked_collate(data: dict, rows: np.ndarray) -> dict[str, torch.Tensor]:
    batch = collate(data, rows)
    mask, tokens = batch["mask"], batch["tokens"]  # (B, T), (B, T, nf)
    chosen = (torch.rand(mask.shape) < MASK_RATE) & mask  # (B, T)
    last = torch.zeros_like(mask)
    last[:, -1] = True  # right-aligned: the newest event
    chosen = chosen | (~chosen.any(dim=1, keepdim=True) & mask & last)  # at least one masked event per row
    return {"tokens": tokens.masked_fill(chosen[:, :, None], 0), "mask": mask, "chosen": chosen, "target": tokens}


def _masked_loss(objective: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    net = objective.net
    h = token_states(net, batch, emb=_embeddings(net, batch["tokens"]))  # (B, T, D)
    w = batch["chosen"].float()  # (B, T)
    return (_heads_ce(objective, h, batch["target"]) * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B,)


def _next_collate(data: dict, rows: np.ndarray) -> dict[str, torch.Tensor]:
    batch = collate(data, rows)
    tokens, mask = batch["tokens"], batch["mask"]
    n, first = history_span(mask)
    length = 1 + torch.floor(torch.rand(n.shape) * (n - 1).clamp(min=0)).long()  # 1 .. n-1 (1 when n < 2)
    prefix = crop(batch, first, length)
    at = (first + length).clamp(max=mask.shape[1] - 1)
    target = torch.gather(tokens, 1, at[:, None, None].expand(-1, 1, tokens.shape[2]))[:, 0]  # (B, nf)
    return {"tokens": prefix["tokens"], "mask": prefix["mask"], "target": target, "ok": (n >= 2).float()}


def _next_loss(objective: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    net = objective.net
    h = net.encode({"mask": batch["mask"]}, emb=_embeddings(net, batch["tokens"]))  # (B, D)
    return _heads_ce(objective, h, batch["target"]) * batch["ok"]  # (B,)


_PARTS: dict[str, tuple[Callable, Callable]] = {"masked": (_masked_collate, _masked_loss),
                                                "next": (_next_collate, _next_loss)}


def pretrain_encoder_dp(objective: nn.Module, name: str, data: dict[str, np.ndarray], cfg: dpmod.DPConfig,
                        seed: int = 0, log: Optional[Callable[[str], None]] = None) -> tuple[PretrainResult, dict]:
    """Train ``objective`` (``name``: masked or next) and its encoder with user-level DP-SGD, one row
    per user; return the result and the privacy record of :func:`purchase_intent.dp.train_dp`.

    Raises
    ------
    ValueError
        For the contrastive objective; :class:`~purchase_intent.dp.PrivacyBudgetError` (a ValueError)
        for a budget the data cannot give, before any training.
    """
    check_objective(name)
    keep = np.flatnonzero(np.asarray(data["mask"]).any(axis=1))
    data = {k: np.asarray(v)[keep] for k, v in data.items()}
    users = np.arange(len(keep))  # one sequence per user
    plan = dpmod.plan(cfg, len(users))  # refuses before any training
    if log is not None:
        log(f"DP pretraining: {plan.steps} steps of ~{plan.expected_users:.0f} of {plan.n_users:,} users, noise "
            f"{plan.noise_multiplier:.3g}x the clip norm {cfg.max_grad_norm:g}, target ({cfg.epsilon:g}, "
            f"{plan.delta:.2g})-DP per user")
    collate_fn, loss_fn = _PARTS[name]
    t0 = time.perf_counter()
    record = dpmod.train_dp(objective, data, users, cfg, plan, collate_fn, seed=seed, progress=log is not None,
                            loss=loss_fn)
    record["objective"] = name
    res = PretrainResult(steps=plan.steps, sequences=int(round(plan.steps * plan.expected_users)),
                         seconds=time.perf_counter() - t0, history=[])
    objective.eval()
    return res, record
