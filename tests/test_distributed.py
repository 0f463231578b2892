"""DDP on CPU: two gloo processes match one process on the same global batch."""
from __future__ import annotations

import sys
import textwrap

import numpy as np
from conftest import run_ranks

from purchase_intent.distributed import DistInfo, ShardedBatches, dist_info, is_main

WORKER = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from safetensors.torch import save_file
    from purchase_intent import distributed
    from purchase_intent.models.transformer import BehaviourTransformer, preset
    from purchase_intent.train import TrainLoopConfig, train

    rng = np.random.default_rng(0)
    n, T = 60, 5  # 60 rows, global batch 16: the last batch (12 rows) is uneven too
    ev = rng.integers(1, 7, size=(n, T)).astype(np.uint8)
    data = {"event": ev, "mask": np.ones((n, T), bool), "tabular": rng.normal(size=(n, 2)).astype(np.float32),
            "label": (ev == 5).any(1).astype(np.float32)}
    torch.manual_seed(0)
    model = BehaviourTransformer(preset("tiny", field_sizes={"event": 7}, n_tabular=2, max_seq_len=T, dropout=0.0))
    cfg = TrainLoopConfig(max_epochs=2, batch_size=16, lr=3e-3, progress=False, device="cpu")
    res = train(model, data, data, cfg)
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
    distributed.cleanup()
""")


def test_two_gloo_processes_match_one(tmp_path):
    import torch
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # one process, in this interpreter (no torchrun environment): the reference
    argv = sys.argv
    try:
        sys.argv = [str(script), str(tmp_path / "single.safetensors")]
        exec(compile(WORKER, str(script), "exec"), {"__name__": "__worker__"})
    finally:
        sys.argv = argv
    run_ranks(script, tmp_path / "ddp.safetensors", 2)
    single, ddp = load_file(str(tmp_path / "single.safetensors")), load_file(str(tmp_path / "ddp.safetensors"))
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sharded_batches_cover_the_global_batch():
    full = ShardedBatches(23, 8, seed=1, rank=0, world_size=1)
    shards = [ShardedBatches(23, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in [full, *shards]:
        s.set_epoch(3)
    g = list(full)
    parts = [list(s) for s in shards]
    assert len(g) == len(parts[0]) == len(parts[1]) == 3
    for (idx, n), (a, na), (b, nb) in zip(g, *parts):
        np.testing.assert_array_equal(idx, np.concatenate([a, b]))
        assert n == na == nb == len(idx)
    other = ShardedBatches(23, 8, seed=1, rank=0, world_size=1)
    other.set_epoch(4)
    assert not np.array_equal(next(iter(other))[0], g[0][0])
    odd = ShardedBatches(17, 8, seed=0, rank=1, world_size=2)  # last global batch of 1 < world: dropped
    assert len(odd) == 2


def test_dist_info_without_torchrun(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert dist_info() == DistInfo(0, 0, 1) and is_main()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_info().rank == 1 and dist_info().is_distributed and not is_main()
