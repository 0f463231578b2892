"""Throughput of the behaviour-sequence Transformer on this machine, against its matmul rate.

For each preset: training throughput (sequences/s, through the real ``train()`` loop and the
classifier's batching, with the batching/compute time split), batch inference throughput
(examples/s), model FLOPs per sequence (forward + backward: analytic, and counted by
``torch.utils.flop_counter``), and the achieved FLOP/s as a share of the FLOP/s ``torch.matmul``
reaches in the same run (measured before and after the model runs; the best is used)::

    .venv/bin/python benchmarks/bench_transformer.py                    # all presets, length 200
    .venv/bin/python benchmarks/bench_transformer.py --presets small --threads 2 --amp bf16
    .venv/bin/python benchmarks/bench_transformer.py --presets tiny,small --profile   # + top operators
    .venv/bin/python benchmarks/bench_transformer.py --presets small --compile        # torch.compile
    .venv/bin/python benchmarks/bench_transformer.py --presets small --compile --dropout 0   # fusion alone

Rates never include the warm-up step; with ``--compile`` the warm-up column holds the compilation.
The FLOP rate is over compute time only (batching is shown apart, as seconds and share).

Sequences are full (length 200, no padding): the worst case; real batches are trimmed to their
longest sequence and run faster.

Training and inference run as in the product, inside ``purchase_intent.allocator.retained_heap``
(freed memory reused instead of page-faulted in again); ``PURCHASE_INTENT_RETAIN_HEAP=0
python benchmarks/bench_transformer.py`` measures without it.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as purchase_intent/__init__.py does, before torch loads

import numpy as np
import torch

from purchase_intent.allocator import retained_heap
from purchase_intent.models.classifier import collate
from purchase_intent.models.transformer import BehaviourTransformer, flops_per_sequence, preset
from purchase_intent.sequences import SequenceVocab
from purchase_intent.train import TrainLoopConfig, make_optimizer, predict_logits, train

N_TABULAR = 40


def matmul_flops(n: int = 1024, dtype=torch.float32, reps: int = 10) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def make_data(n: int, T: int, sizes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {f: rng.integers(1, s, size=(n, T)).astype(np.uint8 if s <= 256 else np.int16) for f, s in sizes.items()}
    data["mask"] = np.ones((n, T), dtype=bool)
    data["tabular"] = rng.normal(size=(n, N_TABULAR)).astype(np.float32)
    data["label"] = rng.integers(0, 2, size=n).astype(np.float32)
    return data


def counted_flops(model: BehaviourTransformer, data: dict) -> float:
    """FLOPs per sequence of one forward + backward, counted by torch (matmuls and attention).

    Attention runs on the math backend here: ``FlopCounterMode`` has no formula for the CPU
    flash kernel (``_scaled_dot_product_flash_attention_for_cpu``) and would count it as zero.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch = collate(data, np.arange(2))
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(batch, torch.from_numpy(data["label"][:2]))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def bench(name: str, T: int, batch: int, steps: int, amp: str, infer_batch: int = 512,
          compile: bool = False, dropout: float = 0.1) -> dict:
    sizes = SequenceVocab(price_edges=[float(i) for i in range(15)]).field_sizes()
    torch.manual_seed(0)
    model = BehaviourTransformer(preset(name, field_sizes=sizes, n_tabular=N_TABULAR, max_seq_len=T, dropout=dropout))
    net = torch.compile(model) if compile else model  # same parameters; train() steps `net`
    data = make_data(batch * steps, T, sizes)
    cfg = TrainLoopConfig(max_epochs=1, batch_size=batch, progress=False, device="cpu", amp=amp)
    warm = {k: v[:batch] for k, v in data.items()}
    t = time.perf_counter()
    train(net, warm, None, cfg, collate=collate)  # warm-up step (+ compilation)
    warmup_s = time.perf_counter() - t
    r = train(net, data, None, cfg, collate=collate)
    n_train = batch * steps
    train_s = r.time_batching_s + r.time_compute_s
    n_inf = max(4 * infer_batch, 1024)
    inf_data = make_data(n_inf, T, sizes, seed=1)
    predict_logits(net, {k: v[:infer_batch] for k, v in inf_data.items()}, infer_batch,
                   collate, amp=amp == "bf16")  # warm-up (+ compilation of eval)
    t = time.perf_counter()
    predict_logits(net, inf_data, infer_batch, collate, amp=amp == "bf16")
    inf_s = time.perf_counter() - t
    flops = flops_per_sequence(model.cfg, T)
    return {"preset": name, "params": model.num_parameters(), "params_no_emb": model.num_parameters(False),
            "batch": batch, "seq_len": T, "compile": compile, "dropout": dropout, "warmup_s": warmup_s,
            "train_seq_s": n_train / train_s, "batching_s": r.time_batching_s, "compute_s": r.time_compute_s,
            "batching_share": r.time_batching_s / train_s, "infer_batch": infer_batch, "infer_ex_s": n_inf / inf_s,
            "flops_per_seq": flops, "counted_flops_per_seq": counted_flops(model, data),
            "train_flop_s": flops * n_train / r.time_compute_s}


