"""Self-supervised objectives for the sequence encoder of :class:`BehaviourTransformer`, and their loop.

The encoder is a ``BehaviourTransformer`` with ``use_tabular=False``: its :meth:`encode` gives the
(B, D) summary of an event sequence that the fine-tuned classifier and ``lightgbm_emb`` read. No
label is used; each objective is an ``nn.Module`` with ``forward(batch) -> loss`` over a batch of
the network's ``collate`` (``models.transformer``) (``"tokens"`` (B, T, n_fields), ``"mask"`` (B, T), right-aligned):

- ``"masked"`` (BERT-style): 15% of the real events have every field set to 0 (the learned
  "missing" row of each field, which acts as the mask token); the full token states of the last
  block predict the masked events' event type, category bucket and ``dt_prev`` time bucket.
- ``"contrastive"`` (CoLES-style): two random contiguous sub-sequences (40-100% of the history)
  of one user are a positive pair, the other users of the batch the negatives (symmetric InfoNCE
  on a projection of the summaries, temperature 0.1).
- ``"next"`` (next-event prediction): a random prefix of the history (at least one event, one
  event left after it) is encoded and its summary predicts the type and category bucket of the
  event that follows.
- ``"future"`` (next events in time, HSTU-style): a random time ``tau`` inside each history
  (between two of its events, or after the last) plays the cutoff: the events before ``tau`` are
  encoded with their ``dt_cutoff`` measured to ``tau``, exactly as a training example at cutoff
  ``tau`` would be, and the summary predicts the type and category of the next event and whether
  a purchase follows within 1, 7 and 28 days of ``tau``. A horizon that reaches past the
  pretraining cutoff is censored (its outcome is unknown) and left out of the loss, so every
  target is an event before the cutoff. It reads the events' times (``build_sequences(times=True)``).

All random draws (masks, crops) come from torch's generator, so one seed gives one encoder.

Speed (CPU): batches are drawn at random, but the encoder reads each in :data:`LENGTH_GROUPS`
groups of rows of similar history length, each without its all-padding columns
(:func:`encode_by_length`), and the masked objective's last block computes the masked events'
rows only (:func:`token_states`); :func:`embed` reads rows in order of length. Batches, masks and
crops are drawn as before, so the same objective is learned (only dropout's draws differ).
``benchmarks/bench_pretrain_speed.py`` measures this against the earlier code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from ..allocator import retained_heap
from ..config import PRETRAIN_OBJECTIVES, from_dict
from ..sequences import SequenceConfig, SequenceVocab, time_edges
from ..train import TrainLoopConfig, lr_at, make_optimizer
from ..vocabulary import EVENT_CODES
from .encoder_compat import upgrade_state
from .transformer import BehaviourTransformer, TransformerConfig, collate

OBJECTIVES = PRETRAIN_OBJECTIVES  # masked, contrastive, next, future
MASK_RATE = 0.15
CROP_MIN = 0.4  # shortest contrastive view, as a fraction of the history
TEMPERATURE = 0.1
TIME_FIELD = "dt_prev"  # the time bucket the masked objective predicts
LENGTH_GROUPS = 4  # the encoder reads a batch in this many groups of rows of similar history length
FUTURE_HORIZONS = (("1d", 86_400), ("7d", 7 * 86_400), ("28d", 28 * 86_400))  # purchase-within targets, seconds


def token_states(net: BehaviourTransformer, batch: dict[str, torch.Tensor],
                 rows: Optional[torch.Tensor] = None, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token states after all blocks: :meth:`BehaviourTransformer.encode` without its [CLS]-only
    last block (the same modules and weights).

    Every token's, (B, T, D); or, with ``rows`` (B, T) bool, those of the ``rows`` tokens only,
    (M, D) in the order of ``states[rows]``: the last block then computes its queries, attention
    output and MLP for these tokens alone (keys and values for all), as ``encode`` does for [CLS].
    ``emb`` (B, T, D), when given, replaces the summed field embeddings of the tokens.
    """
    mask = batch["mask"]  # (B, T)
    B, T = mask.shape
    emb = net.embed(batch["tokens"].long()) if emb is None else emb  # (B, T, D)
    rank = torch.arange(T - 1, -1, -1, device=mask.device)
    x = torch.cat([net.cls.expand(B, 1, -1).to(emb.dtype), emb + net.pos(rank)], dim=1)  # (B, 1+T, D)
    x = net.drop(x)
    keep = torch.cat([mask.new_ones(B, 1), mask], dim=1)[:, None, None, :]  # (B, 1, 1, 1+T)
    blocks = list(net.blocks)
    if rows is None or not blocks:
        for block in blocks:
            x = block(x, keep)
        x = x[:, 1:]  # (B, T, D)
        return net.ln_f(x if rows is None else x[rows])
    for block in blocks[:-1]:
        x = block(x, keep)
    return net.ln_f(_block_rows(blocks[-1], x, keep, rows))  # (M, D)


