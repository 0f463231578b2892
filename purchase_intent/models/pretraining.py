"""Self-supervised objectives for the sequence encoder of :class:`BehaviourTransformer`, and their loop.

The encoder is a ``BehaviourTransformer`` with ``use_tabular=False``: its :meth:`encode` gives the
(B, D) summary of an event sequence that the fine-tuned classifier and ``lightgbm_emb`` read. No
label is used; each objective is an ``nn.Module`` with ``forward(batch) -> loss`` over a batch of
the classifier's ``collate`` (``"tokens"`` (B, T, n_fields), ``"mask"`` (B, T), right-aligned):

- ``"masked"`` (BERT-style): 15% of the real events have every field set to 0 (the learned
  "missing" row of each field, which acts as the mask token); the full token states of the last
  block predict the masked events' event type, category bucket and ``dt_prev`` time bucket.
- ``"contrastive"`` (CoLES-style): two random contiguous sub-sequences (40-100% of the history)
  of one user are a positive pair, the other users of the batch the negatives (symmetric InfoNCE
  on a projection of the summaries, temperature 0.1).
- ``"next"`` (next-event prediction): a random prefix of the history (at least one event, one
  event left after it) is encoded and its summary predicts the type and category bucket of the
  event that follows.

All random draws (masks, crops) come from torch's generator, so one seed gives one encoder.
"""
from __future__ import annotations

import dataclasses
import json
import math
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

from ..config import from_dict
from ..train import TrainLoopConfig, lr_at, make_optimizer
from .classifier import collate
from .transformer import BehaviourTransformer, TransformerConfig

OBJECTIVES = ("masked", "contrastive", "next")
MASK_RATE = 0.15
CROP_MIN = 0.4  # shortest contrastive view, as a fraction of the history
TEMPERATURE = 0.1
TIME_FIELD = "dt_prev"  # the time bucket the masked objective predicts


def token_states(net: BehaviourTransformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every token's state after all blocks, (B, T, D): :meth:`BehaviourTransformer.encode`
    without its [CLS]-only last block (the same modules and weights, all rows computed)."""
    mask = batch["mask"]  # (B, T)
    B, T = mask.shape
    emb = net.embed(batch["tokens"].long())  # (B, T, D)
    rank = torch.arange(T - 1, -1, -1, device=mask.device)
    x = torch.cat([net.cls.expand(B, 1, -1).to(emb.dtype), emb + net.pos(rank)], dim=1)  # (B, 1+T, D)
    x = net.drop(x)
    keep = torch.cat([mask.new_ones(B, 1), mask], dim=1)[:, None, None, :]  # (B, 1, 1, 1+T)
    for block in net.blocks:
        x = block(x, keep)
    return net.ln_f(x[:, 1:])  # (B, T, D)


def crop(batch: dict[str, torch.Tensor], start: torch.Tensor, length: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sub-sequences of a right-aligned batch, right-aligned again, same width T.

    ``start`` (B,) is the column of each crop's oldest event, ``length`` (B,) its number of events
    (>= 1); columns left of the crop become padding.
    """
    tokens, mask = batch["tokens"], batch["mask"]  # (B, T, nf), (B, T)
    B, T = mask.shape
    col = torch.arange(T, device=mask.device)[None, :]  # (1, T)
    src = start[:, None] + length[:, None] - T + col  # (B, T): source column of each target column
    keep = col >= (T - length[:, None])  # (B, T)
    src = src.clamp(0, T - 1)
    tok = torch.gather(tokens, 1, src[:, :, None].expand(-1, -1, tokens.shape[2])) * keep[:, :, None]
    return {"tokens": tok, "mask": keep & torch.gather(mask, 1, src)}


def _history(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of events (B,) and the column of the oldest one (B,) of a right-aligned mask."""
    n = mask.sum(dim=1)
    return n, mask.shape[1] - n


class MaskedEventObjective(nn.Module):
    """Mask whole events; predict their event type, category bucket and time bucket."""

    def __init__(self, net: BehaviourTransformer):
        super().__init__()
        self.net = net
        D, sizes = net.cfg.d_model, net.cfg.field_sizes
        self.targets = [f for f in ("event", "category", TIME_FIELD) if f in sizes]
        if not self.targets:
            raise ValueError("the masked objective needs one of the fields event, category, dt_prev")
        self.index = [net.fields.index(f) for f in self.targets]
        self.heads = nn.ModuleDict({f: nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D),
                                                     nn.Linear(D, int(sizes[f]))) for f in self.targets})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["mask"]
        chosen = (torch.rand(mask.shape, device=mask.device) < MASK_RATE) & mask  # (B, T)
        if not bool(chosen.any()):  # at least one masked event per batch
            chosen = mask & (torch.arange(mask.shape[1], device=mask.device) == mask.shape[1] - 1)
        tokens = batch["tokens"].masked_fill(chosen[:, :, None], 0)
        h = token_states(self.net, {"tokens": tokens, "mask": mask})[chosen]  # (M, D)
        target = batch["tokens"][chosen]  # (M, nf)
        return sum(F.cross_entropy(self.heads[f](h).float(), target[:, i].long())
                   for f, i in zip(self.targets, self.index)) / len(self.targets)


class ContrastiveObjective(nn.Module):
    """Two random sub-sequences of one user are a positive pair; other users are negatives."""

    def __init__(self, net: BehaviourTransformer):
        super().__init__()
        self.net = net
        D = net.cfg.d_model
        self.proj = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))

    def view(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n, first = _history(batch["mask"])
        lo = torch.clamp(torch.ceil(n * CROP_MIN), min=1)
        length = (lo + torch.floor(torch.rand(n.shape, device=n.device) * (n - lo + 1))).long().clamp(min=1)
        start = first + torch.floor(torch.rand(n.shape, device=n.device) * (n - length + 1)).long()
        return F.normalize(self.proj(self.net.encode(crop(batch, start, length))).float(), dim=1)  # (B, D)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = self.view(batch), self.view(batch)
        logits = a @ b.t() / TEMPERATURE  # (B, B): the diagonal holds the positive pairs
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class NextEventObjective(nn.Module):
    """Encode a random prefix; predict the next event's type and category bucket."""

    def __init__(self, net: BehaviourTransformer):
        super().__init__()
        self.net = net
        D, sizes = net.cfg.d_model, net.cfg.field_sizes
        self.targets = [f for f in ("event", "category") if f in sizes]
        if not self.targets:
            raise ValueError("the next-event objective needs the field event or category")
        self.index = [net.fields.index(f) for f in self.targets]
        self.heads = nn.ModuleDict({f: nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D),
                                                     nn.Linear(D, int(sizes[f]))) for f in self.targets})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n, first = _history(batch["mask"])
        ok = n >= 2  # one event to read and one to predict
        if not bool(ok.any()):
            return sum(p.sum() * 0.0 for p in self.parameters())
        batch = {"tokens": batch["tokens"][ok], "mask": batch["mask"][ok]}
        n, first = n[ok], first[ok]
        length = 1 + torch.floor(torch.rand(n.shape, device=n.device) * (n - 1)).long()  # 1 .. n-1
        h = self.net.encode(crop(batch, first, length))  # (B', D)
        target = torch.gather(batch["tokens"], 1, (first + length)[:, None, None].expand(
            -1, 1, batch["tokens"].shape[2]))[:, 0]  # (B', nf): the event after the prefix
        return sum(F.cross_entropy(self.heads[f](h).float(), target[:, i].long())
                   for f, i in zip(self.targets, self.index)) / len(self.targets)


