"""Transfer of a pretrained encoder across shops (``pretrain --init PATH``).

Shop A is a simulated CSV export; shop B another simulated shop (another seed) exported with other
column and event names, mapped back by its DataConfig, and without prices.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from purchase_intent import pipeline
from purchase_intent.config import DataConfig, LabelConfig
from purchase_intent.models.pretraining import load_encoder
from purchase_intent.models.transfer import TransferReport, field_transfer_reason, load_init
from purchase_intent.pretrain import PretrainConfig, evaluation_cutoff, pretrain
from purchase_intent.runs import load_built, load_run, model_inputs
from purchase_intent.sequences import SequenceVocab
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

TINY = dict(preset="tiny", max_seq_len=20, epochs=1, batch_size=64, seed=0)
LABELS = LabelConfig(lookback="14d", horizon="7d", step="7d")
B_COLUMNS = {"user_id": "visitor", "ts": "time", "event": "action", "item_id": "sku", "category": "department",
             "session_id": "visit"}
B_EVENTS = {"view": "pageview", "cart": "addtobasket", "remove_from_cart": "removefrombasket",
            "wishlist": "favourite", "purchase": "transaction"}


def _workspace(root: Path, csv: Path, data_cfg: DataConfig) -> Workspace:
    w = Workspace(root)
    pipeline.ingest(csv, data_cfg, w, progress=False)
    pipeline.build(LABELS, workspace=w, quiet=True)
    return w


@pytest.fixture(scope="module")
def shop_a(tmp_path_factory) -> tuple[Workspace, Path]:
    """Shop A, with its pretrained encoder."""
    root = tmp_path_factory.mktemp("shop_a")
    write_events(SimConfig(n_users=300, days=42, seed=5), root / "a.csv.gz")
    w = _workspace(root / "ws", root / "a.csv.gz", DataConfig(format="csv"))
    return w, pretrain(w, PretrainConfig(**TINY))


@pytest.fixture(scope="module")
def shop_b(tmp_path_factory) -> Workspace:
    """Shop B: other users, column names and event names; no price column."""
    root = tmp_path_factory.mktemp("shop_b")
    write_events(SimConfig(n_users=300, days=42, seed=6), root / "raw.csv.gz")
    ev = pd.read_csv(root / "raw.csv.gz").drop(columns=["price"])
    ev["event"] = ev["event"].map(B_EVENTS)
    ev.rename(columns=B_COLUMNS).to_csv(root / "b.csv", index=False)
    data_cfg = DataConfig(format="csv", mapping=B_COLUMNS, event_map={v: k for k, v in B_EVENTS.items()})
    return _workspace(root / "ws", root / "b.csv", data_cfg)


def _copy(w: Workspace, dst: Path) -> Workspace:
    shutil.copytree(w.root, dst, ignore=shutil.ignore_patterns("runs"))
    return Workspace(dst)


def _rows(folder: Path) -> dict[str, torch.Tensor]:
    """Each field's embedding rows and every other tensor of an encoder folder, by name."""
    state = load_file(str(folder / "model.safetensors"))
    sizes = json.loads((folder / "config.json").read_text())["transformer"]["field_sizes"]
    out, lo = {k: v for k, v in state.items() if k != "embed.weight"}, 0
    for f, n in sizes.items():
        out[f"embed.{f}"] = state["embed.weight"][lo:lo + n]
        lo += n
    return out


@pytest.fixture(scope="module")
def transferred(shop_a, shop_b, tmp_path_factory) -> tuple[Path, list[str]]:
    """B's encoder right after the transfer (0 epochs), copied out of B, and the log lines."""
    _, enc_a = shop_a
    lines: list[str] = []
    w = _copy(shop_b, tmp_path_factory.mktemp("b_epochs0") / "ws")
    out = pretrain(w, PretrainConfig(**{**TINY, "epochs": 0}, init=str(enc_a)), log=lines.append)
    return out, lines


