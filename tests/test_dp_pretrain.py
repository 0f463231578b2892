"""Differentially private pretraining (`pretrain --param dp_epsilon=E`): the accountant's ε is at most
the requested one and lands in the encoder's config.json, budgets the data cannot give (and the
contrastive objective, which mixes users) are refused before training in one line, each user's loss
depends on their own sequence only, and a model on a DP encoder says that it is not DP itself."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import csv_workspace

from purchase_intent import pipeline
from purchase_intent.cli import main
from purchase_intent.config import LabelConfig, TrainConfig
from purchase_intent.dp import PrivacyBudgetError
from purchase_intent.models.dp_pretraining import _PARTS
from purchase_intent.models.pretraining import load_encoder, make_objective
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.pretrain import PRETRAINED_RUN, PretrainConfig, pretrain
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

SMALL = dict(preset="tiny", max_seq_len=20, seed=0, dp_users_per_step=64, dp_epochs=1)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("dp_pretrain")
    write_events(SimConfig(n_users=400, days=28, seed=3), root / "shop.csv")
    return csv_workspace(root / "ws", root / "shop.csv", LabelConfig(lookback="7d", horizon="3d", step="3d"))


@pytest.fixture(scope="module")
def dp_encoder(ws) -> Path:
    torch.set_num_threads(1)
    return pretrain(ws, PretrainConfig(objective="masked", dp_epsilon=4.0, **SMALL))


def test_the_accountant_epsilon_is_at_most_the_requested_and_is_recorded(dp_encoder):
    meta = json.loads((dp_encoder / "config.json").read_text())
    p = meta["privacy"]
    assert p["unit"] == "user" and p["objective"] == "masked" and p["epsilon_target"] == 4.0
    assert 0.9 * 4.0 <= p["epsilon"] <= 4.0  # calibrated to the budget, never above it
    assert p["delta"] == pytest.approx(1 / meta["n_users"])  # default delta: 1 / users pretrained on
    assert p["noise_multiplier"] > 0 and p["steps"] >= 1 and p["config"]["examples_per_user"] == 1
    assert "price" not in meta["fields"] and meta["pretrain_config"]["dropout"] == 0.0  # no data-fitted edges
    net, _ = load_encoder(dp_encoder)
    assert all(torch.isfinite(t).all() for t in net.state_dict().values())


@pytest.mark.parametrize("objective", ["next"])
def test_next_event_objective_also_trains_within_budget(ws, tmp_path, objective):
    w = Workspace(tmp_path / "ws")
    shutil.copytree(ws.root, w.root)
    out = pretrain(w, PretrainConfig(objective=objective, dp_epsilon=8.0, dp_delta=1e-4, **SMALL))
    p = json.loads((out / "config.json").read_text())["privacy"]
    assert p["epsilon"] <= 8.0 and p["delta"] == 1e-4 and p["objective"] == objective


@pytest.mark.parametrize("params, message", [
    (["dp_epsilon=0.05"], "cannot be met with"),  # far too few users for this budget
    (["dp_epsilon=0"], "dp_epsilon must be > 0"),
    (["dp_epsilon=3", "dp_delta=1"], "dp_delta must be in (0, 1)"),
    (["dp_delta=1e-5"], "given without dp_epsilon"),
    (["dp_epsilon=3", "dp_examples_per_user=2"], "unknown --param dp_examples_per_user"),
])
def test_budgets_the_data_cannot_give_are_refused_before_training(ws, tmp_path, capsys, params, message):
    w = tmp_path / "ws"
    shutil.copytree(ws.root, w)
    args = ["pretrain", "--workspace", str(w), "--preset", "tiny", "--max-seq-len", "20"]
    for p in params:
        args += ["--param", p]
    config = w / "runs" / PRETRAINED_RUN / "config.json"
    before = config.read_bytes() if config.exists() else None
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert (config.read_bytes() if config.exists() else None) == before  # no encoder written or replaced


def test_the_contrastive_objective_is_refused_with_dp(ws, tmp_path, capsys):
    w = tmp_path / "ws"
    shutil.copytree(ws.root, w)
    assert main(["pretrain", "--workspace", str(w), "--objective", "contrastive", "--param", "dp_epsilon=8"]) == 1
    err = capsys.readouterr().err
    assert "contrastive objective cannot be pretrained with differential privacy" in err and err.count("\n") == 1
    with pytest.raises(PrivacyBudgetError):
        pretrain(w, PretrainConfig(objective="masked", dp_epsilon=0.01, **SMALL))


@pytest.mark.parametrize("objective", ["masked", "next"])
def test_each_users_loss_depends_on_their_own_sequence_only(objective):
    """Per-user clipping bounds a user's contribution only if their row's loss reads no other row:
    changing one user's events leaves every other user's loss as it was."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    B, T = 6, 12
    sizes = {"event": 8, "category": 16, "dt_prev": 10}
    mask = np.zeros((B, T), dtype=bool)
    for i, n in enumerate([12, 7, 3, 1, 9, 5]):
        mask[i, T - n:] = True
    data = {f: (rng.integers(1, s, (B, T)) * mask).astype(np.int64) for f, s in sizes.items()}
    data["mask"] = mask
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=T, dropout=0.0,
                                      use_tabular=False, n_tabular=0)).eval()
    obj = make_objective(objective, net).eval()
    collate_fn, loss_fn = _PARTS[objective]
    torch.manual_seed(1)
    batch = collate_fn(data, np.arange(B))
    base = loss_fn(obj, batch).detach()
    assert base.shape == (B,) and torch.isfinite(base).all()
    changed = {k: v.clone() for k, v in batch.items()}
    for k in ("tokens", "target"):
        changed[k][0] = (changed[k][0] + 1) % 4 + 1  # another history for user 0
    after = loss_fn(obj, changed).detach()
    assert not torch.allclose(after[0], base[0])
    assert torch.allclose(after[1:], base[1:], atol=1e-6)
    alone = torch.stack([loss_fn(obj, {k: v[i:i + 1] for k, v in batch.items()})[0] for i in range(B)]).detach()
    assert torch.allclose(alone, base, atol=1e-5)  # a row's loss is the same read alone (as vmap reads it)


def test_a_model_on_a_dp_encoder_says_it_is_not_dp_itself(ws, dp_encoder):
    run = pipeline.train("lightgbm_emb", params={"encoder": str(dp_encoder), "n_estimators": 20},
                         train_cfg=TrainConfig(min_positives=1, min_negatives=1), workspace=ws, quiet=True)
    meta = json.loads((run / "run.json").read_text())
    assert "privacy" not in meta
    enc = meta["encoder_privacy"]
    assert enc["encoder"]["epsilon"] <= 4.0 and "not differentially private" in enc["released_model"]


def test_pretrain_params_reach_the_config_from_run_too():
    from purchase_intent.cli import build_parser
    from purchase_intent.commands import _pretrain_cfg
    a = build_parser().parse_args(["run", "--pretrain", "--pretrain-param", "dp_epsilon=3",
                                   "--pretrain-param", "dp_delta=1e-6"])
    cfg = _pretrain_cfg(a, "pretrain-", seed=0)
    assert cfg.dp_epsilon == 3 and cfg.dp_delta == 1e-6


def test_pretrain_params_without_pretrain_are_refused_in_one_line(tmp_path, capsys):
    from purchase_intent.cli import main
    rc = main(["--workspace", str(tmp_path / "ws"), "run", "--data", str(tmp_path / "none.csv"),
               "--pretrain-param", "dp_epsilon=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "add --pretrain" in err[0]
    assert not (tmp_path / "ws").exists()  # refused before any work
