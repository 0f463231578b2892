"""Pretraining of the sequence encoder, its leakage guard, and the two models that use it."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import add_events_at, copy_workspace, csv_workspace
from safetensors.torch import load_file

from purchase_intent import pipeline
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
from purchase_intent.models import MODELS, PRETRAINED_MODELS, SEQUENCE_MODELS, load_model
from purchase_intent.models.classifier import collate
from purchase_intent.models.pretraining import (
    MASK_RATE,
    OBJECTIVES,
    crop,
    embed,
    encode_by_length,
    length_batches,
    length_groups,
    load_encoder,
    make_objective,
    pretrain_encoder,
    token_states,
)
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.pretrain import PretrainConfig, evaluation_cutoff, pretrain
from purchase_intent.runs import load_built, load_run, model_inputs
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.train import TrainLoopConfig
from purchase_intent.workspace import Workspace

TINY = dict(preset="tiny", max_seq_len=20, epochs=1, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shop") / "shop.csv.gz"
    write_events(SimConfig(n_users=500, days=49, seed=5), path)
    return path


@pytest.fixture(scope="module")
def ws(shop, tmp_path_factory) -> Workspace:
    return csv_workspace(tmp_path_factory.mktemp("ws"), shop)


@pytest.fixture(scope="module")
def encoder(ws) -> Path:
    return pretrain(ws, PretrainConfig(objective="masked", **TINY))


def _batches(ws, n=128):
    con = ws.connect()
    from purchase_intent.sequences import SequenceConfig, build_sequences
    con.execute("CREATE TABLE ex AS SELECT (row_number() OVER (ORDER BY user_id) - 1)::BIGINT AS example_id, "
                "user_id, (SELECT max(ts) FROM events) AS cutoff FROM (SELECT DISTINCT user_id FROM events)")
    a = build_sequences(con, "ex", SequenceConfig(max_seq_len=20), times=True)
    fields = ["event", "category", "dt_cutoff", "dt_prev", "hour"]
    data = {f: a[f][:n] for f in fields}
    data["mask"] = a["mask"][:n]
    data["us_cut"] = a["us_cut"][:n]
    return data, {f: int(a[f].max()) + 1 for f in fields}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_reduce_their_loss(ws, objective):
    data, sizes = _batches(ws)
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=20, use_tabular=False, dropout=0.0))
    obj = make_objective(objective, net)
    batch = collate(data, np.arange(len(data["mask"])))

    def loss():
        torch.manual_seed(123)  # the same masks / crops before and after
        with torch.no_grad():
            return float(obj(batch))

    before = loss()
    pretrain_encoder(obj, data, TrainLoopConfig(max_epochs=5, batch_size=32, lr=3e-3, seed=0, warmup_frac=0.05))
    after = loss()
    assert after < before * 0.97, (objective, before, after)


def _synthetic(n=96, T=30, seed=0):
    """Right-aligned random histories of 1..T events over a few small fields."""
    rng = np.random.default_rng(seed)
    sizes = {"event": 6, "category": 40, "dt_prev": 12, "hour": 25}
    lengths = rng.integers(1, T + 1, size=n)
    mask = np.arange(T)[None, :] >= T - lengths[:, None]
    data = {f: (rng.integers(1, s, size=(n, T)) * mask).astype(np.int16) for f, s in sizes.items()}
    data["mask"] = mask
    gaps = rng.exponential(2 * 86_400e6, size=(n, T)).astype(np.int64)  # µs between events, newest on the right
    data["us_cut"] = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1] * mask
    return data, sizes


def test_length_batches_cover_every_row_once_per_epoch_and_follow_the_seed():
    lengths = np.random.default_rng(1).integers(1, 200, size=1000)
    for n, bs, chunk in ((1000, 50, 4), (1000, 64, 50), (7, 2, 1)):
        batches = length_batches(lengths[:n], bs, np.random.default_rng(3), chunk=chunk)
        rows = np.concatenate(batches)
        assert len(batches) == n // bs and all(len(b) == bs and np.all(np.diff(b) > 0) for b in batches)
        assert len(np.unique(rows)) == len(rows) == (n // bs) * bs and rows.max() < n  # no row twice
        if n % bs == 0:
            assert np.array_equal(np.sort(rows), np.arange(n))  # every row exactly once
        again = length_batches(lengths[:n], bs, np.random.default_rng(3), chunk=chunk)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        other = length_batches(lengths[:n], bs, np.random.default_rng(4), chunk=chunk)
        assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    # similar lengths within a batch: the padded width (longest of the batch) shrinks
    batches = length_batches(lengths, 50, np.random.default_rng(0), chunk=20)
    random = np.random.default_rng(0).permutation(1000).reshape(20, 50)
    assert sum(lengths[b].max() for b in batches) < 0.6 * sum(lengths[b].max() for b in random)


def test_bucketed_pretraining_is_seeded_and_reads_fewer_tokens():
    data, sizes = _synthetic()
    cfg = TrainLoopConfig(max_epochs=2, batch_size=16, seed=0)

    def run(objective, **kw):
        torch.manual_seed(0)
        net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False))
        res = pretrain_encoder(make_objective(objective, net), data, cfg, **kw)
        return res, net.state_dict()

    a, wa = run("masked", bucket=True)
    b, wb = run("masked", bucket=True)
    c, _ = run("masked")
    assert a.bucketed and not c.bucketed and a.steps == c.steps == 2 * (96 // 16)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.tokens < 0.8 * c.tokens and a.history == b.history and np.isfinite(a.history).all()
    for objective in ("contrastive", "next"):
        assert np.isfinite(run(objective, bucket=True)[0].history).all()
    threads = torch.get_num_threads()
    d, _ = run("masked", num_threads=1)
    assert torch.get_num_threads() == threads and d.steps == a.steps  # restored afterwards


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_reading_a_batch_in_length_groups_gives_the_loss_of_the_whole_batch(objective):
    data, sizes = _synthetic()
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False, dropout=0.0))
    obj = make_objective(objective, net)
    batch = collate(data, np.arange(64))
    losses = []
    for groups in (1, 3, 4, 64):
        obj.groups = groups
        torch.manual_seed(9)  # the same masks / crops
        with torch.no_grad():
            losses.append(float(obj(batch)))
    assert losses == pytest.approx([losses[0]] * 4, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(encode_by_length(net, batch, 5), net.encode(batch), rtol=1e-5, atol=1e-5)
    groups = length_groups(batch["mask"], 4)
    n = batch["mask"].sum(dim=1)
    assert torch.equal(torch.sort(torch.cat(groups)).values, torch.arange(64))
    assert all(int(n[g].max()) <= int(n[h].min()) for g, h in zip(groups, groups[1:]))  # shortest first


@pytest.mark.parametrize("objective", ["masked", "next"])
def test_the_loss_over_its_expected_count_is_the_mean_loss_for_an_average_batch(objective):
    data, sizes = _synthetic()
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False, dropout=0.0))
    obj = make_objective(objective, net)
    batch = collate(data, np.arange(40))
    mask = batch["mask"]
    torch.manual_seed(5)
    with torch.no_grad():
        mean = float(obj(batch))
    if objective == "masked":
        torch.manual_seed(5)
        count = int(((torch.rand(mask.shape) < MASK_RATE) & mask).sum())  # the events forward() masks
    else:
        count = int((mask.sum(dim=1) >= 2).sum())
    torch.manual_seed(5)
    with torch.no_grad():
        assert float(obj(batch, norm=count)) == pytest.approx(mean, rel=1e-5)
    lengths = data["mask"].sum(axis=1)
    expected = obj.expected_targets(lengths, 40)
    assert expected == pytest.approx(MASK_RATE * 40 * lengths.mean() if objective == "masked"
                                     else 40 * np.mean(lengths >= 2))


def test_token_states_of_chosen_rows_equal_all_states_then_chosen():
    data, sizes = _synthetic()
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("small", field_sizes=sizes, max_seq_len=30, use_tabular=False, dropout=0.0))
    batch = collate(data, np.arange(64))
    rows = (torch.rand(batch["mask"].shape) < 0.2) & batch["mask"]
    w = torch.randn(int(rows.sum()), net.cfg.d_model)
    full = token_states(net, batch)[rows]
    g_full = torch.autograd.grad((full * w).sum(), list(net.blocks.parameters()))
    part = token_states(net, batch, rows=rows)
    g_part = torch.autograd.grad((part * w).sum(), list(net.blocks.parameters()))
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_crops_drop_all_padding_columns_without_changing_the_summary():
    data, sizes = _synthetic()
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False)).eval()
    batch = collate(data, np.arange(32))
    n = batch["mask"].sum(dim=1)
    first = batch["mask"].shape[1] - n
    length = torch.clamp(n // 2, min=1)
    start = first + (n - length) // 2
    c = crop(batch, start, length)
    W = c["mask"].shape[1]
    assert W == int(length.max()) and torch.equal(c["mask"].sum(dim=1), length)
    T = batch["mask"].shape[1]
    padded = {"tokens": torch.cat([c["tokens"].new_zeros(32, T - W, c["tokens"].shape[2]), c["tokens"]], dim=1),
              "mask": torch.cat([c["mask"].new_zeros(32, T - W), c["mask"]], dim=1)}
    with torch.no_grad():
        torch.testing.assert_close(net.encode(c), net.encode(padded), rtol=1e-5, atol=1e-5)
    for b in range(32):  # each crop holds its own events, right-aligned
        src = batch["tokens"][b, int(start[b]):int(start[b] + length[b])]
        assert torch.equal(c["tokens"][b, W - int(length[b]):], src)


def test_embed_in_length_order_equals_embed_in_row_order():
    data, sizes = _synthetic(n=200)
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False))
    net.train()
    ref = embed(net, data, batch_size=200, sort=False)
    got = embed(net, data, batch_size=16)
    assert net.training and got.shape == (200, net.cfg.d_model)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(embed(net, data, batch_size=7, num_threads=1), ref, atol=1e-5)
    np.testing.assert_allclose(embed(net, data, num_threads=1), ref, atol=1e-5)


def test_pretrain_writes_a_loadable_encoder_with_the_cutoff(ws, encoder):
    meta = json.loads((encoder / "config.json").read_text())
    built = load_built(ws)
    first_test = pd.Timestamp(built.examples.loc[built.examples["split"] == "test", "cutoff"].min())
    expected = first_test.tz_convert("UTC").tz_localize(None) if first_test.tzinfo else first_test
    assert pd.Timestamp(meta["cutoff"]) == expected
    assert meta["pretrain_config"]["objective"] == "masked" and "price_edges" in meta["vocab"]
    assert "item" not in meta["fields"] and meta["n_users"] > 100
    net, _ = load_encoder(encoder)
    assert set(net.cfg.field_sizes) == set(meta["fields"]) and not net.cfg.use_tabular
    assert not list(encoder.glob("*.pkl"))


def test_backtest_cutoff_is_the_earliest_fold(ws):
    assert evaluation_cutoff(ws, backtest=2) < evaluation_cutoff(ws)


def test_events_after_the_cutoff_change_nothing_and_events_before_do(ws, shop, encoder, tmp_path):
    cut = pd.Timestamp(json.loads((encoder / "config.json").read_text())["cutoff"])
    ref = load_file(str(encoder / "model.safetensors"))
    after = copy_workspace(ws, tmp_path / "after")
    add_events_at(after, shop, str(cut), "late")  # at the cutoff: not before it
    add_events_at(after, shop, str(cut + pd.Timedelta(days=3)), "later")
    got = load_file(str(pretrain(after, PretrainConfig(objective="masked", **TINY), cutoff=cut.to_pydatetime())
                        / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    before = copy_workspace(ws, tmp_path / "before")
    add_events_at(before, shop, str(cut - pd.Timedelta(days=2)), "early")
    got = load_file(str(pretrain(before, PretrainConfig(objective="masked", **TINY), cutoff=cut.to_pydatetime())
                        / "model.safetensors"))
    assert not all(torch.equal(ref[k], got[k]) for k in ref)


def test_pretrain_on_an_empty_or_tiny_workspace_says_so(tmp_path, shop):
    with pytest.raises(RuntimeError, match="no events"):
        pretrain(Workspace(tmp_path / "empty"), PretrainConfig(**TINY))
    w = Workspace(tmp_path / "tiny")
    ev = pd.read_csv(shop)
    ev[ev["user_id"].isin(ev["user_id"].unique()[:3])].to_csv(tmp_path / "few.csv", index=False)
    pipeline.ingest(tmp_path / "few.csv", DataConfig(format="csv"), w, progress=False)
    with pytest.raises(ValueError, match=r"at least 8 users .* of 3 users"):
        pretrain(w, PretrainConfig(**TINY))


def test_registry_lists_the_pretrained_models():
    assert PRETRAINED_MODELS <= set(MODELS) and PRETRAINED_MODELS <= SEQUENCE_MODELS


def _inputs(ws, encoder):
    built = load_built(ws)
    vocab_meta = json.loads((encoder / "config.json").read_text())["vocab"]
    from purchase_intent.sequences import SequenceVocab
    vocab = SequenceVocab.from_dict(vocab_meta)
    tr, va = np.flatnonzero(built.mask("train")), np.flatnonzero(built.mask("valid"))
    y = built.examples["label"].to_numpy()
    return (model_inputs("transformer_pt", built, tr, ws, vocab), y[tr],
            model_inputs("transformer_pt", built, va, ws, vocab), y[va], vocab)


@pytest.mark.parametrize("name", ["transformer_pt", "lightgbm_emb"])
def test_pretrained_models_fit_predict_explain_save_load(ws, encoder, tmp_path, name):
    Xtr, ytr, Xva, yva, vocab = _inputs(ws, encoder)
    params = dict(encoder=str(encoder), vocab=vocab, random_state=0)
    if name == "transformer_pt":
        params.update(max_epochs=1, batch_size=256, freeze_encoder=True)
    else:
        params.update(n_estimators=30)
    model = MODELS[name](**params).fit(Xtr, ytr, Xva, yva)
    p = model.predict_proba(Xva)
    assert p.shape == (len(yva), 2) and np.all((p >= 0) & (p <= 1))
    c = model.contributions({k: v[:5] for k, v in Xva.items()}, n_steps=4)
    assert c.base.shape == (5,)
    if name == "lightgbm_emb":
        assert c.features.shape[1] == Xva["tabular"].shape[1] + len(model.embedding_names_)
        assert model.embedding_names_[0] == "history_embedding_0"
        names = [f"f{i}" for i in range(Xva["tabular"].shape[1])]
        frame = model.explain_frame({k: v[:5] for k, v in Xva.items()}, names)
        assert frame.shape == c.features.shape and frame.columns[-1] == model.embedding_names_[-1]
        logit = np.log(p[:5, 1] / p[:5, 0])
        np.testing.assert_allclose(c.total(), logit, atol=1e-6)  # exact TreeSHAP: terms sum to the logit
    model.save(tmp_path / "m")
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "m", moved)  # self-contained: the encoder folder is not read again
    enc_copy = tmp_path / "enc_gone"
    shutil.move(encoder, enc_copy)
    try:
        again = load_model(name, moved)
        np.testing.assert_allclose(again.predict_proba(Xva), p, atol=1e-5)
    finally:
        shutil.move(enc_copy, encoder)
    assert (moved / "encoder" / "model.safetensors").exists() and not list(moved.rglob("*.pkl"))


def test_frozen_encoder_keeps_the_pretrained_weights_and_fine_tuning_moves_them(ws, encoder):
    Xtr, ytr, Xva, yva, vocab = _inputs(ws, encoder)
    Xtr, ytr = {k: v[:300] for k, v in Xtr.items()}, ytr[:300]
    enc, _ = load_encoder(encoder)
    ref = enc.state_dict()["blocks.0.qkv.weight"]
    for freeze in (True, False):
        m = MODELS["transformer_pt"](encoder=str(encoder), vocab=vocab, max_epochs=1, batch_size=256,
                                     freeze_encoder=freeze).fit(Xtr, ytr, Xva, yva)
        same = torch.equal(m.model_.state_dict()["blocks.0.qkv.weight"], ref)
        assert same == freeze


def test_missing_and_incompatible_encoders_are_named(ws, encoder, tmp_path):
    Xtr, ytr, Xva, yva, vocab = _inputs(ws, encoder)
    for name in PRETRAINED_MODELS:
        with pytest.raises(FileNotFoundError, match="purchase-intent pretrain"):
            MODELS[name](encoder=str(tmp_path / "nope"), vocab=vocab).fit(Xtr, ytr, Xva, yva)
    with pytest.raises(ValueError, match="d_model=64 differs .* d_model=32"):
        MODELS["transformer_pt"](encoder=str(encoder), vocab=vocab, d_model=64).fit(Xtr, ytr, Xva, yva)
    other = dataclasses.replace(vocab, cfg=dataclasses.replace(vocab.cfg, category_buckets=500))
    for name in PRETRAINED_MODELS:
        with pytest.raises(ValueError, match="category"):
            MODELS[name](encoder=str(encoder), vocab=other).fit(Xtr, ytr, Xva, yva)
    no_hour = {k: v for k, v in Xtr.items() if k != "hour"}
    with pytest.raises(ValueError, match="hour"):
        MODELS["transformer_pt"](encoder=str(encoder), vocab=vocab).fit(no_hour, ytr, Xva, yva)


@pytest.mark.slow
def test_pipeline_trains_both_models_with_the_encoder_param(ws, encoder):
    for name in PRETRAINED_MODELS:
        extra = {"max_epochs": 1} if name == "transformer_pt" else {"n_estimators": 20}
        run = pipeline.train(name, params={"encoder": str(encoder), **extra},
                             train_cfg=TrainConfig(min_positives=5, min_negatives=5), workspace=ws, quiet=True)
        assert (run / "model" / "encoder" / "config.json").exists()
        loaded = load_run(run)
        assert type(loaded.model).__name__ in ("PretrainedTransformerClassifier", "EmbeddingLightGBMModel")


# ----------------------------------------------------------------------------- the pipeline and the CLI


def test_cli_pretrain_then_pretrained_runs_evaluate_score_explain_and_ensemble(ws, shop, tmp_path, capsys):
    """The user's path: `pretrain`, then `train --model transformer_pt|lightgbm_emb` (the encoder found in
    runs/pretrained), `evaluate --backtest`, `ensemble`, `score --reasons` and `explain` on each."""
    from purchase_intent.cli import main
    w = copy_workspace(ws, tmp_path / "ws")
    root = str(w.root)
    assert main(["pretrain", "--workspace", root, "--preset", "tiny", "--max-seq-len", "20", "--epochs", "1",
                 "--backtest", "1"]) == 0
    cfg = json.loads((w.run_dir("pretrained") / "config.json").read_text())
    assert pd.Timestamp(cfg["cutoff"]) == pd.Timestamp(evaluation_cutoff(w, backtest=1))
    small = {"lightgbm_emb": ["--param", "n_estimators=20"],
             "transformer_pt": ["--param", "max_epochs=1", "--param", "batch_size=256"]}
    for name, params in small.items():
        assert main(["train", "--workspace", root, "--model", name, *params]) == 0
        assert main(["evaluate", "--workspace", root, "--run", name, "--backtest", "1", "--n-boot", "50"]) == 0
        meta = json.loads((w.run_dir(name) / "run.json").read_text())
        assert meta["params"]["encoder"] == str(w.run_dir("pretrained"))
        # the run's vocab is the encoder's: each token means what it meant in pretraining
        assert load_run(name, w).vocab.to_dict() == cfg["vocab"]
    assert main(["ensemble", "--workspace", root, "--members", "lightgbm_emb,transformer_pt",
                 "--n-boot", "50"]) == 0
    # evaluating the ensemble again re-averages its members' predictions (it has no model of its own)
    assert main(["evaluate", "--workspace", root, "--run", "ensemble", "--n-boot", "50"]) == 0
    metrics = json.loads((w.run_dir("ensemble") / "metrics.json").read_text())
    assert [m["run"] for m in metrics["members"]] == ["lightgbm_emb", "transformer_pt"]
    assert "backtest" in metrics
    capsys.readouterr()
    for name in ("lightgbm_emb", "transformer_pt", "ensemble"):
        assert main(["score", "--workspace", root, "--run", name, "--reasons", "2", "--quiet"]) == 0, name
        out = capsys.readouterr().out
        scores = pd.read_parquet(re.findall(r"wrote (\S+)", out)[0])
        assert scores["reason_1"].notna().all() and scores["probability"].between(0, 1).all()
        user = scores["user_id"].iloc[0]
        assert main(["explain", "--workspace", root, "--run", name, "--user", user, "--json"]) == 0
        e = json.loads(capsys.readouterr().out)
        assert e["reasons"], name


def test_run_with_a_pretrained_model_and_no_encoder_asks_for_pretrain(ws, shop, tmp_path, capsys):
    from purchase_intent.cli import main
    w = copy_workspace(ws, tmp_path / "ws")  # without runs/: no encoder
    manifest = w.manifest_path.read_text()
    with pytest.raises(SystemExit, match="add --pretrain"):
        main(["run", "--workspace", str(w.root), "--data", str(shop), "--models", "lightgbm_emb"])
    assert w.manifest_path.read_text() == manifest  # refused before ingesting anything
    assert main(["train", "--workspace", str(w.root), "--model", "lightgbm_emb"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `purchase-intent pretrain` first" in err


def test_session_task_encoder_reads_no_event_of_a_test_session(shop, tmp_path):
    """Session task: a test session's cutoff lies inside the session, so the pretraining cutoff is the
    start of the earliest test session (of every backtest fold too), not its earliest cutoff."""
    from purchase_intent import splits
    w = csv_workspace(tmp_path / "ws", shop, LabelConfig(task="session", step="7d"))
    built = load_built(w)
    ex = built.examples
    test = ex[ex["split"] == "test"]
    t = pd.Timestamp(evaluation_cutoff(w))
    assert t == test["session_start"].min() < test["cutoff"].min()
    t2 = pd.Timestamp(evaluation_cutoff(w, backtest=2))
    for fold in splits.backtest_folds(ex, 2, built.label_cfg):
        assert (ex["session_start"][np.asarray(fold.test_mask)] >= t2).all()
    assert t2 < t


def test_the_future_objective_reads_only_events_before_tau_and_censors_by_time_alone():
    """Its prefix is the events strictly before a random tau, re-bucketed to tau; its purchase targets
    are events at or after tau within the horizon; a horizon past the pretraining cutoff is unknown,
    whatever happened inside it."""
    from purchase_intent.models.pretraining import FUTURE_HORIZONS, FutureEventsObjective
    from purchase_intent.sequences import SequenceConfig, time_edges
    from purchase_intent.vocabulary import EVENT_CODES

    data, sizes = _synthetic(n=200, T=30, seed=2)
    data["event"][:, -3:] = np.where(data["mask"][:, -3:], EVENT_CODES["purchase"], 0)  # recent purchases
    sizes = {**sizes, "dt_cutoff": 30}
    data["dt_cutoff"] = (data["mask"] * 3).astype(np.int16)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False, dropout=0.0))
    obj = FutureEventsObjective(net, time_edges(SequenceConfig()))
    batch = collate(data, np.arange(200))
    torch.manual_seed(1)
    d = obj.draw(batch)
    us, mask = batch["us_cut"], batch["mask"]
    c_tau = d["c_tau"]
    assert bool((d["before"] <= mask).all())
    assert bool((us[d["before"]] > c_tau[d["before"].nonzero()[:, 0]]).all())  # strictly before tau
    after = mask & ~d["before"]
    assert bool((us[after] <= c_tau[after.nonzero()[:, 0]]).all())
    assert bool((c_tau >= 0).all()) and bool((d["length"] == d["before"].sum(1)).all())
    for j, (_, h) in enumerate(FUTURE_HORIZONS):
        known = d["known"][:, j]
        assert torch.equal(known, c_tau >= h * 1_000_000)  # by time alone, not by outcome
        for b in range(200):  # the targets by hand
            ev = batch["event"][b]
            hit = bool(((ev == EVENT_CODES["purchase"]) & after[b] & (us[b] > c_tau[b] - h * 1_000_000)).any())
            assert bool(d["y"][b, j]) == hit
    assert 0 < int(d["known"].sum()) < d["known"].numel()  # both known and censored horizons occur
    assert 0 < float(d["y"][d["known"]].mean()) < 1
    # the encoder sees dt_cutoff measured to tau, bucketed as build_sequences buckets time to a cutoff
    dt = obj.prefix_tokens(batch, d)[:, :, list(sizes).index("dt_cutoff")]
    rows = d["before"].nonzero()[:, 0]
    secs = (us[d["before"]] - c_tau[rows]).numpy() / 1e6
    assert np.array_equal(dt[d["before"]].numpy(), 1 + np.searchsorted(time_edges(SequenceConfig()), secs, "right"))
    assert torch.equal(dt[~d["before"]], batch["dt_cutoff"][~d["before"]])
    assert torch.isfinite(obj(batch))


def test_future_pretraining_needs_event_times():
    data, sizes = _synthetic()
    del data["us_cut"]
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=30, use_tabular=False))
    with pytest.raises(ValueError, match="times=True"):
        make_objective("future", net)(collate(data, np.arange(8)))
