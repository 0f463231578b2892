"""ONNX export of :class:`BehaviourTransformer` (or a :class:`SeedEnsemble` of them: one graph,
one branch per member, their mean logit) and its inference with ONNX Runtime.

The exported graph is the inference path only (eval mode, no loss): inputs ``tokens`` (B, T,
n_fields) int64 in the field order of ``cfg.field_sizes``, ``mask`` (B, T) bool (right-aligned,
True = real event) and ``tabular`` (B, F) float32, the first two only with ``use_sequence`` and
the last only with ``use_tabular``; output ``logits`` (B,) float32. Batch and sequence length are
dynamic (T up to ``max_seq_len``)::

    data = export_onnx(model)                  # bytes of model.onnx
    scorer = OnnxScorer(data)                  # CPU execution provider
    logits = scorer.logits({"tokens": ..., "mask": ..., "tabular": ...})  # (B,)

Exporter: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). In torch 2.13 both
it and the ``torch.export`` exporter (``dynamo=True`` + onnxscript) give the same logits to 1e-7
and, once ONNX Runtime has optimised them, equally fast sessions, but the TorchScript one exports
a small model in under a second where the other takes 4-12 s on 2 cores, and the export runs at
every save of a fitted model. ``exporter="dynamo"`` is kept for when the TorchScript exporter is
gone (it is deprecated); :func:`export_onnx` falls back to it when the first one fails.

``PURCHASE_INTENT_INFERENCE`` (``auto``, ``torch`` or ``onnx``) selects the runtime of a loaded
:class:`~purchase_intent.models.classifier.TransformerClassifier`; see :func:`inference_mode`.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from .transformer import BehaviourTransformer, SeedEnsemble

ONNX_FILE = "model.onnx"
OPSET = 18
INFERENCE_ENV = "PURCHASE_INTENT_INFERENCE"
INFERENCE_MODES = ("auto", "torch", "onnx")
# ONNX Runtime rewrites Gather(table, Range(T - 1, -1, -1)) (the recency-rank lookup) into
# Slice(table, starts=T - 1, ends=-1, steps=-1), where ends=-1 then means "the last row": an empty
# slice and a broadcast error (onnxruntime 1.32). Nothing else in this graph uses the fusion.
_DISABLED_OPTIMIZERS = ["GatherToSliceFusion"]


def inference_mode() -> str:
    """The runtime asked for by ``$PURCHASE_INTENT_INFERENCE``: ``auto`` (default), ``torch`` or ``onnx``.

    ``torch`` always runs PyTorch; ``onnx`` runs ONNX Runtime whenever the saved model has a
    ``model.onnx`` and onnxruntime is installed (else PyTorch, with a warning); ``auto`` runs
    ONNX Runtime where it was measured faster (see :func:`prefer_onnx`).
    """
    mode = (os.environ.get(INFERENCE_ENV) or "auto").strip().lower()
    if mode not in INFERENCE_MODES:
        raise ValueError(f"{INFERENCE_ENV}={mode!r}: choose one of {', '.join(INFERENCE_MODES)}")
    return mode


# auto: ONNX Runtime for calls of at most this many rows, PyTorch above (benchmarks/bench_onnx.py)
AUTO_ONNX_MAX_ROWS = 8


_FALLBACKS: dict[str, int] = {}
_FALLBACKS_LOCK = threading.Lock()


def record_fallback(reason: str) -> None:
    """Count a loaded model that runs PyTorch because ONNX Runtime could not be used (``reason``:
    ``open_failed``, ``stale_file``, ``no_graph``); the API shows the counts in /metrics."""
    with _FALLBACKS_LOCK:
        _FALLBACKS[reason] = _FALLBACKS.get(reason, 0) + 1


def fallback_counts() -> dict[str, int]:
    """ONNX -> PyTorch fallbacks of this process so far, by reason."""
    with _FALLBACKS_LOCK:
        return dict(_FALLBACKS)


def prefer_onnx(n_rows: int) -> bool:
    """Whether ``auto`` runs ONNX Runtime for a call of ``n_rows`` examples.

    Measured on 2 shared cores at length 200 (benchmarks/bench_onnx.py): for a single request
    ONNX Runtime takes about half the time of PyTorch (whose per-operator dispatch dominates a
    graph of a few hundred small operators), still less at 4-8 rows, and from about 16 rows
    on PyTorch is as fast or faster: its fused ``embedding_bag`` and attention kernels win once
    the tensors are large, where ONNX Runtime materialises each field's embeddings.
    """
    return 1 <= n_rows <= AUTO_ONNX_MAX_ROWS


def onnx_export_available() -> bool:
    """True when the ``onnx`` package (needed by the exporter) is installed."""
    return importlib.util.find_spec("onnx") is not None


def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def input_names(model: BehaviourTransformer) -> list[str]:
    """The graph's inputs, in order, for the model's ablation switches."""
    cfg = model.cfg
    return (["tokens", "mask"] if cfg.use_sequence else []) + (["tabular"] if cfg.use_tabular else [])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _GatherSumEmbeddings(nn.Module):
    """``FieldEmbeddings`` as one gather per field and a running sum: the same value (up to float
    summation order) as its ``embedding_bag``, which the exporters lower to an ONNX ``Loop`` that
    runs at half the speed in ONNX Runtime. (One gather of all fields and a ReduceSum over them
    is a third slower than the running sum at batch 128: it materialises (B, T, n_fields, D).)"""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.weight = embed.weight  # (sum of field sizes, D)
        self.register_buffer("offsets", embed.offsets.clone(), persistent=False)  # (n_fields,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids + self.offsets  # (B, T, n_fields) rows of the big table
        x = F.embedding(ids[..., 0], self.weight)  # (B, T, D)
        for i in range(1, ids.shape[-1]):
            x = x + F.embedding(ids[..., i], self.weight)
        return x


class _AdditiveMaskBlock(nn.Module):
    """A block whose boolean attention mask is handed on as an additive one (0 / -inf).

    Both give the same softmax (the [CLS] key is always visible, so no row is all -inf), but the
    exporters lower a boolean mask to a Where on the (B, nh, T, T) scores plus a NaN guard after
    the softmax, a fifth of ONNX Runtime's time at batch 128; the additive mask is one Add."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype).masked_fill(~attn_mask, float("-inf"))
        return self.block(x, attn_mask, first_only=first_only)


