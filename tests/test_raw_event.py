"""The raw event name and the checkout event: stored by ingest, a token field of the sequence model,
and old workspaces and encoders (saved before either existed) still working as they did."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_events

from purchase_intent.config import DataConfig
from purchase_intent.events import ingest
from purchase_intent.features import compute_features
from purchase_intent.models.pretraining import embed, encoder_files, load_encoder
from purchase_intent.models.transformer import BehaviourTransformer, preset
from purchase_intent.sequences import SequenceConfig, SequenceVocab, build_sequences, stable_bucket
from purchase_intent.vocabulary import EVENT_CODES, OTHER_CODE
from purchase_intent.workspace import Workspace

CFG = SequenceConfig(max_seq_len=16)


def _examples(con) -> pd.DataFrame:
    users = [r[0] for r in con.execute("SELECT DISTINCT user_id FROM events ORDER BY 1").fetchall()]
    return pd.DataFrame({"example_id": np.arange(len(users), dtype=np.int64), "user_id": users,
                         "cutoff": pd.Timestamp("2024-03-25").as_unit("us")})


def _drop_raw_event(ws: Workspace) -> None:
    """Rewrite every part the way ingest wrote it before raw_event existed."""
    for part in ws.part_paths():
        con = duckdb.connect()
        con.execute(f"COPY (SELECT * EXCLUDE (raw_event) FROM read_parquet('{part}')) TO '{part}.tmp' (FORMAT parquet)")
        con.close()
        part.with_name(part.name + ".tmp").replace(part)


def test_ingest_keeps_the_raw_name_and_maps_checkout(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event\nu1,2024-03-01T10:00:00Z,pv\nu1,2024-03-01T10:01:00Z,checkout\n"
                    "u1,2024-03-01T10:02:00Z,Zoom In\nu1,2024-03-01T10:03:00Z, pay \n")
    r = ingest(tmp_path / "ws", [path], DataConfig(event_map={"pv": "view", "pay": "checkout"}), progress=False)
    assert r.accepted == 4 and r.unmapped == {"Zoom In": 1}
    df = Workspace(tmp_path / "ws").connect().sql("SELECT event, raw_event FROM events ORDER BY ts").df()
    assert df.values.tolist() == [["view", "pv"], ["checkout", "checkout"], ["other", "Zoom In"], ["checkout", "pay"]]


def test_raw_event_is_a_token_field_and_old_workspaces_read_it_as_the_event(tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "raw-event-test-key-0123456789")  # the same users in both
    events = make_tiny_events()
    events.to_csv(tmp_path / "a.csv", index=False)
    renamed = events.assign(event=events["event"].map({"view": "view_item"}).fillna(events["event"]))
    renamed.to_csv(tmp_path / "b.csv", index=False)
    ws_new = Workspace(tmp_path / "new")
    ingest(ws_new, [tmp_path / "b.csv"], DataConfig(event_map={"view_item": "view"}), progress=False)
    ws_old = Workspace(tmp_path / "old")
    ingest(ws_old, [tmp_path / "a.csv"], DataConfig(), progress=False)
    _drop_raw_event(ws_old)

    con_old = ws_old.connect()
    assert "raw_event" not in {r[0] for r in con_old.execute("DESCRIBE events").fetchall()}
    old = build_sequences(con_old, _examples(con_old), CFG)
    m = old["mask"]
    # no raw_event column: the raw name is the event itself
    codes = {stable_bucket(e, CFG.raw_event_buckets): EVENT_CODES[e] for e in events["event"].unique()}
    assert [codes[t] for t in old["raw_event"][m]] == old["event"][m].tolist()
    assert (old["raw_event"][~m] == 0).all()

    con_new = ws_new.connect()
    new = build_sequences(con_new, _examples(con_new), CFG)
    view = new["event"] == EVENT_CODES["view"]
    assert (new["raw_event"][view] == stable_bucket("view_item", CFG.raw_event_buckets)).all() and view.any()
    for f in ("event", "item", "category", "price", "dt_cutoff", "mask"):  # the same canonical tokens
        assert (old[f] == new[f]).all(), f

    # a workspace of old and new parts: the old rows read raw_event as their event
    ingest(ws_old, [tmp_path / "b.csv"], DataConfig(event_map={"view_item": "view"}), progress=False)
    con = ws_old.connect()
    both = con.sql("SELECT raw_event IS NULL AS old, count(*) FROM events GROUP BY ALL ORDER BY 1").fetchall()
    assert both == [(False, len(events)), (True, len(events))]
    mixed = build_sequences(con, _examples(con), CFG)
    assert mixed["mask"].sum() > 0


def test_checkout_is_counted_by_the_features(tmp_path):
    events = pd.DataFrame({"user_id": ["u1"] * 3, "ts": pd.to_datetime(["2024-03-01 10:00", "2024-03-01 10:01",
                                                                        "2024-03-01 10:02"]),
                           "event": ["view", "checkout", "checkout"], "item_id": ["i1"] * 3,
                           "category": ["c"] * 3, "price": [1.0] * 3, "session_id": ["s1"] * 3})
    con = duckdb.connect()
    con.register("events", events)
    con.register("examples", pd.DataFrame({"example_id": [0], "user_id": ["u1"],
                                           "cutoff": [pd.Timestamp("2024-03-02")]}))
    X = compute_features(con)
    assert X["n_checkout_all"].iloc[0] == 2 and X["n_checkout_1d"].iloc[0] == 2


def _old_encoder(tmp_path):
    """An encoder folder as pretrain wrote it before checkout and raw_event: 7 event rows, no raw_event."""
    vocab = SequenceVocab(price_edges=[1.0, 5.0])
    sizes = {f: n for f, n in vocab.field_sizes().items() if f not in ("raw_event", "item")}
    sizes["event"] = 7
    torch.manual_seed(0)
    net = BehaviourTransformer(preset("tiny", field_sizes=sizes, max_seq_len=12, use_tabular=False, n_tabular=0))
    old_vocab = vocab.to_dict()
    del old_vocab["cfg"]["raw_event_buckets"]
    d = tmp_path / "pretrained"
    d.mkdir()
    for name, blob in encoder_files(net, {"pretrain_config": {"preset": "tiny"}, "vocab": old_vocab}).items():
        (d / name).write_bytes(blob)
    return net.eval(), d


def test_an_old_encoder_loads_with_one_line_and_computes_what_it_did(tmp_path, capsys):
    old_net, d = _old_encoder(tmp_path)
    net, meta = load_encoder(d)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predates" in err and "checkout" in err and "raw_event" in err
    assert net.cfg.field_sizes["event"] == len(EVENT_CODES) + 1 and "raw_event" in net.cfg.field_sizes
    assert json.loads((d / "config.json").read_text())["transformer"]["field_sizes"]["event"] == 7  # file untouched
    assert meta["upgraded"]
    rng = np.random.default_rng(0)
    n, T = 40, 12
    data = {f: rng.integers(1, n_rows, (n, T)) for f, n_rows in net.cfg.field_sizes.items()}
    data["mask"] = np.ones((n, T), bool)
    data["mask"][:, :4] = False
    for f in net.cfg.field_sizes:
        data[f][~data["mask"]] = 0
    new_out = embed(net, data)
    # the old encoder saw no raw_event, and a checkout (code 7) clipped to its last row, other
    old_data = {f: np.minimum(data[f], n_rows - 1) for f, n_rows in old_net.cfg.field_sizes.items()}
    old_data["mask"] = data["mask"]
    assert (data["event"] == EVENT_CODES["checkout"]).any() and (old_data["event"] <= OTHER_CODE).all()
    np.testing.assert_allclose(new_out, embed(old_net, old_data), atol=1e-5)
    # a current encoder loads silently
    d2 = tmp_path / "current"
    d2.mkdir()
    for name, blob in encoder_files(net, {k: v for k, v in meta.items() if k not in ("kind", "transformer")}).items():
        (d2 / name).write_bytes(blob)
    load_encoder(d2)
    assert capsys.readouterr().err == ""


def test_pretrain_from_an_old_encoder_transfers_the_event_table(tmp_path):
    from purchase_intent.models.transfer import load_init, transfer_config, transfer_state

    _, d = _old_encoder(tmp_path)
    src, meta = load_init(d)
    vocab = SequenceVocab.from_dict(meta["vocab"])
    dst = BehaviourTransformer(transfer_config(src.cfg, 12, 0.0))
    report = transfer_state(src, meta, dst, vocab)
    assert "event" in report.transferred and "raw_event" in report.transferred
    assert torch.equal(dst.embed.weight, src.embed.weight)


@pytest.mark.parametrize("raw", [None, "begin_checkout"])
def test_the_api_event_takes_an_optional_raw_name(raw):
    pytest.importorskip("fastapi")
    from purchase_intent.serve.schemas import ScoreRequest
    from purchase_intent.serve.scoring import _event_columns

    ev = {"ts": "2024-03-01T10:00:00Z", "event": "checkout", **({"raw_event": raw} if raw else {})}
    req = ScoreRequest(user_id="u1", events=[ev])
    cols = _event_columns([req], ["pid"], {})
    assert cols["raw_event"] == [raw or "checkout"] and cols["event"] == ["checkout"]


def test_checkout_reads_as_a_sentence_in_explanations():
    from purchase_intent.reason_text import event_text, feature_text

    assert feature_text("n_checkout_7d", 2) == "went through a checkout step 2 times in the last 7 days"
    assert feature_text("ses_n_checkout", 0) == "went through no checkout step in this session so far"
    assert feature_text("hours_since_last_checkout", float("nan")) == "has never reached the checkout"
    assert event_text("checkout", 2, "i1") == "went to the checkout with item i1 2 hours ago"