def make_objective(name: str, net: BehaviourTransformer) -> nn.Module:
    """The objective ``name`` (masked, contrastive, next) over encoder ``net``."""
    if name == "masked":
        return MaskedEventObjective(net)
    if name == "contrastive":
        return ContrastiveObjective(net)
    if name == "next":
        return NextEventObjective(net)
    raise ValueError(f"unknown pretraining objective {name!r}: choose one of {', '.join(OBJECTIVES)}")


@dataclass
class PretrainResult:
    steps: int = 0
    sequences: int = 0
    seconds: float = 0.0
    history: list = None  # mean loss per epoch

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / max(self.seconds, 1e-9)


def pretrain_encoder(objective: nn.Module, data: dict[str, np.ndarray], cfg: TrainLoopConfig,
                     log: Optional[Callable[[str], None]] = None) -> PretrainResult:
    """Train ``objective`` (and its encoder) on every row of ``data`` for ``cfg.max_epochs`` epochs.

    ``data`` holds the encoder's token fields (in its field order) and ``"mask"``; rows without
    events are left out. AdamW and the warmup + cosine schedule of :mod:`~purchase_intent.train`;
    batch order, masks and crops follow ``cfg.seed``. CPU only (pretraining on CUDA is not wired).
    """
    keep = np.flatnonzero(np.asarray(data["mask"]).any(axis=1))
    if len(keep) < 2:
        raise ValueError(f"pretraining needs at least 2 sequences with events, got {len(keep)}")
    data = {k: np.asarray(v)[keep] for k, v in data.items()}
    n = len(keep)
    bs = min(int(cfg.batch_size), n)
    steps_per_epoch = max(1, n // bs)  # full batches only: in-batch negatives need a batch
    total = max(1, cfg.max_epochs * steps_per_epoch)
    opt = make_optimizer(objective, cfg)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    res = PretrainResult(history=[])
    objective.train()
    t0 = time.perf_counter()
    for epoch in range(cfg.max_epochs):
        order = rng.permutation(n)
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            batch = collate(data, np.sort(order[s * bs:(s + 1) * bs]))
            for g in opt.param_groups:
                g["lr"] = lr_at(res.steps, total, cfg)
            loss = objective(batch)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            res.steps += 1
            res.sequences += bs
            loss_sum += float(loss.detach())
        res.history.append(loss_sum / steps_per_epoch)
        if log is not None:
            log(f"pretrain epoch {epoch}: loss {res.history[-1]:.4f}")
        if not math.isfinite(res.history[-1]):
            raise RuntimeError(f"pretraining diverged in epoch {epoch} (loss {res.history[-1]}): lower the lr")
    res.seconds = time.perf_counter() - t0
    objective.eval()
    return res


@torch.inference_mode()
def embed(net: BehaviourTransformer, data: dict[str, np.ndarray], batch_size: int = 2048) -> np.ndarray:
    """The encoder's summary of every row of ``data`` (fields in the encoder's order + ``"mask"``), (N, D)."""
    was = net.training
    net.eval()
    n = len(data["mask"])
    out = np.empty((n, net.cfg.d_model), dtype=np.float32)
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(n, lo + batch_size))
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
    net = BehaviourTransformer(from_dict(TransformerConfig, meta["transformer"]))
    net.load_state_dict(load_file(str(d / ENCODER_WEIGHTS)))
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
