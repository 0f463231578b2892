"""Fine-tuning recipes of ``transformer_pt``: the encoder's lr factor (and its layer-wise decay), a linear
probe before the fine-tune (``freeze_epochs``), re-initialised top blocks, and their validation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import csv_workspace

from purchase_intent import train as train_mod
from purchase_intent.models import MODELS
from purchase_intent.models import pretrained as pretrained_mod
from purchase_intent.models.pretraining import load_encoder
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.pretrain import PretrainConfig, pretrain
from purchase_intent.runs import load_built, model_inputs
from purchase_intent.sequences import SequenceVocab
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.train import TrainLoopConfig, make_optimizer
from purchase_intent.workspace import Workspace

ENCODER = ("embed.", "pos.", "cls", "blocks.", "ln_f.", "pool.")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    shop = tmp_path_factory.mktemp("shop") / "shop.csv.gz"
    write_events(SimConfig(n_users=300, days=42, seed=3), shop)
    return csv_workspace(tmp_path_factory.mktemp("ws"), shop)


@pytest.fixture(scope="module")
def encoder(ws) -> Path:
    return pretrain(ws, PretrainConfig(objective="masked", preset="tiny", max_seq_len=20, epochs=1,
                                       batch_size=64, seed=0))


@pytest.fixture(scope="module")
def data(ws, encoder):
    built = load_built(ws)
    vocab = SequenceVocab.from_dict(json.loads((encoder / "config.json").read_text())["vocab"])
    tr, va = np.flatnonzero(built.mask("train"))[:300], np.flatnonzero(built.mask("valid"))
    y = built.examples["label"].to_numpy()
    return (model_inputs("transformer_pt", built, tr, ws, vocab), y[tr],
            model_inputs("transformer_pt", built, va, ws, vocab), y[va], vocab)


def _encoder_state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith(ENCODER)}


def _record_train(monkeypatch):
    """Wrap the train loop that transformer_pt calls: each call's config, its optimizer, which
    parameters were trainable, and the encoder's weights before and after."""
    calls = []
    real_train, real_opt = pretrained_mod.train, train_mod.make_optimizer

    def make_opt(model, cfg):
        opt = real_opt(model, cfg)
        if calls:
            calls[-1]["opt"] = opt
        return opt

    def wrapped(net, train_data, valid_data, cfg, **kw):
        calls.append({"cfg": cfg, "before": _encoder_state(net),
                      "trainable": {n for n, p in net.named_parameters() if p.requires_grad},
                      "head_before": net.head[0].weight.detach().clone()})
        res = real_train(net, train_data, valid_data, cfg, **kw)
        calls[-1].update(after=_encoder_state(net), head_after=net.head[0].weight.detach().clone())
        return res

    monkeypatch.setattr(pretrained_mod, "train", wrapped)
    monkeypatch.setattr(train_mod, "make_optimizer", make_opt)
    return calls


def _fit(data, encoder, **params):
    Xtr, ytr, Xva, yva, vocab = data
    return MODELS["transformer_pt"](encoder=str(encoder), vocab=vocab, batch_size=128, random_state=0,
                                    **params).fit(Xtr, ytr, Xva, yva)


def test_optimizer_groups_carry_the_encoders_layer_wise_lr_factors():
    net = BehaviourTransformer(preset("tiny", field_sizes={"event": 5, "category": 7}, n_tabular=3, max_seq_len=8))
    clf = MODELS["transformer_pt"](encoder_lr_scale=0.1, layer_lr_decay=0.5)
    cfg = TrainLoopConfig(lr=1e-3, lr_scales=clf.lr_scales(net.cfg.n_layers))
    opt = make_optimizer(net, cfg)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    expect = {"embed.weight": 0.025, "pos.weight": 0.025, "cls": 0.025, "blocks.0.qkv.weight": 0.05,
              "blocks.1.fc.bias": 0.1, "ln_f.weight": 0.1, "pool.1.weight": 0.1, "head.0.weight": 1.0,
              "tab_mlp.0.weight": 1.0, "wide.weight": 1.0}
    params = dict(net.named_parameters())
    for name, scale in expect.items():
        g = group_of[id(params[name])]
        assert g["lr_scale"] == pytest.approx(scale) and g["lr"] == pytest.approx(1e-3 * scale), name
    assert group_of[id(params["blocks.0.qkv.weight"])]["weight_decay"] == cfg.weight_decay
    assert group_of[id(params["blocks.0.ln1.weight"])]["weight_decay"] == 0.0
    assert len(group_of) == len(params)  # every parameter in exactly one group
    plain = make_optimizer(net, TrainLoopConfig())  # no factors: the two groups of before
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]
    with pytest.raises(ValueError, match="lr_scales must be positive"):
        make_optimizer(net, TrainLoopConfig(lr_scales={"blocks.": 0.0}))