class _InferenceGraph(nn.Module):
    """Positional inputs (those of :func:`input_names`) -> logits (B,): what gets exported.

    A copy of the model with two export-only substitutions, each equal in value to what it
    replaces: the field embeddings as gather + sum, and additive attention masks."""

    def __init__(self, model: BehaviourTransformer | SeedEnsemble):
        super().__init__()
        self.names = input_names(model)
        self.model = copy.deepcopy(model).float().cpu().eval()
        if self.model.cfg.use_sequence:
            for net in getattr(self.model, "members", [self.model]):  # a SeedEnsemble: one branch each
                net.embed = _GatherSumEmbeddings(net.embed)
                net.blocks = nn.ModuleList(_AdditiveMaskBlock(b) for b in net.blocks)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(dict(zip(self.names, inputs)))
        return logits  # (B,)


def _example_inputs(model: BehaviourTransformer, batch: int = 2, seq_len: int = 8) -> tuple[torch.Tensor, ...]:
    cfg = model.cfg
    T = max(2, min(seq_len, cfg.max_seq_len))  # neither dim may be 1: a size-1 dim is traced as a constant
    out: list[torch.Tensor] = []
    if cfg.use_sequence:
        out.append(torch.ones(batch, T, len(cfg.field_sizes), dtype=torch.int64))  # (B, T, n_fields)
        out.append(torch.ones(batch, T, dtype=torch.bool))  # (B, T)
    if cfg.use_tabular:
        out.append(torch.zeros(batch, cfg.n_tabular, dtype=torch.float32))  # (B, F)
    return tuple(out)


