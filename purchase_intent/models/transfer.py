"""Transfer of a pretrained encoder to another shop: which weights keep their meaning there, and the copy.

An encoder folder written by ``purchase-intent pretrain`` in one workspace can start the encoder of
another workspace (``pretrain --init PATH``), whose export may differ (other ids, other event names
mapped to the canonical ones, no prices). The new encoder takes the init encoder's architecture and
token fields; each parameter group is copied when its rows mean the same in the new shop (as
``sequences.py`` defines the tokens) and is re-initialised otherwise:

==================  ===========================================================================
group               copied when
==================  ===========================================================================
``event``           always: 1..7 are the canonical event types every shop's names are mapped to
``item``,           the bucket counts are equal (``pretrain --init`` takes them from the init
``category``,       encoder's vocab): ``md5(id) % buckets`` sends one id to one row in every shop
``raw_event``       (two shops' own event names share rows where they share names: GA4 exports)
``dt_cutoff``,      ``time_buckets`` and ``time_max`` are equal (fixed log-spaced edges in seconds)
``dt_prev``
``hour``,           always: UTC hour of day, ISO weekday, and the fixed code of what the user did
``weekday``,        with the item before
``item_state``
``price``           the price edges are equal: they are quantiles of each shop's own prices, so
                    bucket 5 of one shop is another price range in the next
``pos``             its first ``max_seq_len`` rows (recency ranks; the window may only shorten)
``cls``, blocks,    always (one architecture)
``ln_f``, ``pool``
==================  ===========================================================================

A hashed row shares its meaning across shops only where the ids themselves are shared (category
names, a common catalogue); elsewhere the copied rows are a start with the scale the blocks were
trained on. A field the new shop lacks (no event has a token other than 0: no prices, no
categories) is re-initialised with a zero padding row: it adds nothing to the tokens, while the
field set, and so every later use of the encoder, stays the same. The objectives' heads are not
part of an encoder folder and always start fresh.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional

import torch
from safetensors import SafetensorError

from ..sequences import SEQUENCE_FIELDS, SequenceVocab
from .pretraining import ENCODER_CONFIG, ENCODER_WEIGHTS, load_encoder
from .transformer import BehaviourTransformer, TransformerConfig

# the fields whose tokens are fixed codes, the same in every shop
FIXED_FIELDS = {"event": "canonical event types", "hour": "UTC hour of day", "weekday": "ISO weekday",
                "item_state": "fixed code of the earlier actions on the item"}
HASHED_FIELDS = {"item": "item_buckets", "category": "category_buckets", "raw_event": "raw_event_buckets"}
TIME_FIELDS = ("dt_cutoff", "dt_prev")
# the encoder's parameter groups besides the field tables, in the order of the report
ENCODER_GROUPS = ("cls", "blocks", "ln_f", "pool")
LACKING = {"price": "prices", "category": "categories", "item": "item ids", "item_state": "item ids"}


@dataclass
class TransferReport:
    """What :func:`transfer_state` copied and what it left re-initialised, group -> reason."""

    transferred: dict[str, str] = field(default_factory=dict)
    reinitialised: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One log line for everything copied, then one line per re-initialised group."""
        out = [f"transferred: {', '.join(self.transferred) or 'nothing'}"]
        return out + [f"{g}: re-initialised ({why})" for g, why in self.reinitialised.items()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_init(path: str | Path | None) -> tuple[BehaviourTransformer, dict]:
    """The encoder of an init folder and its config.json, checked for transfer.

    Raises
    ------
    FileNotFoundError
        The folder does not exist.
    ValueError
        It is not an encoder folder, cannot be read, or holds fields this version cannot map.
    """
    if path is None:
        raise FileNotFoundError("no init encoder given: give the runs/pretrained folder of another workspace")
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"no init encoder at {d}: give the runs/pretrained folder of another workspace "
                                "(written by `purchase-intent pretrain` there)")
    if not (d / ENCODER_CONFIG).is_file() or not (d / ENCODER_WEIGHTS).is_file():
        raise ValueError(f"{d} is not a pretrained encoder (it lacks {ENCODER_CONFIG} or {ENCODER_WEIGHTS}): "
                         "give the runs/pretrained folder of another workspace")
    try:
        net, meta = load_encoder(d)
        vocab = SequenceVocab.from_dict(meta["vocab"])
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{d} is not a usable pretrained encoder: {msg}") from e
    unknown = [f for f in net.cfg.field_sizes if f not in SEQUENCE_FIELDS]
    if unknown:
        raise ValueError(f"the init encoder {d} has the fields {unknown}, which cannot be mapped onto this "
                         f"version's fields ({', '.join(SEQUENCE_FIELDS)})")
    meta["vocab"] = vocab.to_dict()
    return net, meta


def transfer_config(src: TransformerConfig, max_seq_len: int, dropout: float, d_model: Optional[int] = None,
                    field_sizes: Optional[dict] = None, where: str = "the init encoder") -> TransformerConfig:
    """The new encoder's architecture: ``src``'s, with the new shop's field sizes and window.

    Parameters
    ----------
    src : TransformerConfig
        The init encoder's.
    max_seq_len : int
        The window asked for; the result is ``min(max_seq_len, src.max_seq_len)``.
    dropout : float
        The new training's dropout (not part of the architecture).
    d_model : int, optional
        A width asked for explicitly; it must equal ``src.d_model``.
    field_sizes : dict, optional
        The new vocab's table sizes of ``src``'s fields, in ``src``'s order (default ``src``'s sizes).

    Raises
    ------
    ValueError
        ``d_model`` differs from ``src.d_model``, or ``field_sizes`` has other fields than ``src``.
    """
    if d_model is not None and int(d_model) != src.d_model:
        raise ValueError(f"d_model={d_model} differs from {where}'s d_model={src.d_model}: "
                         "leave d_model out to take the init encoder's")
    field_sizes = dict(src.field_sizes) if field_sizes is None else field_sizes
    if list(field_sizes) != list(src.field_sizes):
        raise ValueError(f"{where} has the fields {list(src.field_sizes)}, the new encoder {list(field_sizes)}")
    return dataclasses.replace(src, field_sizes={f: int(n) for f, n in field_sizes.items()},
                               max_seq_len=min(int(max_seq_len), src.max_seq_len), dropout=float(dropout),
                               use_sequence=True, use_tabular=False, n_tabular=0, pos_weight=None)