def test_ingested_shop_b_has_the_canonical_events_and_no_prices(shop_b):
    ev = shop_b.connect().execute("SELECT event, count(*) AS n, count(price) AS priced FROM events GROUP BY 1").df()
    assert set(ev["event"]) == set(B_EVENTS) and ev["priced"].sum() == 0


def test_transfer_copies_what_keeps_its_meaning_and_reinitialises_price(shop_a, transferred):
    _, enc_a = shop_a
    enc_b, lines = transferred
    a, b = _rows(enc_a), _rows(enc_b)
    for name in ("blocks.0.qkv.weight", "blocks.0.proj.weight", "blocks.1.fc.weight", "cls", "ln_f.weight",
                 "pool.1.weight", "pos.weight", "embed.event", "embed.category", "embed.dt_cutoff", "embed.dt_prev",
                 "embed.hour", "embed.weekday", "embed.item_state"):
        assert torch.equal(a[name], b[name]), name
    assert set(a) == set(b)
    # A's 16 price buckets (+ padding) do not exist in B: a fresh table whose padding row adds nothing
    assert a["embed.price"].shape[0] > 2 and b["embed.price"].shape[0] == 2
    assert torch.all(b["embed.price"][0] == 0) and not torch.all(b["embed.price"][1] == 0)
    assert [x for x in lines if "re-initialised" in x] == ["price: re-initialised (this shop has no prices)"]
    assert not any(x.startswith(("note:", "preset:")) for x in lines)  # A's cutoff is B's; A is tiny
    assert any(x.startswith("transferred: event, category, ") and "blocks.1" in x for x in lines)
    meta_a = json.loads((enc_a / "config.json").read_text())
    meta = json.loads((enc_b / "config.json").read_text())
    init = meta["init"]
    assert init["path"] == str(enc_a.resolve()) and init["cutoff"] == meta_a["cutoff"]
    assert list(init["reinitialised"]) == ["price"] and "no prices" in init["reinitialised"]["price"]
    assert {"event", "category", "pos", "blocks.0", "blocks.1", "ln_f", "pool"} <= set(init["transferred"])
    assert meta["pretrain_config"]["init"] == str(enc_a) and meta["fields"] == meta_a["fields"]
    assert meta["transformer"] == {**meta_a["transformer"], "field_sizes": meta["transformer"]["field_sizes"]}
    assert meta["vocab"]["price_edges"] == [] and meta_a["vocab"]["price_edges"]
    assert meta["result"]["steps"] == 0


def test_without_init_the_encoder_of_b_shares_nothing_with_a(shop_a, shop_b, tmp_path):
    _, enc_a = shop_a
    out = pretrain(_copy(shop_b, tmp_path / "ws"), PretrainConfig(**{**TINY, "epochs": 0}))
    a, b = _rows(enc_a), _rows(out)
    for name in ("blocks.0.qkv.weight", "cls", "embed.event", "embed.category", "pos.weight"):
        assert not torch.equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text())["init"] is None


def test_d_model_without_init_sets_the_width(shop_b, tmp_path):
    out = pretrain(_copy(shop_b, tmp_path / "ws"), PretrainConfig(**{**TINY, "epochs": 0}, d_model=48))
    assert load_encoder(out)[0].cfg.d_model == 48
    with pytest.raises(ValueError, match="d_model=33 is not a multiple of the small preset's 2 heads"):
        pretrain(shop_b, PretrainConfig(**{**TINY, "preset": "small"}, d_model=33))


def test_continued_pretraining_on_b_moves_the_transferred_weights_and_keeps_b_cutoff(shop_a, shop_b, tmp_path):
    _, enc_a = shop_a
    w = _copy(shop_b, tmp_path / "ws")
    out = pretrain(w, PretrainConfig(**TINY, init=str(enc_a)))
    meta = json.loads((out / "config.json").read_text())
    assert pd.Timestamp(meta["cutoff"]) == pd.Timestamp(evaluation_cutoff(w))
    assert meta["result"]["steps"] > 0 and len(meta["result"]["loss_history"]) == 1
    assert not torch.equal(_rows(enc_a)["blocks.0.qkv.weight"], _rows(out)["blocks.0.qkv.weight"])