def export_onnx(model: BehaviourTransformer, exporter: str = "torchscript") -> bytes:
    """The serialized ONNX graph of ``model``'s inference path, batch and length dynamic.

    Parameters
    ----------
    model : BehaviourTransformer
        Left untouched (a copy is exported).
    exporter : {"torchscript", "dynamo"}
        ``torch.onnx.export`` with ``dynamo=False`` or ``dynamo=True``; a failure of the first
        falls back to the second.

    Returns
    -------
    bytes
        The ``model.onnx`` file (weights embedded).
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter {exporter!r}: choose 'torchscript' or 'dynamo'")
    graph = _InferenceGraph(model)
    example = _example_inputs(model)
    names = graph.names
    if exporter == "torchscript":
        try:
            return _export_torchscript(graph, example, names)
        except Exception as e:  # e.g. removed from a later torch
            warnings.warn(f"TorchScript ONNX export failed ({e!r}); trying the torch.export exporter",
                          RuntimeWarning, stacklevel=2)
    return _export_dynamo(graph, example, names)


def _dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    axes = {"tokens": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}, "tabular": {0: "batch"}}
    return {n: axes[n] for n in names}


def _export_torchscript(graph: nn.Module, example: tuple, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter announces its own deprecation
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the max_seq_len check, traced as a constant
        torch.onnx.export(graph, example, buf, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["logits"], dynamic_axes={**_dynamic_axes(names), "logits": {0: "batch"}})
    return buf.getvalue()


def _export_dynamo(graph: nn.Module, example: tuple, names: list[str]) -> bytes:
    batch, seq = Dim("batch"), Dim("seq", max=graph.model.cfg.max_seq_len)
    shapes = {"tokens": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}, "tabular": {0: batch}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=["logits"], dynamic_shapes=(tuple(shapes[n] for n in names),),
                                    optimize=True, verbose=False)
    buf = io.BytesIO()
    program.save(buf)
    return buf.getvalue()


def random_batch(model: BehaviourTransformer, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of the model's inputs with random tokens and right-aligned padding: row 0 is
    full, the last row has no events (when ``batch`` > 1), the others are in between."""
    g = torch.Generator().manual_seed(seed)
    cfg, out = model.cfg, {}
    if cfg.use_sequence:
        T = min(seq_len, cfg.max_seq_len)
        lengths = torch.randint(0, T + 1, (batch,), generator=g)
        lengths[0] = T
        if batch > 1:
            lengths[-1] = 0
        mask = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # (B, T)
        tokens = torch.stack([torch.randint(1, max(int(n), 2), (batch, T), generator=g)
                              for n in cfg.field_sizes.values()], dim=-1)  # (B, T, n_fields)
        out["tokens"] = tokens * mask[..., None]
        out["mask"] = mask
    if cfg.use_tabular:
        out["tabular"] = torch.randn(batch, cfg.n_tabular, generator=g)  # (B, F)
    return out


def check_parity(model: BehaviourTransformer, onnx_model: bytes | str | Path, rtol: float = 1e-4,
                 atol: float = 1e-5) -> float:
    """Max |logit difference| of ONNX Runtime against ``model`` (eval mode) on random padded
    batches; raises ValueError above the tolerance."""
    scorer = OnnxScorer(onnx_model, n_threads=1)
    net = copy.deepcopy(model).float().cpu().eval()
    worst = 0.0
    for i, (B, T) in enumerate([(1, 1), (3, 9), (4, net.cfg.max_seq_len)]):
        batch = random_batch(net, B, T, seed=i)
        with torch.no_grad():
            ref = net(batch)[0].numpy()
        got = scorer.logits(batch)
        worst = max(worst, float(np.max(np.abs(got - ref))))
        if not np.allclose(got, ref, rtol=rtol, atol=atol):
            raise ValueError(f"ONNX Runtime logits differ from PyTorch by up to {worst:.2e} (batch {B}, length {T})")
    return worst