def _block_rows(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """:class:`~purchase_intent.models.transformer.Block` over x (B, 1+T, D) for the tokens ``rows``
    (B, T) bool only (column 0 of x is [CLS]): their output states, (M, D) in row-major order."""
    B, T1, D = x.shape
    count = rows.sum(dim=1)  # (B,)
    Q = max(1, int(count.max()))  # query slots per row; a row's first count[b] are its tokens
    cols = torch.argsort((~rows).to(torch.uint8), dim=1, stable=True)[:, :Q] + 1  # (B, Q): columns of x
    valid = torch.arange(Q, device=x.device)[None, :] < count[:, None]  # (B, Q)
    at = cols[:, :, None].expand(-1, -1, D)  # (B, Q, D)
    h = block.ln1(x)  # (B, 1+T, D)
    q = F.linear(torch.gather(h, 1, at), block.qkv.weight[:D], block.qkv.bias[:D])  # (B, Q, D)
    k, v = F.linear(h, block.qkv.weight[D:], block.qkv.bias[D:]).split(D, dim=2)  # 2 x (B, 1+T, D)
    nh = block.n_heads
    hs = D // nh
    y = F.scaled_dot_product_attention(q.view(B, Q, nh, hs).transpose(1, 2), k.view(B, T1, nh, hs).transpose(1, 2),
                                       v.view(B, T1, nh, hs).transpose(1, 2), attn_mask=attn_mask,
                                       dropout_p=block.attn_dropout if block.training else 0.0)  # (B, nh, Q, hs)
    y = y.transpose(1, 2).reshape(B, Q, D)[valid]  # (M, D)
    out = torch.gather(x, 1, at)[valid] + block.drop(block.proj(y))  # (M, D)
    return out + block.drop(block.fc_out(F.gelu(block.fc(block.ln2(out)))))


def crop(batch: dict[str, torch.Tensor], start: torch.Tensor, length: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sub-sequences of a right-aligned batch, right-aligned again, of width ``length.max()``.

    ``start`` (B,) is the column of each crop's oldest event, ``length`` (B,) its number of events
    (>= 1); columns left of a crop are padding. The columns that would be padding in every row are
    left out (as :func:`collate` does): the recency rank of a column counts from the right, so the
    encoder gives the same summary, for fewer tokens.
    """
    tokens, mask = batch["tokens"], batch["mask"]  # (B, T, nf), (B, T)
    W = max(1, int(length.max()))  # width of the crops
    col = torch.arange(W, device=mask.device)[None, :]  # (1, W)
    src = start[:, None] + length[:, None] - W + col  # (B, W): source column of each target column
    keep = col >= (W - length[:, None])  # (B, W)
    src = src.clamp(0, mask.shape[1] - 1)
    tok = torch.gather(tokens, 1, src[:, :, None].expand(-1, -1, tokens.shape[2])) * keep[:, :, None]
    return {"tokens": tok, "mask": keep & torch.gather(mask, 1, src)}


def length_groups(mask: torch.Tensor, k: int) -> list:
    """The rows of a batch with right-aligned ``mask`` (B, T) in ``k`` groups of similar history
    length (index tensors, shortest histories first); ``k <= 1``: one group, every row in order."""
    if k <= 1:
        return [slice(None)]
    order = torch.argsort(mask.sum(dim=1), stable=True)
    return [g for g in order.chunk(k) if len(g)]


def trimmed(batch: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of every (B, T, ...) tensor of a right-aligned batch, without the columns that
    are padding in all of them (the recency rank counts from the right: summaries do not change)."""
    mask = batch["mask"][rows]
    T = mask.shape[1]
    W = max(1, int(mask.sum(dim=1).max())) if len(mask) else 1
    return {k: v[rows][:, T - W:] for k, v in batch.items()}


def encode_by_length(net: BehaviourTransformer, batch: dict[str, torch.Tensor], k: int = LENGTH_GROUPS) -> torch.Tensor:
    """:meth:`BehaviourTransformer.encode` of a batch read in ``k`` groups of similar history length
    (:func:`length_groups`), each without its all-padding columns: the same (B, D) summaries in the
    batch's row order, for fewer tokens (dropout draws differ, their distribution does not)."""
    if k <= 1:
        return net.encode(batch)
    groups = length_groups(batch["mask"], k)
    z = torch.cat([net.encode(trimmed(batch, g)) for g in groups])  # (B, D) in group order
    return z[torch.argsort(torch.cat(groups))]


def history_span(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of events (B,) and the column of the oldest one (B,) of a right-aligned mask."""
    n = mask.sum(dim=1)
    return n, mask.shape[1] - n


class MaskedEventObjective(nn.Module):
    """Mask whole events; predict their event type, category bucket and time bucket.

    The masks are drawn for the whole batch, then the encoder reads it in groups of similar length
    (:func:`length_groups`), the last block for the masked events only (:func:`token_states`).
    ``forward(batch)`` averages the loss over the batch's masked events; ``forward(batch, norm)``
    divides their sum by ``norm`` instead, the mean number of masked events of a batch
    (:meth:`expected_targets`): with length-bucketed batches (:func:`length_batches`) the per-batch
    mean would weigh an event of a batch of short histories more than one of long histories, where
    the sum over a constant gives every event the weight it has in random batches.
    """

    def __init__(self, net: BehaviourTransformer):
        super().__init__()
        self.net = net
        self.groups = LENGTH_GROUPS  # encoder passes per batch (encode_by_length); 1 = the whole batch at once
        self.targets, self.index, self.heads = _field_heads(net, ("event", "category", TIME_FIELD), "masked")

    @staticmethod
    def expected_targets(lengths: np.ndarray, batch_size: int) -> float:
        """Mean number of masked events in a batch of ``batch_size`` rows with events ``lengths``."""
        return MASK_RATE * batch_size * float(np.mean(lengths))

    def forward(self, batch: dict[str, torch.Tensor], norm: Optional[float] = None) -> torch.Tensor:
        mask = batch["mask"]
        chosen = (torch.rand(mask.shape, device=mask.device) < MASK_RATE) & mask  # (B, T)
        if not bool(chosen.any()):  # at least one masked event per batch
            chosen = mask & (torch.arange(mask.shape[1], device=mask.device) == mask.shape[1] - 1)
        tokens = batch["tokens"].masked_fill(chosen[:, :, None], 0)
        full = {"tokens": tokens, "mask": mask, "chosen": chosen, "target": batch["tokens"]}
        h, target = [], []
        for rows in length_groups(mask, self.groups):  # the loss is a mean over events: order is free
            g = trimmed(full, rows)
            if bool(g["chosen"].any()):
                h.append(token_states(self.net, g, rows=g["chosen"]))  # (M_g, D)
                target.append(g["target"][g["chosen"]])  # (M_g, nf)
        return _head_loss(self.heads, self.targets, self.index, torch.cat(h), torch.cat(target), norm)


class ContrastiveObjective(nn.Module):
    """Two random sub-sequences of one user are a positive pair; other users are negatives."""

    def __init__(self, net: BehaviourTransformer):
        super().__init__()
        self.net = net
        self.groups = LENGTH_GROUPS  # encoder passes per batch (encode_by_length); 1 = the whole batch at once
        D = net.cfg.d_model
        self.proj = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))

    def view(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n, first = history_span(batch["mask"])
        lo = torch.clamp(torch.ceil(n * CROP_MIN), min=1)
        length = (lo + torch.floor(torch.rand(n.shape, device=n.device) * (n - lo + 1))).long().clamp(min=1)
        start = first + torch.floor(torch.rand(n.shape, device=n.device) * (n - length + 1)).long()
        z = encode_by_length(self.net, crop(batch, start, length), self.groups)
        return F.normalize(self.proj(z).float(), dim=1)  # (B, D)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = self.view(batch), self.view(batch)
        logits = a @ b.t() / TEMPERATURE  # (B, B): the diagonal holds the positive pairs
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class NextEventObjective(nn.Module):
    """Encode a random prefix; predict the next event's type and category bucket.

    ``forward(batch, norm)`` divides the summed loss of the rows with at least two events by
    ``norm`` (:meth:`expected_targets`) instead of averaging it over them; see
    :class:`MaskedEventObjective`.
    """

    def __init__(self, net: BehaviourTransformer):
        super().__init__()
        self.net = net
        self.groups = LENGTH_GROUPS  # encoder passes per batch (encode_by_length); 1 = the whole batch at once
        self.targets, self.index, self.heads = _field_heads(net, ("event", "category"), "next-event")

    @staticmethod
    def expected_targets(lengths: np.ndarray, batch_size: int) -> float:
        """Mean number of rows with a next event to predict in a batch of ``batch_size`` rows."""
        return batch_size * float(np.mean(np.asarray(lengths) >= 2))

    def forward(self, batch: dict[str, torch.Tensor], norm: Optional[float] = None) -> torch.Tensor:
        n, first = history_span(batch["mask"])
        ok = n >= 2  # one event to read and one to predict
        if not bool(ok.any()):
            return sum(p.sum() * 0.0 for p in self.parameters())
        batch = {"tokens": batch["tokens"][ok], "mask": batch["mask"][ok]}
        n, first = n[ok], first[ok]
        length = 1 + torch.floor(torch.rand(n.shape, device=n.device) * (n - 1)).long()  # 1 .. n-1
        h = encode_by_length(self.net, crop(batch, first, length), self.groups)  # (B', D)
        target = torch.gather(batch["tokens"], 1, (first + length)[:, None, None].expand(
            -1, 1, batch["tokens"].shape[2]))[:, 0]  # (B', nf): the event after the prefix
        return _head_loss(self.heads, self.targets, self.index, h, target, norm)


class FutureEventsObjective(nn.Module):
    """At a random time ``tau`` inside each history: encode the events before it as an example with
    cutoff ``tau``; predict the next event and whether a purchase follows within each of
    :data:`FUTURE_HORIZONS` (BCE, censored horizons left out) of ``tau``.

    ``tau`` is drawn uniformly between a random event ``p`` (uniform over the history) and the one
    after it (the pretraining cutoff after the last), so histories end where examples' do: some
    time after their last event. ``forward(batch, norm)`` divides the summed losses by ``norm``
    instead of averaging them (see :class:`MaskedEventObjective`).
    """

    def __init__(self, net: BehaviourTransformer, edges: Optional[np.ndarray] = None):
        super().__init__()
        self.net = net
        self.groups = LENGTH_GROUPS  # encoder passes per batch (encode_by_length); 1 = the whole batch at once
        if "event" not in net.fields:
            raise ValueError("the future objective needs the event field")
        self.targets, self.index, self.heads = _field_heads(net, ("event", "category"), "future")
        self.event_col = net.fields.index("event")
        self.dt_col = net.fields.index("dt_cutoff") if "dt_cutoff" in net.fields else None
        edges = time_edges(SequenceConfig()) if edges is None else np.asarray(edges, dtype=np.float64)
        self.register_buffer("edges", torch.as_tensor(edges, dtype=torch.float64), persistent=False)
        self.register_buffer("horizons_us", torch.tensor([h * 1_000_000 for _, h in FUTURE_HORIZONS]),
                             persistent=False)
        D = net.cfg.d_model
        self.future = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, len(FUTURE_HORIZONS)))

    @staticmethod
    def expected_targets(lengths: np.ndarray, batch_size: int) -> float:
        """Rows of a batch of ``batch_size`` rows (each one a prefix to encode)."""
        return float(batch_size)

    def draw(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The random cutoffs of a batch: ``c_tau`` (B,) in microseconds before the pretraining
        cutoff, the prefix (events before ``tau``) and the targets."""
        if "us_cut" not in batch:
            raise ValueError("the future objective needs the events' times: build_sequences(..., times=True)")
        mask, us = batch["mask"], batch["us_cut"]  # (B, T), (B, T): larger = older
        B, T = mask.shape
        n, first = history_span(mask)
        p = torch.minimum(1 + torch.floor(torch.rand(B, device=mask.device) * n).long(), n).clamp(min=1)
        col = (first + p - 1).clamp(0, T - 1)  # column of event p
        c_p = us.gather(1, col[:, None])[:, 0]
        c_next = torch.where(p < n, us.gather(1, (col + 1).clamp(max=T - 1)[:, None])[:, 0], torch.zeros_like(c_p))
        u = 1.0 - torch.rand(B, device=mask.device, dtype=torch.float64)  # (0, 1]
        c_tau = (c_p.double() - u * (c_p - c_next).double()).floor().long()
        before = mask & (us > c_tau[:, None])  # events strictly before tau: a right-open prefix
        after = mask & ~before
        length = before.sum(dim=1)
        is_buy = batch["tokens"][:, :, self.event_col] == EVENT_CODES["purchase"]
        within = after[:, :, None] & is_buy[:, :, None] & (us[:, :, None] > (c_tau[:, None, None] - self.horizons_us))
        y = within.any(dim=1).float()  # (B, H)
        # tau + h before the cutoff; a purchase seen inside a censored horizon does not make it known
        # (censoring must not depend on the outcome)
        known = (c_tau[:, None] >= self.horizons_us[None, :]).expand(B, -1)
        return {"first": first, "length": length, "before": before, "c_tau": c_tau, "y": y, "known": known,
                "next_col": (first + length).clamp(max=T - 1), "has_next": length < n}

    def prefix_tokens(self, batch: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's tokens with the prefix events' ``dt_cutoff`` measured to ``tau``, as an
        example's are to its cutoff (the bucket ``build_sequences`` gives)."""
        tokens = batch["tokens"]
        if self.dt_col is None:
            return tokens
        secs = (batch["us_cut"] - d["c_tau"][:, None]).double() / 1e6
        bucket = 1 + torch.bucketize(secs, self.edges, right=True)
        tokens = tokens.clone()
        tokens[:, :, self.dt_col] = torch.where(d["before"], bucket.to(tokens.dtype), tokens[:, :, self.dt_col])
        return tokens

    def forward(self, batch: dict[str, torch.Tensor], norm: Optional[float] = None) -> torch.Tensor:
        d = self.draw(batch)
        ok = d["length"] >= 1
        if not bool(ok.any()):
            return sum(p.sum() * 0.0 for p in self.parameters())
        tokens = self.prefix_tokens(batch, d)
        sub = {"tokens": tokens[ok], "mask": batch["mask"][ok]}
        h = encode_by_length(self.net, crop(sub, d["first"][ok], d["length"][ok]), self.groups)  # (B', D)
        logits = self.future(h).float()  # (B', H)
        known = d["known"][ok]
        bce = F.binary_cross_entropy_with_logits(logits, d["y"][ok], reduction="none")[known].sum()
        has_next = d["has_next"][ok]
        nxt = torch.gather(batch["tokens"][ok], 1, d["next_col"][ok][:, None, None].expand(
            -1, 1, tokens.shape[2]))[:, 0]  # (B', nf): the first event at or after tau
        ce = _head_loss(self.heads, self.targets, self.index, h[has_next], nxt[has_next], 1.0) if bool(
            has_next.any()) else h.sum() * 0.0
        if norm is None:  # means: BCE over the known (row, horizon) pairs, CE over rows with a next event
            return bce / max(int(known.sum()), 1) + ce / max(int(has_next.sum()), 1)
        return (bce / len(FUTURE_HORIZONS) + ce) / norm


def _field_heads(net: BehaviourTransformer, wanted: tuple, objective: str) -> tuple[list, list, nn.ModuleDict]:
    """The fields of ``wanted`` the encoder has, their column in the tokens, and one classifier head
    per field (D -> its vocabulary), for :func:`_head_loss`."""
    D, sizes = net.cfg.d_model, net.cfg.field_sizes
    targets = [f for f in wanted if f in sizes]
    if not targets:
        raise ValueError(f"the {objective} objective needs one of the fields {', '.join(wanted)}")
    heads = nn.ModuleDict({f: nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, int(sizes[f])))
                           for f in targets})
    return targets, [net.fields.index(f) for f in targets], heads


def _head_loss(heads: nn.ModuleDict, targets: list, index: list, h: torch.Tensor, target: torch.Tensor,
               norm: Optional[float]) -> torch.Tensor:
    """Cross-entropy of each head's prediction from ``h`` (M, D) of its field of ``target`` (M, nf),
    averaged over the heads; over the M rows a mean (``norm`` None) or the sum divided by ``norm``."""
    how = "mean" if norm is None else "sum"
    loss = sum(F.cross_entropy(heads[f](h).float(), target[:, i].long(), reduction=how) for f, i in zip(targets, index))
    return loss / len(targets) if norm is None else loss / (len(targets) * norm)


def make_objective(name: str, net: BehaviourTransformer, edges: Optional[np.ndarray] = None) -> nn.Module:
    """The objective ``name`` (masked, contrastive, next, future) over encoder ``net``; ``edges``:
    the sequences' time-bucket edges (``sequences.time_edges``), which ``future`` re-buckets with."""
    if name == "masked":
        return MaskedEventObjective(net)
    if name == "contrastive":
        return ContrastiveObjective(net)
    if name == "next":
        return NextEventObjective(net)
    if name == "future":
        return FutureEventsObjective(net, edges)
    raise ValueError(f"unknown pretraining objective {name!r}: choose one of {', '.join(OBJECTIVES)}")


BUCKET_CHUNK = 50  # batches per length-sorted chunk of :func:`length_batches`


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   chunk: int = BUCKET_CHUNK) -> list[np.ndarray]:
    """One epoch's batches of rows of similar history length, from ``rng`` alone.

    The rows are shuffled; the first ``len(lengths) // batch_size`` full batches' worth of them
    (the rest wait for another epoch, as with random batches) are cut into chunks of ``chunk``
    batches, each chunk sorted by length (ties stay shuffled) and cut into batches, and the batches
    are shuffled. Every batch is a uniform draw from a chunk's rows of one length range, so a batch
    of the epoch, drawn at random, holds each row with the probability random batches give it;
    :func:`~purchase_intent.models.transformer.collate` then trims the columns that are padding in
    every row of a batch, which similar lengths make most of them. Each batch's rows are sorted.
    """
    lengths = np.asarray(lengths)
    bs = int(batch_size)
    order = rng.permutation(len(lengths))[: (len(lengths) // bs) * bs]
    span = max(1, int(chunk)) * bs
    batches = []
    for lo in range(0, len(order), span):
        part = order[lo:lo + span]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [np.sort(part[i:i + bs]) for i in range(0, len(part), bs)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class PretrainResult:
    steps: int = 0
    sequences: int = 0
    seconds: float = 0.0
    history: list = None  # mean loss per epoch
    tokens: int = 0  # rows x columns of the collated batches (padding included)
    bucketed: bool = False  # batches of similar history length (length_batches)

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / max(self.seconds, 1e-9)


def pretrain_encoder(objective: nn.Module, data: dict[str, np.ndarray], cfg: TrainLoopConfig,
                     log: Optional[Callable[[str], None]] = None, bucket: bool = False,
                     num_threads: Optional[int] = None) -> PretrainResult:
    """Train ``objective`` (and its encoder) on every row of ``data`` for ``cfg.max_epochs`` epochs.

    ``data`` holds the encoder's token fields (in its field order) and ``"mask"``; rows without
    events are left out. AdamW and the warmup + cosine schedule of :mod:`~purchase_intent.train`;
    batch order, masks and crops follow ``cfg.seed``. CPU only (pretraining on CUDA is not wired).

    Each batch is a uniform draw of rows; the objectives read it in groups of similar history
    length (:func:`encode_by_length`), which leaves out most padding and learns the same thing
    (simulator, tiny encoder, window 50, 4 epochs, seeds 0-2, held-out loss in 4 groups against the
    whole batch at once: masked 2.3253 / 2.3466 / 2.3526 against 2.3235 / 2.3461 / 2.3509, next
    2.011 / 2.011 / 2.056 against 1.994 / 2.012 / 2.057).
    ``bucket=True`` draws batches of similar length instead (:func:`length_batches`), the loss then
    the sum over the batch divided by the mean number of targets per batch (``expected_targets``,
    masked and next), so that each event weighs what it weighs in random batches: the same
    objective in expectation, fewer padded tokens again, but a noisier gradient (measured on the
    simulator, tiny encoder, window 50, 4 epochs, 3 seeds: held-out masked loss 2.40-2.46 against
    2.32-2.35 with random batches). With contrastive, bucketed in-batch negatives share a length.

    ``num_threads``: torch's intra-op threads while it runs (None = leave them as they are). Float
    sums, hence the weights, depend on the thread count. Freed memory is kept for reuse meanwhile
    (:func:`~purchase_intent.allocator.retained_heap`).
    """
    keep = np.flatnonzero(np.asarray(data["mask"]).any(axis=1))
    if len(keep) < 2:
        raise ValueError(f"pretraining needs at least 2 sequences with events, got {len(keep)}")
    data = {k: np.asarray(v)[keep] for k, v in data.items()}
    n = len(keep)
    lengths = data["mask"].sum(axis=1)
    bs = min(int(cfg.batch_size), n)
    steps_per_epoch = max(1, n // bs)  # full batches only: in-batch negatives need a batch
    total = max(1, cfg.max_epochs * steps_per_epoch)
    bucket = bool(bucket)
    norm = objective.expected_targets(lengths, bs) if bucket and hasattr(objective, "expected_targets") else None
    opt = make_optimizer(objective, cfg)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    res = PretrainResult(history=[], bucketed=bucket)
    objective.train()
    with threads(num_threads), retained_heap():
        t0 = time.perf_counter()
        for epoch in range(cfg.max_epochs):
            if bucket:
                batches = length_batches(lengths, bs, rng)
            else:
                order = rng.permutation(n)
                batches = [np.sort(order[s * bs:(s + 1) * bs]) for s in range(steps_per_epoch)]
            loss_sum = 0.0
            for idx in batches:
                batch = collate(data, idx)
                for g in opt.param_groups:
                    g["lr"] = lr_at(res.steps, total, cfg)
                loss = objective(batch) if norm is None else objective(batch, norm=norm)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                res.steps += 1
                res.sequences += bs
                res.tokens += batch["mask"].numel()
                loss_sum += float(loss.detach())
            res.history.append(loss_sum / steps_per_epoch)
            if log is not None:
                log(f"pretrain epoch {epoch}: loss {res.history[-1]:.4f}")
            if not math.isfinite(res.history[-1]):
                raise RuntimeError(f"pretraining diverged in epoch {epoch} (loss {res.history[-1]}): lower the lr")
        res.seconds = time.perf_counter() - t0
    objective.eval()
    return res


@contextlib.contextmanager
def threads(n: Optional[int]):
    """torch's intra-op thread count set to ``n`` inside the block (None: unchanged), then restored."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encoder_inputs(cfg: TransformerConfig, X: dict, rows=slice(None), where: str = "the encoder"
                   ) -> dict[str, np.ndarray]:
    """What an encoder of config ``cfg`` reads of a sequence model's inputs ``X`` (rows ``rows``): its
    fields and ``mask``, cut to its window (the last ``max_seq_len`` columns), ids it never saw
    clipped to the last row of their field. ValueError naming ``where`` when ``X`` lacks a field."""
    L = cfg.max_seq_len
    data = {}
    for f, size in cfg.field_sizes.items():
        if f not in X:
            raise ValueError(f"{where} was pretrained on the fields {sorted(cfg.field_sizes)} but X lacks {f!r}")
        a = np.asarray(X[f])[rows, -L:]
        data[f] = np.minimum(a, size - 1) if a.max(initial=0) >= size else a  # unseen -> last row
    data["mask"] = np.asarray(X["mask"])[rows, -L:]
    return data


EMBED_BATCH = 256  # rows per encoder call of embed(), on any number of threads


@torch.inference_mode()
def embed(net: BehaviourTransformer, data: dict[str, np.ndarray], batch_size: Optional[int] = None,
          sort: bool = True, num_threads: Optional[int] = None) -> np.ndarray:
    """The encoder's summary of every row of ``data`` (fields in the encoder's order + ``"mask"``), (N, D).

    ``sort``: embed the rows in order of history length (the summary of a row does not depend on
    its batch) so that :func:`~purchase_intent.models.transformer.collate` trims most padding
    columns, and return them in ``data``'s order. ``num_threads``: as in :func:`pretrain_encoder`.
    ``batch_size`` None: :data:`EMBED_BATCH` rows, whose activations stay in the CPU's caches. On a
    quiet 2-core machine (tiny encoder, length-sorted) 256-row batches embedded more users per
    second than 2048-row ones on two threads as on one (BENCHMARKS.md, "Pretraining at 10M events
    through the command, and embedding batches"); 2048 rows on two threads had been chosen under
    other processes' load, where an operator waits for the thread of its team kept off its core.
    """
    was = net.training
    net.eval()
    n = len(data["mask"])
    out = np.empty((n, net.cfg.d_model), dtype=np.float32)
    order = np.argsort(np.asarray(data["mask"]).sum(axis=1), kind="stable") if sort else np.arange(n)
    with threads(num_threads), retained_heap():
        bs = int(batch_size or EMBED_BATCH)
        for lo in range(0, n, bs):
            idx = order[lo:lo + bs]
            out[idx] = net.encode(collate(data, idx)).float().numpy()
    net.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# the encoder folder: model.safetensors (the encoder's weights) + config.json (no pickle)
ENCODER_WEIGHTS = "model.safetensors"
ENCODER_CONFIG = "config.json"
ENCODER_KIND = "purchase_intent.pretrained_encoder"


def encoder_files(net: BehaviourTransformer, meta: dict) -> dict[str, bytes]:
    """The files of an encoder folder: name -> bytes (``meta`` gains ``kind`` and ``transformer``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"kind": ENCODER_KIND, **meta, "transformer": dataclasses.asdict(net.cfg)}
    return {ENCODER_WEIGHTS: save_tensors(state), ENCODER_CONFIG: json.dumps(meta, indent=2).encode()}


def load_encoder(directory: str | Path | None) -> tuple[BehaviourTransformer, dict]:
    """The encoder of a folder written by ``purchase-intent pretrain`` and its config.json, in eval mode."""
    if directory is None:
        raise FileNotFoundError("no pretrained encoder given (param encoder): run `purchase-intent pretrain` first")
    d = Path(directory)
    if not (d / ENCODER_CONFIG).exists() or not (d / ENCODER_WEIGHTS).exists():
        raise FileNotFoundError(f"no pretrained encoder in {d}: run `purchase-intent pretrain` first")
    meta = json.loads((d / ENCODER_CONFIG).read_text())
    if meta.get("kind") != ENCODER_KIND:
        raise ValueError(f"{d / ENCODER_CONFIG} is not a pretrained encoder's config")
    state = load_file(str(d / ENCODER_WEIGHTS))
    cfg, state, note = upgrade_state(from_dict(TransformerConfig, meta["transformer"]), state,
                                     SequenceVocab.from_dict(meta.get("vocab", {})))
    if note:  # an encoder saved before checkout / raw_event: it computes what it computed, see encoder_compat
        print(f"the encoder {d} predates this version's token fields: {note}", file=sys.stderr)
        meta = {**meta, "transformer": dataclasses.asdict(cfg), "upgraded": note}
    net = BehaviourTransformer(cfg)
    net.load_state_dict(state)
    return net.eval(), meta


def check_compatible(enc_cfg: TransformerConfig, field_sizes: dict, d_model: Optional[int] = None,
                     where: str = "the encoder") -> None:
    """Raise ValueError naming what differs between an encoder and the inputs / model it is used with."""
    enc = dict(enc_cfg.field_sizes)
    if list(enc) != [f for f in field_sizes if f in enc] or set(enc) - set(field_sizes):
        raise ValueError(f"{where} was pretrained on the fields {sorted(enc)} but the inputs hold "
                         f"{sorted(field_sizes)}: pretrain again with these fields")
    diff = {f: (enc[f], int(field_sizes[f])) for f in enc if enc[f] != int(field_sizes[f])}
    if diff:
        raise ValueError(f"{where} has other field sizes than the inputs (encoder, inputs): {diff}: "
                         "pretrain again with this sequence config")
    if d_model is not None and int(d_model) != enc_cfg.d_model:
        raise ValueError(f"d_model={d_model} differs from {where}'s d_model={enc_cfg.d_model}")