def test_equal_price_edges_transfer_everything_and_the_window_may_only_shorten(shop_a, tmp_path):
    w, enc_a = shop_a
    lines: list[str] = []
    out = pretrain(_copy(w, tmp_path / "ws"), PretrainConfig(**{**TINY, "epochs": 0, "max_seq_len": 12},
                                                             init=str(enc_a)), log=lines.append)
    a, b = _rows(enc_a), _rows(out)
    # every encoder tensor; the classification head (unused in pretraining) is no part of the encoder
    assert all(torch.equal(a[k], b[k]) for k in a if k != "pos.weight" and not k.startswith("head."))
    assert torch.equal(a["pos.weight"][:12], b["pos.weight"])
    assert json.loads((out / "config.json").read_text())["init"]["reinitialised"] == {}
    lines = []
    out = pretrain(_copy(w, tmp_path / "ws2"), PretrainConfig(**{**TINY, "epochs": 0, "max_seq_len": 80},
                                                              init=str(enc_a)), log=lines.append)
    assert load_encoder(out)[0].cfg.max_seq_len == 20
    assert "max_seq_len: 20, the init encoder's window (it may only shorten)" in lines


def test_the_init_encoders_architecture_is_kept(shop_a, shop_b, tmp_path):
    w, _ = shop_a
    small = pretrain(_copy(w, tmp_path / "a_small"), PretrainConfig(**{**TINY, "epochs": 0, "preset": "small"},
                                                                    cutoff="all"))
    lines: list[str] = []
    out = pretrain(_copy(shop_b, tmp_path / "b"), PretrainConfig(**{**TINY, "epochs": 0}, init=str(small)),
                   log=lines.append)
    meta = json.loads((out / "config.json").read_text())
    assert meta["pretrain_config"]["preset"] == "small" and meta["transformer"]["d_model"] == 64
    assert meta["transformer"]["mlp_ratio"] == json.loads((small / "config.json").read_text())["transformer"][
        "mlp_ratio"]
    assert "preset: small, the init encoder's (preset tiny is not used)" in lines
    # A read every event, past B's cutoff (the same dates): harmless across shops, a leak within one
    assert sum(x.startswith("note: the init encoder read events up to") for x in lines) == 1
    assert torch.equal(_rows(small)["blocks.1.fc_out.weight"], _rows(out)["blocks.1.fc_out.weight"])


def test_field_rules():
    a = SequenceVocab(price_edges=[1.0, 2.0])
    assert field_transfer_reason("price", a, SequenceVocab(price_edges=[1.0, 2.0]))[0]
    assert not field_transfer_reason("price", a, SequenceVocab(price_edges=[1.0, 3.0]))[0]
    assert field_transfer_reason("event", a, a, lacking=True) == (False, "this shop has no event tokens")
    other = SequenceVocab.from_dict({"cfg": {"category_buckets": 500}})
    ok, why = field_transfer_reason("category", a, other)
    assert not ok and "category_buckets 2000" in why
    assert TransferReport({"event": "x"}, {"price": "y"}).lines() == ["transferred: event",
                                                                      "price: re-initialised (y)"]


