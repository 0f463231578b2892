"""The behaviour-sequence Transformer: one logit of purchase intent per example.

A plain ``nn.Module`` that knows nothing about data loading or training. Shape legend:

    B  batch (examples)            T  events per example (right-aligned, padding on the left)
    F  tabular features            D  d_model
    nh attention heads             hs head size = D // nh

Input ``batch`` is a dict of tensors: one (B, T) int tensor per sequence field (0 = padding),
``"mask"`` (B, T) bool (True = real event) and ``"tabular"`` (B, F) float (standardised).
Tokens are the sum of their field embeddings (one concatenated table, one ``embedding_bag``
call; row 0 of each field is a learned "missing/padding" row) plus a learned embedding of the
recency rank (``T - 1 - column``: the rank does not depend on how much padding a batch carries).
A learned [CLS] vector is prepended; after pre-norm blocks its output summarises the sequence.
Only the [CLS] output is read, so the last block computes its query, attention and MLP for the
[CLS] row alone (keys and values for all tokens): the same result as a full block at a fraction
of the cost. With ``pooling="cls+max"`` (default) the summary also adds a masked max-pool of the
token states entering the last block: one strong token (a view of an item carted days ago) then
reaches the head directly instead of through one softmax-averaged [CLS] query, which with few
heads dilutes a rare token among many ordinary ones (measured on the simulator, BENCHMARKS.md).
The tabular vector enters through a small MLP ("deep") and a linear term added to the logit
("wide"). The batch may carry ``"tokens"`` (B, T, n_fields) instead of one tensor per
field (the classifier's collate does: one int64 conversion per batch).

Speed (CPU, measured in ``benchmarks/bench_transformer.py``): training computes the embedding
gradient with one ``index_add_`` per field instead of ``embedding_bag``'s sorting backward, and
dropout draws 16-bit masks (numpy's generator on CPU) instead of float Bernoulli samples; the
eval forward is plain ops.

:class:`SeedEnsemble` holds several such networks of one config, trained from different seeds,
and answers with the mean of their logits (``TransformerClassifier(n_seeds=k)``).

Print the presets' sizes with ``python -m purchase_intent.models.transformer``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sequences import SequenceVocab


@dataclass
class TransformerConfig:
    """Architecture of :class:`BehaviourTransformer` (saved with every run)."""

    field_sizes: dict = field(default_factory=dict)  # sequence field -> embedding rows (incl. 0 = pad)
    n_tabular: int = 0  # width F of the tabular feature vector
    max_seq_len: int = 200  # rows of the recency-rank embedding
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4  # hidden width of the block MLP = mlp_ratio * d_model
    dropout: float = 0.1  # on embeddings, residual branches and the heads
    attn_dropout: float = 0.0  # on attention weights; > 0 forces the unfused attention path on CPU
    tabular_hidden: int = 64  # width of the tabular MLP
    # > 0: the tabular MLP also reads each feature's piecewise-linear encoding over this many bins (edges:
    # quantiles of the train split, the buffer tab_edges); 0: the standardised values only
    tabular_bins: int = 0
    use_sequence: bool = True  # ablation switches: sequence only / features only / both
    use_tabular: bool = True
    wide: bool = True  # add a linear term of the tabular features to the logit
    pooling: str = "cls+max"  # sequence summary: "cls" ([CLS] output) or "cls+max" (+ masked max-pool of tokens)
    pos_weight: Optional[float] = None  # BCE weight of positives (rare buyers); None = 1


# Heads of 32 or more dimensions: attention with 16-dimensional heads pays one softmax exp per
# score for only 32 FLOPs of QK^T, and on CPU `small` with 4 heads scored 5-30% fewer examples/s
# than with 2 (BENCHMARKS.md, "speed").
PRESETS = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=1, mlp_ratio=2, tabular_hidden=32),
    "small": dict(d_model=64, n_layers=2, n_heads=2, mlp_ratio=4, tabular_hidden=64),
    "base": dict(d_model=128, n_layers=4, n_heads=4, mlp_ratio=4, tabular_hidden=128),
}


def preset(name: str, **overrides) -> TransformerConfig:
    """``TransformerConfig`` of preset ``name`` (tiny, small, base) with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})