def export_checked(model: BehaviourTransformer | SeedEnsemble) -> Optional[bytes]:
    """model.onnx of a fitted ``model``, checked against PyTorch; None without the extras or, with
    a warning, when export or the check fails (a model that only runs in PyTorch is still a model)."""
    if not (onnx_export_available() and onnxruntime_available()):
        return None  # a graph is only written once it has been checked against PyTorch
    try:
        data = export_onnx(model)
        check_parity(model, data)
        return data
    except Exception as e:
        warnings.warn(f"ONNX export failed, the saved model will run with PyTorch only: {e!r}",
                      RuntimeWarning, stacklevel=3)
        return None


def saved_onnx(directory: Path, entry: Optional[dict]) -> Optional[Path]:
    """The model.onnx in ``directory`` that config.json's ``entry`` records, if onnxruntime can run
    it and its sha256 matches (else None, with a warning for a missing or stale file)."""
    if not entry or not onnxruntime_available() or entry.get("file") != ONNX_FILE:
        return None
    path = Path(directory) / ONNX_FILE
    if not path.is_file() or sha256(path.read_bytes()) != entry["sha256"]:
        warnings.warn(f"{path} is missing or does not match the saved weights: running PyTorch",
                      RuntimeWarning, stacklevel=3)
        record_fallback("stale_file")
        return None
    return path

class OnnxScorer:
    """ONNX Runtime sessions (CPU execution provider) of an exported model.

    Parameters
    ----------
    model : path or bytes
        ``model.onnx`` as written by :func:`export_onnx`.
    n_threads : int or None
        Intra-op threads for batches of more than ``SINGLE_THREAD_ROWS`` rows; None =
        ``torch.get_num_threads()``, the threads the PyTorch path uses (honours
        ``OMP_NUM_THREADS`` and ``torch.set_num_threads``). Smaller batches run on one thread:
        their operators are too small to split (batch 1, length 200, small preset, 2 shared
        cores: the same median and a quarter of the p99 of two threads). Operators run one after
        another (sequential execution, one inter-op thread): the graph is a chain.
    spin : bool
        Let idle pool threads spin-wait for the next operator. Off by default: it did not lower
        the latency here and it burns the cores a server shares with request handling.
    """

    SINGLE_THREAD_ROWS = 8

    def __init__(self, model: str | Path | bytes, n_threads: Optional[int] = None, spin: bool = False):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:  # pragma: no cover - callers check onnxruntime_available()
            raise ImportError("ONNX inference needs onnxruntime: pip install 'purchase-intent[onnx]'") from e
        self.model = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.n_threads = int(n_threads or torch.get_num_threads())
        self.spin = spin
        self._sessions: dict[int, object] = {}
        self.input_names = [i.name for i in self._session(1).get_inputs()]

    def _session(self, n_threads: int):
        if n_threads not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = n_threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            so.log_severity_level = 3  # errors only
            self._sessions[n_threads] = ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"],
                                                             disabled_optimizers=_DISABLED_OPTIMIZERS)
        return self._sessions[n_threads]

    def logits(self, batch: dict) -> np.ndarray:
        """Logits (B,) float32 of one batch: a dict holding (at least) the graph's inputs as
        numpy arrays or CPU tensors of the dtypes above."""
        feed = {}
        for name in self.input_names:
            a = batch[name]
            a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            feed[name] = np.ascontiguousarray(a)
        rows = len(next(iter(feed.values())))
        threads = 1 if rows <= self.SINGLE_THREAD_ROWS else self.n_threads
        (out,) = self._session(threads).run(["logits"], feed)
        return out