def field_transfer_reason(name: str, src_vocab: SequenceVocab, dst_vocab: SequenceVocab,
                          lacking: bool = False) -> tuple[bool, str]:
    """(whether field ``name``'s table keeps its meaning in the new shop, why): the rules of the module doc."""
    s, d = src_vocab.cfg, dst_vocab.cfg
    if lacking:
        return False, f"this shop has no {LACKING.get(name, name + ' tokens')}"
    if name in FIXED_FIELDS:
        return True, FIXED_FIELDS[name]
    if name in HASHED_FIELDS:
        key = HASHED_FIELDS[name]
        ns, nd = getattr(s, key), getattr(d, key)
        if ns != nd:
            return False, f"its hash buckets differ ({key} {ns} in the init encoder, {nd} here)"
        return True, f"the same {ns} hash buckets"
    if name in TIME_FIELDS:
        if (s.time_buckets, s.time_max) != (d.time_buckets, d.time_max):
            return False, (f"its time buckets differ ({s.time_buckets} up to {s.time_max} in the init encoder, "
                           f"{d.time_buckets} up to {d.time_max} here)")
        return True, f"the same {s.time_buckets} time buckets"
    if name == "price":
        if [float(x) for x in src_vocab.price_edges] != [float(x) for x in dst_vocab.price_edges]:
            return False, "its price buckets differ: the edges are quantiles of each shop's own prices"
        return True, "the same price edges"
    raise ValueError(f"unknown sequence field {name!r}: choose from {', '.join(SEQUENCE_FIELDS)}")


@torch.no_grad()
def transfer_state(src_net: BehaviourTransformer, src_meta: dict, dst_net: BehaviourTransformer,
                   dst_vocab: SequenceVocab, lacking: Collection[str] = ()) -> TransferReport:
    """Copy into ``dst_net`` every encoder weight of ``src_net`` that keeps its meaning; report each group.

    Parameters
    ----------
    src_net, src_meta
        The init encoder and its config.json (:func:`load_init`).
    dst_net : BehaviourTransformer
        The new encoder, freshly initialised, built with :func:`transfer_config`; the groups that do
        not transfer keep its initial values.
    dst_vocab : SequenceVocab
        The new shop's vocab (its field sizes are ``dst_net``'s).
    lacking : collection of str
        Fields of which the new shop has no token other than 0 (padding / missing): re-initialised
        with a zero padding row.

    Returns
    -------
    TransferReport
        Groups: each field name, ``pos``, ``cls``, ``blocks.<i>``, ``ln_f``, ``pool`` (with pooling
        ``cls+max``).
    """
    s, d = src_net.cfg, dst_net.cfg
    arch = ("d_model", "n_layers", "n_heads", "mlp_ratio", "pooling")
    diff = {k: (getattr(s, k), getattr(d, k)) for k in arch if getattr(s, k) != getattr(d, k)}
    if diff or list(s.field_sizes) != list(d.field_sizes) or d.max_seq_len > s.max_seq_len:
        raise ValueError(f"the new encoder's architecture differs from the init encoder's (init, new): {diff}, "
                         f"fields {list(s.field_sizes)} / {list(d.field_sizes)}, "
                         f"max_seq_len {s.max_seq_len} / {d.max_seq_len}: build it with transfer_config")
    src_vocab = SequenceVocab.from_dict(src_meta["vocab"])
    report = TransferReport()
    src_w, dst_w = src_net.embed.weight, dst_net.embed.weight
    src_off, dst_off = 0, 0
    for f in d.field_sizes:
        ns, nd = int(s.field_sizes[f]), int(d.field_sizes[f])
        ok, why = field_transfer_reason(f, src_vocab, dst_vocab, lacking=f in set(lacking))
        if ok and ns != nd:
            ok, why = False, f"its table sizes differ ({ns} rows in the init encoder, {nd} here)"
        if ok:
            dst_w[dst_off:dst_off + nd].copy_(src_w[src_off:src_off + ns])
            report.transferred[f] = why
        else:
            if f in set(lacking):
                dst_w[dst_off].zero_()  # the only token this shop has: add nothing
            report.reinitialised[f] = why
        src_off, dst_off = src_off + ns, dst_off + nd
    L = d.max_seq_len
    dst_net.pos.weight.copy_(src_net.pos.weight[:L])
    report.transferred["pos"] = f"recency ranks 0..{L - 1}" + (f" of {s.max_seq_len}" if L < s.max_seq_len else "")
    src_state, dst_state = src_net.state_dict(), dst_net.state_dict(keep_vars=True)
    prefixes = {"cls": ["cls"], "ln_f": ["ln_f."], "pool": ["pool."],
                "blocks": [f"blocks.{i}." for i in range(d.n_layers)]}
    for prefix in (p for group in ENCODER_GROUPS for p in prefixes[group]):
        names = [k for k in dst_state if k.startswith(prefix)]
        for k in names:
            dst_state[k].copy_(src_state[k])
        if names:  # no pool with pooling="cls"
            report.transferred[prefix.rstrip(".")] = "the same architecture"
    return report