def profile(name: str, T: int, batch: int, rows: int = 12, dropout: float = 0.1) -> None:
    """Top operators (self CPU time) of two training steps of preset `name`, as shares."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sizes = SequenceVocab(price_edges=[float(i) for i in range(15)]).field_sizes()
    torch.manual_seed(0)
    model = BehaviourTransformer(preset(name, field_sizes=sizes, n_tabular=N_TABULAR, max_seq_len=T, dropout=dropout))
    data = make_data(batch, T, sizes)
    batch_t, labels = collate(data, np.arange(batch)), torch.from_numpy(data["label"])
    opt = make_optimizer(model, TrainLoopConfig())

    def step():
        _, loss = model(batch_t, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with retained_heap():  # as train() runs
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(), step()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    print(f"profile {name}, batch {batch}, length {T}, 2 training steps: "
          + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in ev[:rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--infer-batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (inductor); its time is in the warm-up column, not the rates")
    ap.add_argument("--dropout", type=float, default=0.1,
                    help="dropout of the benchmarked models (0 isolates what torch.compile fuses from its RNG)")
    ap.add_argument("--profile", action="store_true", help="also print the top operators of a training step")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mm_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    mm = [matmul_flops(dtype=mm_dtype)]
    rows = []
    for name in args.presets.split(","):
        batch = args.batch if name != "base" else max(16, args.batch // 4)
        rows.append(bench(name, args.seq_len, batch, args.steps, args.amp, args.infer_batch, args.compile,
                          args.dropout))
        mm.append(matmul_flops(dtype=mm_dtype))
    peak = max(mm)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}, "
          f"matmul {str(mm_dtype)[6:]} 1024^3: {peak / 1e9:.1f} GFLOP/s (runs: "
          f"{', '.join(f'{x / 1e9:.0f}' for x in mm)}){', compiled' if args.compile else ''}, dropout {args.dropout}")
    print("| preset | params (no emb) | batch | warm-up s | train seq/s | batching / compute s | infer ex/s "
          "| MFLOP/seq fwd+bwd (counted) | train GFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["matmul_flop_s"] = peak
        print(f"| {r['preset']} | {r['params']:,} ({r['params_no_emb']:,}) | {r['batch']} | {r['warmup_s']:.1f} "
              f"| {r['train_seq_s']:.0f} | {r['batching_s']:.2f} / {r['compute_s']:.2f} "
              f"({100 * r['batching_share']:.1f}%) | {r['infer_ex_s']:.0f} | {r['flops_per_seq'] / 1e6:.0f} "
              f"({r['counted_flops_per_seq'] / 1e6:.0f}) | {r['train_flop_s'] / 1e9:.1f} "
              f"| {100 * r['train_flop_s'] / peak:.0f}% |")
    if args.profile:
        for name in args.presets.split(","):
            profile(name, args.seq_len, args.batch if name != "base" else max(16, args.batch // 4),
                    dropout=args.dropout)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
