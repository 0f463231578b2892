"""Encoders saved before the token vocabulary grew, brought up to this version's fields when loaded.

Two changes of ``sequences.py`` touch a saved encoder: the canonical event ``checkout`` (code 7,
one more row of the ``event`` table) and the ``raw_event`` field (the hashed raw event name). An
encoder folder written before them still loads (:func:`pretraining.load_encoder` calls
:func:`upgrade_state`), and it computes exactly what it computed before on the same events:

* ``event`` gains the rows of the new codes, each a copy of the ``other`` row: the old encoder
  read a checkout as ``other`` (a token it had never seen, clipped to its last row), so it still does;
* ``raw_event`` is added with every row zero: it adds nothing to any token until fine-tuning (or
  pretraining from this encoder) learns it.

One line says what was initialised. As ``artifacts`` asks, this compatibility lives in the loader
only; the model code knows one vocabulary.
"""
from __future__ import annotations

import dataclasses

import torch

from ..sequences import SequenceVocab
from ..vocabulary import EVENT_CODES, OTHER_CODE
from .transformer import TransformerConfig


def upgrade_state(cfg: TransformerConfig, state: dict, vocab: SequenceVocab) -> tuple[TransformerConfig, dict, str]:
    """``cfg`` and ``state`` with this version's event codes and ``raw_event`` field, and the line saying
    what was initialised ("" when the encoder is current).

    Parameters
    ----------
    cfg, state
        The saved encoder's config and weights (``embed.weight``, or the per-field tables
        ``embed.<field>.weight`` of older folders).
    vocab
        The encoder's vocab (its ``raw_event_buckets``: the default where it predates them).
    """
    sizes = {f: int(n) for f, n in cfg.field_sizes.items()}
    if not sizes:
        return cfg, state, ""
    new = dict(sizes)
    notes = []
    if "event" in new and new["event"] < len(EVENT_CODES) + 1:
        names = [e for e, c in sorted(EVENT_CODES.items(), key=lambda kv: kv[1]) if c >= new["event"]]
        notes.append(f"the event rows of {', '.join(names)} (as a copy of other)")
        new["event"] = len(EVENT_CODES) + 1
    if "raw_event" not in new:
        new["raw_event"] = vocab.cfg.raw_event_buckets + 1
        notes.append("the raw_event field (zero: it adds nothing until trained)")
    if new == sizes:
        return cfg, state, ""
    state = dict(state)
    if "embed.weight" not in state:  # per-field tables of older folders: one table first
        state["embed.weight"] = torch.cat([state.pop(f"embed.{f}.weight") for f in sizes])
    weight = state["embed.weight"]  # (sum of old sizes, D)
    tables, off = [], 0
    for f, n in new.items():
        old = weight[off: off + sizes[f]] if f in sizes else weight.new_zeros(0, weight.shape[1])
        off += sizes.get(f, 0)
        extra = n - old.shape[0]
        fill = (old[OTHER_CODE].expand(extra, -1) if f == "event" else weight.new_zeros(extra, weight.shape[1]))
        tables.append(torch.cat([old, fill]))
    state["embed.weight"] = torch.cat(tables).contiguous()  # (sum of new sizes, D)
    return dataclasses.replace(cfg, field_sizes=new), state, "initialised " + " and ".join(notes)