class Dropout(nn.Module):
    """``nn.Dropout`` with a cheaper mask: 16 random bits per element instead of a float draw.

    An element is kept when its 16-bit random integer clears a threshold, so it is zeroed with
    probability ``round(p * 2**16) / 2**16``: p to within 8e-6. On CPU the bits come from numpy's
    SFC64 generator seeded by one draw of torch's generator (so ``torch.manual_seed`` and the
    training checkpoints still govern them): 2 ms for a (256, 201, 64) mask where torch's serial
    ``random_`` takes 14 ms and its float Bernoulli draw more. Identity in eval mode.
    """

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0.0
        if torch.compiler.is_compiling():  # the int16 view below is an alias compiled graphs reject
            return F.dropout(x, self.p, training=True)
        threshold = min(round(self.p * 2 ** 16) - 2 ** 15, 2 ** 15 - 1)  # drop the int16 values below it
        keep = _random_int16(x.numel(), x.device) >= threshold  # (n,): uniform int16
        scale = 1.0 / (1.0 - self.p)
        if x.dtype != torch.float32:  # bf16 / fp16 would round the scale itself (1.109 for 1/0.9)
            return x * keep.view(x.shape).to(x.dtype) * scale
        return x * keep.view(x.shape).to(x.dtype).mul_(scale)  # like x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _random_int16(n: int, device: torch.device) -> torch.Tensor:
    """(n,) uniform int16 on `device`, drawn under torch's seed."""
    if device.type != "cpu":
        bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_(-2 ** 31, 2 ** 31 - 1)
        return bits.view(torch.int16)[:n]  # two 16-bit halves per 32-bit draw
    seed = int(torch.randint(0, 2 ** 62, (1,)))  # one draw of torch's generator seeds numpy's
    words = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw((n + 3) // 4)  # uint64
    return torch.from_numpy(words.view(np.int16)[:n])


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.attn_dropout = cfg.n_heads, cfg.attn_dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.fc_out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with ``first_only`` only row 0 ([CLS]) is computed: (B, 1, D)."""
        B, T, D = x.shape
        h = self.ln1(x)  # (B, T, D)
        if first_only:  # queries of [CLS] only; keys and values of every token
            q = F.linear(h[:, :1], self.qkv.weight[:D], self.qkv.bias[:D])  # (B, 1, D)
            k, v = F.linear(h, self.qkv.weight[D:], self.qkv.bias[D:]).split(D, dim=2)  # 2 x (B, T, D)
            x = x[:, :1]  # (B, 1, D)
        else:
            q, k, v = self.qkv(h).split(D, dim=2)  # 3 x (B, T, D)
        Tq, hs = x.shape[1], D // self.n_heads
        q = q.view(B, Tq, self.n_heads, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        k = k.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        # attn_mask (B, 1, 1, T): True = may attend; padding keys are hidden from every query
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, Tq, D)  # (B, Tq, D)
        x = x + self.drop(self.proj(y))
        x = x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))
        return x


class _BagSum(torch.autograd.Function):
    """``F.embedding_bag(rows, weight, mode="sum")`` with a faster weight gradient (training only).

    torch's dense backward of ``embedding_bag`` sorts all B*T*n_fields row ids; one ``index_add_``
    per field is 4x faster here (measured: 39 ms instead of 158 ms for B=256, T=200, 9 fields).
    On CPU each is a serial, deterministic loop over the B*T rows; on CUDA it adds atomically.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.n_rows, ctx.dtype = weight.shape[0], weight.dtype
        return F.embedding_bag(rows, weight, mode="sum")  # (N, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors  # (N, n_fields)
        grad = grad.to(ctx.dtype).contiguous()  # (N, D)
        grad_weight = grad.new_zeros(ctx.n_rows, grad.shape[1])
        for ids in rows.t().contiguous():  # (N,) rows of one field
            grad_weight.index_add_(0, ids, grad)
        return None, grad_weight


class FieldEmbeddings(nn.Module):
    """The embedding tables of all sequence fields as one (sum of sizes, D) table with row offsets.

    ``forward(ids)`` with ids (B, T, n_fields) (field order of ``field_sizes``, offsets not yet
    added) returns the summed field embeddings (B, T, D) in one ``embedding_bag`` call (training
    with gradients goes through ``_BagSum`` for a faster backward; eval is the plain op, for
    export); ``embed[f](ids_f)`` looks up one field, (B, T) -> (B, T, D).
    """

    def __init__(self, field_sizes: dict, d_model: int):
        super().__init__()
        self.fields = list(field_sizes)
        sizes = [int(field_sizes[f]) for f in self.fields]
        self.weight = nn.Parameter(torch.empty(sum(sizes), d_model))
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)  # (n_fields,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T, nf = ids.shape
        flat = (ids + self.offsets).view(B * T, nf)  # (B*T, n_fields) rows of the big table
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            return _BagSum.apply(flat, self.weight).view(B, T, -1)  # (B, T, D)
        return F.embedding_bag(flat, self.weight, mode="sum").view(B, T, -1)  # (B, T, D)

    def __getitem__(self, f: str):
        i = self.fields.index(f)
        return lambda ids: F.embedding(ids + self.offsets[i], self.weight)  # (..., D)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # runs saved with one nn.Embedding per field ("embed.<field>.weight"): concatenate them
        if prefix + "weight" not in state_dict and all(f"{prefix}{f}.weight" in state_dict for f in self.fields):
            state_dict[prefix + "weight"] = torch.cat([state_dict.pop(f"{prefix}{f}.weight") for f in self.fields])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _max_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the real events of each row: tokens (B, T, D), mask (B, T) -> (B, D); 0 for no events."""
    top = tokens.masked_fill(~mask[:, :, None], float("-inf")).amax(dim=1)  # (B, D)
    return torch.where(mask.any(dim=1, keepdim=True), top, torch.zeros_like(top))


class BehaviourTransformer(nn.Module):
    """Events (+ tabular features) -> one logit. ``forward(batch, labels=None) -> (logits, loss)``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if not (cfg.use_sequence or cfg.use_tabular):
            raise ValueError("at least one of use_sequence / use_tabular must be True")
        if cfg.use_tabular and cfg.n_tabular <= 0:
            raise ValueError("use_tabular=True needs n_tabular > 0")
        if cfg.use_sequence and not cfg.field_sizes:
            raise ValueError("use_sequence=True needs field_sizes (SequenceVocab.field_sizes())")
        self.cfg = cfg
        D, parts = cfg.d_model, 0
        if cfg.use_sequence:
            self.fields = list(cfg.field_sizes)
            self.embed = FieldEmbeddings(cfg.field_sizes, D)
            self.pos = nn.Embedding(cfg.max_seq_len, D)  # recency rank 0 = most recent event
            self.cls = nn.Parameter(torch.zeros(D))
            self.drop = Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(D)
            if cfg.pooling not in ("cls", "cls+max"):
                raise ValueError(f"pooling must be 'cls' or 'cls+max', got {cfg.pooling!r}")
            self.pool = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D)) if cfg.pooling == "cls+max" else None
            parts += 1
        if cfg.use_tabular:
            H, K = cfg.tabular_hidden, int(cfg.tabular_bins)
            if K:  # (F, K+1) bin edges per feature, set from the train split before training
                self.register_buffer("tab_edges", torch.zeros(cfg.n_tabular, K + 1))
            self.tab_mlp = nn.Sequential(nn.Linear(cfg.n_tabular * (1 + K), H), nn.GELU(), Dropout(cfg.dropout),
                                         nn.Linear(H, D), nn.LayerNorm(D))
            self.wide = nn.Linear(cfg.n_tabular, 1) if cfg.wide else None
            parts += 1
        self.head = nn.Sequential(nn.Linear(parts * D, D), nn.GELU(), Dropout(cfg.dropout), nn.Linear(D, 1))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * max(cfg.n_layers, 1)))
        if cfg.use_sequence:
            nn.init.normal_(self.cls, std=0.02)
            # unit-scale tokens: the summed fields (std ~ sqrt(n_fields) * 0.3) are of the order of
            # LayerNorm's output, so the sequence branch starts as loud as the tabular one
            nn.init.normal_(self.embed.weight, std=0.3)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameter count; ``embeddings=False`` leaves out the field and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings and self.cfg.use_sequence:
            n -= self.embed.weight.numel() + self.pos.weight.numel()
        return n

    def encode(self, batch: dict[str, torch.Tensor], emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The summary of the event sequence, (B, D): [CLS] output (+ max-pooled tokens).

        ``emb`` (B, T, D), when given, replaces the summed field embeddings of ``batch``'s tokens
        (integrated gradients move it from zero to the real value); ``batch`` then needs only ``mask``.
        """
        mask = batch["mask"]  # (B, T) bool
        B, T = mask.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > max_seq_len {self.cfg.max_seq_len}")
        if emb is None:
            ids = batch["tokens"] if "tokens" in batch else torch.stack([batch[f] for f in self.fields], dim=-1)
            emb = self.embed(ids.long())  # (B, T, D)
        rank = torch.arange(T - 1, -1, -1, device=mask.device)  # (T,) recency rank of each column
        x = emb + self.pos(rank)  # (B, T, D)
        x = torch.cat([self.cls.expand(B, 1, -1).to(x.dtype), x], dim=1)  # (B, 1+T, D)
        x = self.drop(x)
        keep = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1+T): [CLS] is always visible
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, 1+T)
        pooled = None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if last and self.pool is not None:  # the token states entering the last block, which
                pooled = _max_pool(x[:, 1:], mask)  # computes the [CLS] row only: (B, D)
            x = block(x, attn_mask, first_only=last)  # last: (B, 1, D)
        out = self.ln_f(x[:, 0])  # (B, D)
        if self.pool is not None:
            out = out + self.pool(pooled if pooled is not None else _max_pool(x[:, 1:], mask))  # (B, D)
        return out

    def logits(self, batch: dict[str, torch.Tensor], emb: Optional[torch.Tensor] = None,
               tab: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B,); ``emb`` (see :meth:`encode`) and ``tab`` (B, F) override ``batch``'s inputs."""
        parts = []
        if self.cfg.use_sequence:
            parts.append(self.encode(batch, emb))  # (B, D)
        if self.cfg.use_tabular:
            tab = batch["tabular"] if tab is None else tab  # (B, F)
            parts.append(self.tab_mlp(self._tabular_in(tab)))  # (B, D)
        logits = self.head(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
        if self.cfg.use_tabular and self.wide is not None:
            logits = logits + self.wide(tab).squeeze(-1)  # (B,)
        return logits

    def _tabular_in(self, tab: torch.Tensor) -> torch.Tensor:
        """What the tabular MLP reads: the values (B, F), and with ``tabular_bins`` K their piecewise-linear
        encoding (Gorishniy et al. 2022, "On Embeddings for Numerical Features in Tabular Deep Learning"):
        per feature and bin, 0 below the bin, 1 above it, linear inside; (B, F * (1 + K))."""
        if not self.cfg.tabular_bins:
            return tab
        lo = self.tab_edges[:, :-1]  # (F, K)
        width = (self.tab_edges[:, 1:] - lo).clamp_min(1e-6)  # a repeated quantile: a step at that value
        ple = ((tab[:, :, None] - lo) / width).clamp(0.0, 1.0)  # (B, F, K)
        return torch.cat([tab, ple.flatten(1)], dim=-1)

    def forward(self, batch: dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None):
        """Logits (B,) and, when ``labels`` (B,) 0/1 are given, the mean BCE-with-logits loss."""
        logits = self.logits(batch)
        return logits, _bce(logits, labels, self.cfg.pos_weight)


def _bce(logits: torch.Tensor, labels: Optional[torch.Tensor], pos_weight: Optional[float]):
    """Mean BCE-with-logits of (B,) logits against 0/1 labels (None without labels)."""
    if labels is None:
        return None
    pw = None if pos_weight is None else torch.tensor(float(pos_weight), device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)


class SeedEnsemble(nn.Module):
    """Several :class:`BehaviourTransformer` of one config, each trained on its own from another
    seed; the logit is the mean of theirs. ``forward(batch, labels=None) -> (logits, loss)``.

    Averaging removes the part of the score that depends on the seed alone (BENCHMARKS.md, "seeds"),
    at ``n`` times the training and scoring cost of one network.
    """

    def __init__(self, members: list[BehaviourTransformer]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a SeedEnsemble needs at least 2 members, got {len(members)}")
        if any(m.cfg != members[0].cfg for m in members):
            raise ValueError("the members of a SeedEnsemble must share one TransformerConfig")
        self.cfg = members[0].cfg
        self.members = nn.ModuleList(members)

    def num_parameters(self, embeddings: bool = True) -> int:
        return sum(m.num_parameters(embeddings) for m in self.members)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([m.logits(batch) for m in self.members]).mean(dim=0)  # (n, B) -> (B,)

    def forward(self, batch: dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None):
        logits = self.logits(batch)
        return logits, _bce(logits, labels, self.cfg.pos_weight)


def flops_per_sequence(cfg: TransformerConfig, seq_len: int) -> int:
    """Analytic matmul FLOPs of one sequence, forward + backward (3x forward), as in PaLM's MFU.

    Counts what the model computes: full blocks, then a last block with the [CLS] query only
    (the tabular MLP and the head, under 0.1% at length 200, are left out). Attention counts
    QK^T and AV; ``tests/test_transformer.py`` checks the formula against
    ``torch.utils.flop_counter`` run with the math attention backend (the counter has no formula
    for the CPU flash kernel and counts it as zero).
    """
    T, D, L, r = seq_len + 1, cfg.d_model, cfg.n_layers, cfg.mlp_ratio  # +1: the [CLS] token
    full = 2 * T * (3 * D * D + D * D + 2 * r * D * D) + 2 * 2 * T * T * D
    last = 2 * T * 2 * D * D + 2 * (D * D + D * D + 2 * r * D * D) + 2 * 2 * T * D  # k, v of all; rest for [CLS]
    pool = 2 * D * D if cfg.pooling == "cls+max" else 0  # the pooled summary's projection
    fwd = ((L - 1) * full + last + pool) if cfg.use_sequence and L > 0 else 0
    return 3 * fwd


def _demo_field_sizes() -> dict:
    return SequenceVocab(price_edges=[float(i) for i in range(15)]).field_sizes()


def collate(data: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the model's arrays as tensors (the ``collate`` of :func:`~purchase_intent.train.train`).

    Drops the columns that are padding in every row (sequences are right-aligned) and adds
    ``"tokens"`` (B, T', n_fields): all fields in one int64 tensor, one conversion per batch.
    """
    out: dict[str, torch.Tensor] = {}
    start = 0
    if "mask" in data:
        m = data["mask"][idx]  # (B, T)
        cols = np.flatnonzero(m.any(axis=0))
        start = int(cols[0]) if len(cols) else m.shape[1] - 1
        out["mask"] = torch.from_numpy(np.ascontiguousarray(m[:, start:]))
    fields = [k for k in data if k not in ("mask", "label", "tabular", "us_cut")]
    if fields:
        tokens = np.empty((len(idx), data[fields[0]].shape[1] - start, len(fields)), dtype=np.int64)
        for i, f in enumerate(fields):
            tokens[:, :, i] = data[f][idx, start:]
        out["tokens"] = torch.from_numpy(tokens)  # (B, T', n_fields), field order of the model
        for i, f in enumerate(fields):
            out[f] = out["tokens"][:, :, i]  # (B, T') views
    if "tabular" in data:
        out["tabular"] = torch.from_numpy(data["tabular"][idx])
    if "us_cut" in data:  # event times (pretraining's `future` objective), not a token field
        out["us_cut"] = torch.from_numpy(np.ascontiguousarray(data["us_cut"][idx, start:]))
    return out


if __name__ == "__main__":
    for name in PRESETS:
        m = BehaviourTransformer(preset(name, field_sizes=_demo_field_sizes(), n_tabular=40))
        print(f"{name:6s} {dataclasses.asdict(m.cfg)['d_model']:4d}d {m.cfg.n_layers}L "
              f"params {m.num_parameters():>10,d} (without embeddings {m.num_parameters(False):>9,d}) "
              f"fwd+bwd MFLOPs/seq@200 {flops_per_sequence(m.cfg, 200) / 1e6:8.1f}")
