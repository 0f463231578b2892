"""The training loop: one explicit function for any ``forward(batch, labels) -> (logits, loss)`` model.

AdamW (weight decay on Linear weights only), linear warmup then cosine decay, gradient clipping,
evaluation on valid every epoch with early stopping on valid PR-AUC (average precision) and the
best weights restored, a checkpoint after every epoch (safetensors, no pickle) from which a killed
run resumes to exactly the result of an uninterrupted one. CPU by default; CUDA with bf16 autocast
when present. The same code runs under torchrun (rank logic in ``distributed.py``)::

    purchase-intent train --model transformer                         # one process
    torchrun --nproc_per_node 2 -m purchase_intent.cli train --model transformer   # DDP (gloo on CPU)

Data are dicts of equal-length numpy arrays with a ``"label"`` entry; ``collate(data, idx)``
turns rows ``idx`` into a dict of tensors (the default converts every non-label array). The train
data may instead be a stream of batches (:class:`~purchase_intent.sequence_shards.ShardStream`:
each rank reads only its own Parquet shards); the loop is the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os  # (OMP_WAIT_POLICY is set to PASSIVE by the package's __init__, before torch loads)
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score
from tqdm.auto import tqdm

from . import distributed
from .allocator import retained_heap
from .sequence_shards import ShardStream


@dataclass
class TrainLoopConfig:
    """Optimisation settings of :func:`train` (saved with every run)."""

    max_epochs: int = 20
    batch_size: int = 256  # global batch: all ranks together
    eval_batch_size: int = 1024
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.05  # fraction of all steps spent in linear warmup (at least one step)
    weight_decay: float = 0.05  # AdamW decay of Linear weights (never norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    patience: int = 3  # epochs without a better valid PR-AUC before stopping; 0 = never stop early
    ema_decay: float = 0.0  # > 0: evaluate and keep an exponential moving average of the weights
    seed: int = 0
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    amp: str = "auto"  # auto (bf16 on cuda, off on cpu) | bf16 | off
    checkpoint_dir: Optional[str] = None  # write checkpoint.safetensors here after each epoch
    resume: bool = True  # continue from checkpoint_dir's checkpoint when it exists
    progress: bool = True  # tqdm bar on the main rank
    lr_scales: dict = field(default_factory=dict)  # parameter-name prefix -> factor on lr (longest prefix wins)


@dataclass
class TrainResult:
    best_epoch: int = -1  # 0-based epoch whose weights were kept
    best_metric: float = float("nan")  # its valid PR-AUC
    epochs_run: int = 0
    steps: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)  # one dict per epoch
    time_batching_s: float = 0.0  # fetching the batch (a stream reads its shards), collate, host-to-device copies
    time_compute_s: float = 0.0  # forward, backward, optimiser step
    time_eval_s: float = 0.0


def default_collate(data: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every array except ``"label"``: integers as int64, floats as float32."""
    out = {}
    for k, v in data.items():
        if k == "label":
            continue
        a = v[idx]
        if a.dtype == np.bool_:
            out[k] = torch.from_numpy(a)
        elif np.issubdtype(a.dtype, np.integer):
            out[k] = torch.from_numpy(a.astype(np.int64))
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return out


