"""The training loop: schedule, decay groups, early stopping, determinism, kill-and-resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from purchase_intent.calibration import Calibrator, fit_calibrator, fit_platt, fit_temperature
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.train import TrainLoopConfig, default_collate, lr_at, make_optimizer, train

SIZES = {"event": 7, "item": 31}


def make_data(n=64, T=6, seed=0):
    rng = np.random.default_rng(seed)
    ev = rng.integers(1, 7, size=(n, T)).astype(np.uint8)
    y = (ev == 5).any(1).astype(np.float32)  # a purchase in the history
    return {"event": ev, "item": rng.integers(1, 31, size=(n, T)).astype(np.int16),
            "mask": np.ones((n, T), bool), "tabular": rng.normal(size=(n, 2)).astype(np.float32), "label": y}


def make_model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=2, max_seq_len=6, dropout=dropout))


def cfg(**kw):
    return TrainLoopConfig(**{**dict(max_epochs=3, batch_size=16, lr=3e-3, progress=False), **kw})


def test_lr_schedule_and_decay_groups():
    c = TrainLoopConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1)
    lrs = [lr_at(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    m = make_model()
    opt = make_optimizer(m, c)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(m.blocks[0].qkv.weight) in decayed
    assert not decayed & {id(m.embed.weight), id(m.blocks[0].ln1.weight), id(m.blocks[0].qkv.bias), id(m.cls)}


def test_default_collate_types():
    d = make_data()
    b = default_collate(d, np.array([0, 3]))
    assert "label" not in b and b["event"].dtype == torch.int64 and b["mask"].dtype == torch.bool
    assert b["tabular"].dtype == torch.float32 and b["item"].shape == (2, 6)


def test_learns_restores_best_and_is_deterministic():
    tr, va = make_data(128, seed=0), make_data(64, seed=1)
    m1 = make_model()
    r1 = train(m1, tr, va, cfg(max_epochs=4))
    assert r1.epochs_run == 4 and len(r1.history) == 4 and r1.steps == 4 * 8
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]
    assert r1.best_metric == max(h["valid_pr_auc"] for h in r1.history)
    assert r1.time_compute_s > 0 and r1.time_batching_s > 0
    m2 = make_model()
    r2 = train(m2, tr, va, cfg(max_epochs=4))
    assert r1.history == r2.history
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_early_stopping_with_patience():
    tr, va = make_data(64, seed=0), make_data(32, seed=1)
    stop_after = []
    r = train(make_model(), tr, va, cfg(max_epochs=6, lr=0.0), callbacks=[lambda row: stop_after.append(row["epoch"])])
    # with lr 0 nothing improves after epoch 0: stop after `patience` bad epochs
    assert r.stopped_early and r.best_epoch == 0 and r.epochs_run == 4 and stop_after == [0, 1, 2, 3]
    r = train(make_model(), tr, va, cfg(max_epochs=6), callbacks=[lambda row: row["epoch"] == 1])
    assert r.epochs_run == 2 and not r.stopped_early


def test_ema_weights_are_the_ones_evaluated_and_kept():
    from purchase_intent.train import predict_logits, valid_scores

    tr, va = make_data(128, seed=0), make_data(64, seed=1)
    m = make_model()
    r = train(m, tr, va, cfg(max_epochs=4, patience=0, ema_decay=0.9))
    kept = valid_scores(predict_logits(m, va), va["label"])  # the restored weights score as recorded
    assert kept["pr_auc"] == pytest.approx(r.best_metric)
    assert kept["log_loss"] == pytest.approx(r.history[r.best_epoch]["valid_log_loss"], rel=1e-6)
    plain = make_model()
    r_plain = train(plain, tr, va, cfg(max_epochs=4, patience=0))
    assert [h["valid_log_loss"] for h in r.history] != [h["valid_log_loss"] for h in r_plain.history]
    assert [h["train_loss"] for h in r.history] == [h["train_loss"] for h in r_plain.history]  # same raw steps


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_killed_run_resumes_to_the_same_result(tmp_path, ema_decay):
    tr, va = make_data(96, seed=0), make_data(32, seed=1)
    ref = make_model()
    r_ref = train(ref, tr, va, cfg(max_epochs=4, patience=0, ema_decay=ema_decay))
    calls = {"n": 0}

    def crashing_collate(data, idx):  # dies in the middle of the third epoch
        calls["n"] += 1
        if calls["n"] == 2 * 6 + 3 + 2 * 1:  # 6 train steps/epoch, one valid batch per epoch
            raise Crash("killed")
        return default_collate(data, idx)

    c = cfg(max_epochs=4, patience=0, checkpoint_dir=str(tmp_path), ema_decay=ema_decay)
    with pytest.raises(Crash):
        train(make_model(), tr, va, c, collate=crashing_collate)
    ckpt = tmp_path / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["epoch"] == 2
    resumed = make_model(seed=99)  # different init: everything must come from the checkpoint
    r = train(resumed, tr, va, c)
    assert [h["train_loss"] for h in r.history] == pytest.approx([h["train_loss"] for h in r_ref.history], abs=1e-6)
    assert r.best_epoch == r_ref.best_epoch and r.steps == r_ref.steps
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    assert not list(tmp_path.glob("*.tmp"))
    other = cfg(max_epochs=4, patience=0, checkpoint_dir=str(tmp_path), ema_decay=0.5 if ema_decay == 0 else 0.0)
    with pytest.raises(ValueError, match="ema_decay"):  # a checkpoint never resumes under other averaging
        train(make_model(), tr, va, other)


def test_calibration_recovers_scaling():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    assert fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.05)
    a, b = fit_platt(0.5 * z - 1.0, y)
    assert a == pytest.approx(2.0, rel=0.05) and b == pytest.approx(2.0, rel=0.1)
    cal = fit_calibrator(3 * z, y, "temperature")
    assert Calibrator.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    np.testing.assert_allclose(cal.transform(3 * z), 1 / (1 + np.exp(-z)), atol=0.02)
    assert fit_calibrator(z, np.zeros_like(y)).method == "none"
    with pytest.raises(ValueError):
        fit_calibrator(z, y, "isotonic-ish")