def test_the_encoders_lr_is_scaled_through_the_whole_schedule(data, encoder, monkeypatch):
    calls = _record_train(monkeypatch)
    m = _fit(data, encoder, max_epochs=1, encoder_lr_scale=0.1)
    (call,) = calls
    params = dict(m.model_.named_parameters())
    group_of = {id(p): g for g in call["opt"].param_groups for p in g["params"]}
    head_lr = group_of[id(params["head.0.weight"])]["lr"]
    assert head_lr > 0
    for name in ("embed.weight", "blocks.0.qkv.weight", "blocks.1.fc_out.weight", "pool.1.weight"):
        assert group_of[id(params[name])]["lr"] == pytest.approx(0.1 * head_lr), name  # the last step's lr
    assert m.loop_config_.lr_scales["blocks.0."] == pytest.approx(0.1)


def test_frozen_epochs_keep_the_encoder_and_later_epochs_move_it(data, encoder, monkeypatch):
    enc, _ = load_encoder(encoder)
    pretrained = {k: v for k, v in enc.state_dict().items() if k.startswith(("blocks.", "embed."))}
    calls = _record_train(monkeypatch)
    m = _fit(data, encoder, max_epochs=3, freeze_epochs=1, patience=0)
    probe, tune = calls
    assert probe["cfg"].max_epochs == 1 and tune["cfg"].max_epochs == 2
    assert not any(n.startswith(ENCODER) for n in probe["trainable"])  # the probe: head and tabular branch only
    assert "head.0.weight" in probe["trainable"] and not torch.equal(probe["head_before"], probe["head_after"])
    for k, v in pretrained.items():
        assert torch.equal(probe["before"][k], v) and torch.equal(probe["after"][k], v), k
    assert all(n in tune["trainable"] for n in ("embed.weight", "blocks.0.qkv.weight"))
    moved = [k for k in pretrained if not torch.equal(tune["after"][k], tune["before"][k])]
    assert "blocks.0.qkv.weight" in moved and "embed.weight" in moved
    hist = m.train_result_["history"]
    assert [r["stage"] for r in hist] == ["probe", "finetune", "finetune"] and [r["epoch"] for r in hist] == [0, 1, 2]
    assert m.train_result_["epochs_run"] == 3 and 0 <= m.train_result_["best_epoch"] <= 2
    assert all(p.requires_grad for p in m.model_.parameters())


def test_reinit_layers_loads_the_lower_blocks_only(data, encoder, monkeypatch):
    enc, _ = load_encoder(encoder)
    ref = enc.state_dict()
    calls = _record_train(monkeypatch)
    _fit(data, encoder, max_epochs=1, reinit_layers=1)
    before = calls[0]["before"]
    assert torch.equal(before["blocks.0.qkv.weight"], ref["blocks.0.qkv.weight"])
    assert torch.equal(before["embed.weight"], ref["embed.weight"])
    assert not torch.equal(before["blocks.1.qkv.weight"], ref["blocks.1.qkv.weight"])
    assert not torch.equal(before["pool.1.weight"], ref["pool.1.weight"])
    with pytest.raises(ValueError, match="reinit_layers=3 but the encoder has 2 blocks"):
        _fit(data, encoder, max_epochs=1, reinit_layers=3)


@pytest.mark.parametrize("param, message", [
    ("encoder_lr_scale=0", "encoder_lr_scale must be a number in (0, 1], got 0"),
    ("encoder_lr_scale=1.5", "encoder_lr_scale must be a number in (0, 1], got 1.5"),
    ("layer_lr_decay=fast", "layer_lr_decay must be a number in (0, 1], got 'fast'"),
    ("freeze_epochs=-1", "freeze_epochs must be an integer >= 0, got -1"),
    ("freeze_epochs=1.5", "freeze_epochs must be an integer >= 0, got 1.5"),
    ("reinit_layers=true", "reinit_layers must be an integer >= 0, got True"),
    ("freeze_epochs=12", "freeze_epochs=12 leaves no epoch to fine-tune in max_epochs=12"),
])
def test_bad_fine_tuning_settings_are_one_line_before_any_work(ws, encoder, capsys, param, message):
    from purchase_intent.cli import main
    runs = sorted(p.name for p in (ws.root / "runs").iterdir())
    assert main(["train", "--workspace", str(ws.root), "--model", "transformer_pt", "--param", param]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in (ws.root / "runs").iterdir()) == runs  # no run written


def test_freeze_epochs_with_a_frozen_encoder_is_refused(data, encoder):
    with pytest.raises(ValueError, match="give one of them"):
        _fit(data, encoder, freeze_encoder=True, freeze_epochs=2)


def test_a_probe_then_fine_tune_resumes_from_its_checkpoints_to_the_same_model(data, encoder, tmp_path):
    Xva = data[2]
    first = _fit(data, encoder, max_epochs=2, freeze_epochs=1, patience=0, checkpoint_dir=str(tmp_path))
    assert (tmp_path / "probe" / "checkpoint.safetensors").exists()
    assert (tmp_path / "finetune" / "checkpoint.safetensors").exists()
    again = _fit(data, encoder, max_epochs=2, freeze_epochs=1, patience=0, checkpoint_dir=str(tmp_path))
    np.testing.assert_allclose(again.predict_proba(Xva), first.predict_proba(Xva), atol=1e-6)
    assert again.train_result_["history"] == first.train_result_["history"]