def test_missing_bad_and_incompatible_inits_are_named(shop_a, shop_b, tmp_path):
    _, enc_a = shop_a
    with pytest.raises(FileNotFoundError, match="give the runs/pretrained folder of another workspace"):
        pretrain(shop_b, PretrainConfig(**TINY, init=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a pretrained encoder"):
        load_init(tmp_path / "empty")
    wrong = tmp_path / "wrong"
    shutil.copytree(enc_a, wrong)
    (wrong / "config.json").write_text(json.dumps({**json.loads((enc_a / "config.json").read_text()), "kind": "x"}))
    with pytest.raises(ValueError, match="is not a usable pretrained encoder"):
        load_init(wrong)
    alien = tmp_path / "alien"  # a field this version has no token for
    shutil.copytree(enc_a, alien)
    meta = json.loads((enc_a / "config.json").read_text())
    sizes = meta["transformer"]["field_sizes"]
    meta["transformer"]["field_sizes"] = {("brand" if f == "hour" else f): n for f, n in sizes.items()}
    (alien / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"fields \['brand'\], which cannot be mapped"):
        pretrain(shop_b, PretrainConfig(**TINY, init=str(alien)))
    with pytest.raises(ValueError, match="d_model=64 differs from the init encoder .*'s d_model=32"):
        pretrain(shop_b, PretrainConfig(**TINY, init=str(enc_a), d_model=64))
    assert not shop_b.run_dir("pretrained").exists()  # refused before writing anything


def test_cli_pretrain_init_then_transformer_pt_in_b(shop_a, shop_b, tmp_path, capsys):
    from purchase_intent.cli import main
    _, enc_a = shop_a
    w = _copy(shop_b, tmp_path / "ws")
    root = str(w.root)
    assert main(["pretrain", "--workspace", root, "--init", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no init encoder at")
    assert main(["pretrain", "--workspace", root, "--init", str(enc_a), "--d-model", "64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d_model=64 differs" in err
    assert main(["pretrain", "--workspace", root, "--init", str(enc_a), "--max-seq-len", "20",
                 "--epochs", "0"]) == 0
    err = capsys.readouterr().err
    assert "price: re-initialised (this shop has no prices)" in err and "0 epochs" in err
    assert main(["train", "--workspace", root, "--model", "transformer_pt", "--param", "max_epochs=1",
                 "--param", "batch_size=256", "--param", "freeze_encoder=true",
                 "--min-positives", "5", "--min-negatives", "5"]) == 0
    run = load_run("transformer_pt", w)
    enc = w.run_dir("pretrained")
    assert run.vocab.to_dict() == json.loads((enc / "config.json").read_text())["vocab"]
    copied = json.loads((w.run_dir("transformer_pt") / "model" / "encoder" / "config.json").read_text())
    assert copied["init"]["path"] == str(enc_a.resolve())
    # the classifier of shop B reads shop A's attention weights (frozen here, so still equal)
    qkv = run.model.model_.state_dict()["blocks.0.qkv.weight"]
    assert torch.equal(qkv, _rows(enc_a)["blocks.0.qkv.weight"])
    built = load_built(w)
    test = np.flatnonzero(built.mask("test"))
    p = run.model.predict_proba(model_inputs("transformer_pt", built, test, w, run.vocab))
    assert p.shape == (len(test), 2) and ((p >= 0) & (p <= 1)).all()


def test_an_init_that_read_this_workspaces_own_events_past_its_cutoff_is_refused(shop_a, tmp_path):
    """Within one shop an init pretrained on every event has seen the test period: refused, nothing written;
    the same init before the cutoff, or from another shop's files, is fine."""
    w, enc_a = shop_a
    late = pretrain(_copy(w, tmp_path / "a_all"), PretrainConfig(**{**TINY, "epochs": 0}, cutoff="all"))
    here = _copy(w, tmp_path / "a_again")
    with pytest.raises(ValueError, match="has seen the test period"):
        pretrain(here, PretrainConfig(**{**TINY, "epochs": 0}, init=str(late)))
    assert not here.run_dir("pretrained").exists()
    assert json.loads((enc_a / "config.json").read_text())["cutoff"] == evaluation_cutoff(w).isoformat()
    assert pretrain(here, PretrainConfig(**{**TINY, "epochs": 0}, init=str(enc_a))).exists()  # A's own cutoff