def lr_at(step: int, total_steps: int, cfg: TrainLoopConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    warmup = max(1, int(round(cfg.warmup_frac * total_steps)))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_scale_of(name: str, scales: dict) -> float:
    """The factor on lr of parameter ``name``: that of the longest prefix of ``scales`` it starts with, else 1."""
    hits = [k for k in scales if name.startswith(k)]
    return float(scales[max(hits, key=len)]) if hits else 1.0


def make_optimizer(model: nn.Module, cfg: TrainLoopConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of Linear layers only.

    A parameter named by a prefix of ``cfg.lr_scales`` goes to a group with ``lr_scale`` (its lr is
    the schedule's times that factor); the two groups at factor 1 come first, as without scales."""
    bad = {k: v for k, v in cfg.lr_scales.items() if not (isinstance(v, (int, float)) and 0 < v < math.inf)}
    if bad:
        raise ValueError(f"lr_scales must be positive finite factors, got {bad}")
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    sets: dict = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sets.setdefault((id(p) in decay, lr_scale_of(name, cfg.lr_scales)), []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if dec else 0.0, "lr_scale": scale,
               "lr": cfg.lr * scale} for (dec, scale), ps in sets.items()]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def resolve_device(cfg: TrainLoopConfig) -> tuple[torch.device, bool]:
    """The device to train on and whether to autocast to bf16."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.dist_info().is_distributed:
        name = f"cuda:{distributed.dist_info().local_rank}"
    device = torch.device(name)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return device, amp


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict_logits(model: nn.Module, data: dict[str, np.ndarray], batch_size: int = 1024,
                   collate: Callable = default_collate, device: torch.device | str = "cpu",
                   amp: bool = False) -> np.ndarray:
    """Logits (N,) of `model` on every row of `data`, in order, in eval mode."""
    model = distributed.unwrap(model)
    was_training, device = model.training, torch.device(device)
    model.eval()
    n = len(next(iter(data.values())))
    out = np.empty(n, dtype=np.float32)
    with _retained_on(device):  # large batches reuse freed pages (allocator.py)
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits, _ = model(_to(collate(data, idx), device))
            out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def _retained_on(device: torch.device):
    """:func:`~purchase_intent.allocator.retained_heap` on CPU; nothing on accelerators."""
    return retained_heap() if device.type == "cpu" else contextlib.nullcontext()


def valid_scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """PR-AUC (average precision) and mean log loss of logits against 0/1 labels."""
    y = np.asarray(y, dtype=np.float64)
    z = logits.astype(np.float64)
    loss = float(np.mean(np.logaddexp(0, z) - y * z))
    ap = float(average_precision_score(y, z)) if 0 < y.sum() < len(y) else float("nan")
    return {"pr_auc": ap, "log_loss": loss}


# ---------------------------------------------------------------------------------------------
# checkpoints: tensors in safetensors, everything else as JSON in its metadata (no pickle)
def _save_checkpoint(path: Path, model: nn.Module, best: dict, opt: torch.optim.Optimizer, state: dict,
                     ema: Optional["_Ema"] = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.shadow.items()})
    tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best.items()})
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     ema: Optional["_Ema"] = None) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
    if ema is not None:
        for k, v in tensors.items():
            if k.startswith("ema."):
                ema.shadow[k[4:]].copy_(v)
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    return state, best


class ArrayBatches:
    """In-memory train data as a batch stream: ``(data, idx, global_n)`` per step, where ``idx`` is
    this rank's share of each global batch (:class:`~purchase_intent.distributed.ShardedBatches`)."""

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        self.data = data
        self.sampler = distributed.ShardedBatches(len(data["label"]), batch_size, seed, True)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx, global_n in self.sampler:
            yield self.data, idx, global_n


def train(model: nn.Module, train_data: dict[str, np.ndarray] | ShardStream,
          valid_data: Optional[dict[str, np.ndarray]] = None, cfg: Optional[TrainLoopConfig] = None,
          callbacks: Sequence[Callable[[dict], Optional[bool]]] = (),
          collate: Callable = default_collate) -> TrainResult:
    """Train `model` in place; return what happened. The best (or last) weights end in `model`.

    Parameters
    ----------
    model : nn.Module
        ``forward(batch, labels=None) -> (logits (B,), loss)``; already on the right device.
    train_data, valid_data : dict of numpy arrays
        Equal-length arrays, ``"label"`` (N,) 0/1 included. Without valid data training runs all
        ``max_epochs`` and keeps the last weights. ``train_data`` may also be a stream with
        ``set_epoch(epoch)``, ``len()`` (steps per epoch, equal on every rank) and iteration
        yielding ``(data, idx, global_n)`` (:class:`~purchase_intent.sequence_shards.ShardStream`).
    cfg : TrainLoopConfig
    callbacks : callables
        Called after each epoch (and its checkpoint) with a dict ``epoch, step, train_loss,
        valid_pr_auc, valid_log_loss, lr, model``; returning True stops training.
    collate : callable
        ``collate(data, idx) -> dict of tensors`` (the classifier trims padding here).

    Returns
    -------
    TrainResult
    """
    cfg = cfg or TrainLoopConfig()
    device, amp = resolve_device(cfg)
    with _retained_on(device):  # activations reuse freed pages instead of faulting them in each step
        return _train(model, train_data, valid_data, cfg, callbacks, collate, device, amp)


def _train(model: nn.Module, train_data: dict[str, np.ndarray] | ShardStream,
           valid_data: Optional[dict[str, np.ndarray]], cfg: TrainLoopConfig,
           callbacks: Sequence[Callable[[dict], Optional[bool]]], collate: Callable,
           device: torch.device, amp: bool) -> TrainResult:
    info = distributed.setup(device.type)
    model.to(device)
    ddp_model = distributed.wrap(model, device)
    opt = make_optimizer(model, cfg)
    batches = ArrayBatches(train_data, cfg.batch_size, cfg.seed) if isinstance(train_data, dict) else train_data
    total_steps = max(1, cfg.max_epochs * len(batches))
    res = TrainResult()
    ckpt = Path(cfg.checkpoint_dir) / "checkpoint.safetensors" if cfg.checkpoint_dir else None
    best: dict = {}
    ema = _Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    bad_epochs, start_epoch = 0, 0
    if ckpt is not None and cfg.resume and ckpt.exists():
        state, best = _load_checkpoint(ckpt, model, opt, ema)
        saved = state["config"]
        if (saved["batch_size"], saved["seed"], saved.get("ema_decay", 0.0), saved.get("lr_scales") or {}) != (
                cfg.batch_size, cfg.seed, cfg.ema_decay, cfg.lr_scales or {}):
            raise ValueError(f"{ckpt} was written with another batch_size/seed/ema_decay/lr_scales: "
                             "remove it or set resume=False")
        start_epoch, bad_epochs = state["epoch"], state["bad_epochs"]
        res.steps, res.best_epoch, res.best_metric = state["step"], state["best_epoch"], state["best_metric"]
        res.history, res.stopped_early = state["history"], state["stopped_early"]
        if res.stopped_early:
            start_epoch = cfg.max_epochs
    for epoch in range(start_epoch, cfg.max_epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 7_919 + info.rank)  # dropout: a function of the epoch
        batches.set_epoch(epoch)
        ddp_model.train()
        bar = tqdm(batches, total=len(batches), desc=f"epoch {epoch}", leave=False,
                   disable=not (cfg.progress and info.rank == 0))
        loss_sum, n_seen = 0.0, 0
        t0 = time.perf_counter()  # batching time includes fetching the batch (a stream reads its shards then)
        for data, idx, global_n in bar:
            batch = _to(collate(data, idx), device)
            labels = torch.from_numpy(np.asarray(data["label"][idx], dtype=np.float32)).to(device)
            t1 = time.perf_counter()
            lr = lr_at(res.steps, total_steps, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = ddp_model(batch, labels)
            # mean over the local shard -> share of the global batch (DDP averages over ranks)
            (loss * (len(idx) * info.world_size / global_n)).backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(res.steps)
            res.steps += 1
            loss_sum, n_seen = loss_sum + float(loss.detach()) * len(idx), n_seen + len(idx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            res.time_batching_s += t1 - t0
            res.time_compute_s += t2 - t1
            bar.set_postfix(loss=f"{loss_sum / max(n_seen, 1):.4f}", lr=f"{lr:.2e}")
            t0 = time.perf_counter()
        bar.close()
        row = {"epoch": epoch, "step": res.steps, "train_loss": loss_sum / max(n_seen, 1), "lr": lr,
               "valid_pr_auc": float("nan"), "valid_log_loss": float("nan")}
        if valid_data is not None:
            t0 = time.perf_counter()
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                scores = valid_scores(predict_logits(model, valid_data, cfg.eval_batch_size, collate, device, amp),
                                      valid_data["label"])
                if res.best_epoch < 0 or _metric(scores) > res.best_metric:
                    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            res.time_eval_s += time.perf_counter() - t0
            row.update(valid_pr_auc=scores["pr_auc"], valid_log_loss=scores["log_loss"])
            metric = _metric(scores)
            if res.best_epoch < 0 or metric > res.best_metric:
                res.best_epoch, res.best_metric, bad_epochs = epoch, metric, 0
            else:
                bad_epochs += 1
        res.history.append(row)
        if info.rank == 0 and cfg.progress:
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}  valid PR-AUC "
                       f"{row['valid_pr_auc']:.4f}  valid log loss {row['valid_log_loss']:.4f}")
        res.stopped_early = valid_data is not None and cfg.patience > 0 and bad_epochs >= cfg.patience
        if ckpt is not None and info.rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {"epoch": epoch + 1, "step": res.steps, "best_epoch": res.best_epoch,
                     "best_metric": res.best_metric, "bad_epochs": bad_epochs, "history": res.history,
                     "stopped_early": res.stopped_early, "config": dataclasses.asdict(cfg)}
            _save_checkpoint(ckpt, model, best, opt, state, ema)
        stop = [bool(cb({**row, "model": model})) for cb in callbacks]
        if res.stopped_early or any(stop):
            break
    res.epochs_run = len(res.history)
    if best:
        model.load_state_dict(best)
    elif ema is not None:  # no valid data: the average of the last steps
        ema.load()
    return res


def _metric(scores: dict) -> float:
    """Early-stopping metric: valid PR-AUC; -log loss when valid has a single class (PR-AUC undefined)."""
    return scores["pr_auc"] if not math.isnan(scores["pr_auc"]) else -scores["log_loss"]


class _Ema:
    """Exponential moving average of a model's parameters (Polyak averaging), as timm's ``ModelEmaV2``.

    ``decay`` is warmed up as ``min(decay, (1 + step) / (10 + step))`` so early averages are not
    dominated by the random initialisation. :meth:`swapped_in` evaluates the model on the average.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.shadow = {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        w = 1.0 - min(self.decay, (1 + step) / (10 + step))
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach(), w)

    @torch.no_grad()
    def load(self, values: Optional[dict] = None) -> None:
        """Write ``values`` (default: the average) into the model's parameters."""
        for k, p in self.params.items():
            p.copy_((self.shadow if values is None else values)[k])

    @contextlib.contextmanager
    def swapped_in(self):
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        self.load()
        try:
            yield
        finally:
            self.load(saved)
