"""Encryption at rest: an encrypted workspace holds no shopper data in plaintext, scores as the plain one
does, and refuses a missing or wrong key before anything is read or written."""
from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from purchase_intent import memory, storage
from purchase_intent.cli import main
from purchase_intent.workspace import Workspace
from tests.conftest import make_tiny_events

KEY = "correct horse battery staple 0123456789"
WRONG = "wrong horse battery staple 9876543210"
SMALL = ["--min-positives", "1", "--min-negatives", "1"]  # the tiny log has few positives


def _events_csv(path: Path) -> dict[str, list[str]]:
    """The tiny log with tell-tale ids (found by a byte scan, never by chance), plus two rows ingest rejects."""
    df = make_tiny_events(n_users=40, days=21)
    df["user_id"] = "rawUSERqx" + df["user_id"].str[1:]
    df["item_id"] = "itemQJZ" + df["item_id"].str[1:].str.zfill(3)
    df["category"] = "catWVX" + df["category"].str[1:]
    df["session_id"] = "rawSESSqx" + df["session_id"]
    text = df.to_csv(index=False)
    text += "rawUSERqx99,not-a-time,view,itemQJZ999,catWVX9,1.0,rawSESSqx99\n"  # rejected: bad timestamp
    text += ",2024-03-02 10:00:00,view,itemQJZ998,catWVX8,1.0,rawSESSqx98\n"  # rejected: no user
    path.write_text(text)
    return {"items": sorted(set(df["item_id"])) + ["itemQJZ999", "itemQJZ998"],
            "categories": sorted(set(df["category"])) + ["catWVX9", "catWVX8"],
            "raw": sorted(set(df["user_id"])) + sorted(set(df["session_id"]))}


def _cli(*args: str) -> int:
    return main([*args])


def _pipeline(ws: Path, data: Path) -> None:
    assert _cli("--workspace", str(ws), "ingest", str(data), "--format", "csv") == 0
    assert _cli("--workspace", str(ws), "build", "--lookback", "7d", "--horizon", "3d", "--step", "3d") == 0
    assert _cli("--workspace", str(ws), "train", "--model", "logreg", *SMALL) == 0
    assert _cli("--workspace", str(ws), "evaluate", "--run", "logreg", "--n-boot", "20") == 0
    assert _cli("--workspace", str(ws), "score", "--run", "logreg", "--quiet") == 0


def _scores(ws: Path) -> pa.Table:
    (path,) = sorted((ws / "runs" / "logreg").glob("scores-*.parquet"))
    return storage.read_table(path).sort_by("user_id")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """An encrypted workspace (ingest, build, train, evaluate, score, report, forget) and a plain one with
    the same pseudonymisation key (ingest, build, train, evaluate, score)."""
    tmp = tmp_path_factory.mktemp("enc")
    data = tmp / "events.csv"
    ids = _events_csv(data)
    enc, plain = tmp / "enc-ws", tmp / "plain-ws"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
        mp.delenv("PURCHASE_INTENT_PSEUDONYM_KEY", raising=False)
        _pipeline(enc, data)
        enc_scores = _scores(enc)
        pseudonym_key = storage.read_text(enc / "pseudonym.key").strip()
        events = storage.read_table(sorted((enc / "events").glob("part-*.parquet"))[0])
        pseudonyms = sorted(set(events.column("user_id").to_pylist()) | set(events.column("session_id").to_pylist()))
        forgotten = enc_scores.column("user_id")[0].as_py()
        assert _cli("--workspace", str(enc), "report") == 0
        assert _cli("--workspace", str(enc), "forget", "--pseudonym", forgotten) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(storage.ENCRYPTION_KEY_ENV, raising=False)
        mp.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", pseudonym_key)
        _pipeline(plain, data)
        plain_scores = _scores(plain)
    return dict(enc=enc, plain=plain, data=data, ids=ids, pseudonyms=pseudonyms, enc_scores=enc_scores,
                plain_scores=plain_scores)


def test_encrypted_workspace_scores_as_the_plain_one(workspaces):
    enc, plain = workspaces["enc_scores"], workspaces["plain_scores"]
    assert enc.num_rows == plain.num_rows > 0
    assert enc.column("user_id").to_pylist() == plain.column("user_id").to_pylist()
    np.testing.assert_allclose(enc.column("probability").to_numpy(), plain.column("probability").to_numpy(),
                               rtol=0, atol=1e-9)  # DuckDB's threads sum floats in varying order


def test_no_file_of_the_encrypted_workspace_holds_an_id_in_plaintext(workspaces):
    ws, ids = workspaces["enc"], workspaces["ids"]
    needles = ids["items"] + ids["categories"] + ids["raw"] + workspaces["pseudonyms"]
    assert len(workspaces["pseudonyms"]) > 40
    files = [p for p in ws.rglob("*") if p.is_file()]
    kinds = {p.name.split("-")[0] for p in files}
    assert {"part", "examples.parquet", "features.parquet", "predictions.parquet", "scores", "erasure",
            "pseudonym.key", "encryption.json", "report.html"} <= kinds, kinds
    assert list((ws / "rejects").glob("*.csv")), "the rejected rows are kept (sealed)"
    leaks = []
    for p in files:
        data = p.read_bytes()
        leaks += [f"{p.relative_to(ws)}: {n}" for n in needles if n.encode() in data or n[:12].encode() in data]
        if p.suffix == ".parquet":
            assert data[:4] == data[-4:] == b"PARE", p  # footer and columns encrypted
    assert not leaks, leaks[:10]
    # the scan finds what it looks for: the plain workspace holds them (in the rejects, and some pseudonyms
    # even in its compressed Parquet)
    plain_bytes = b"".join(p.read_bytes() for p in workspaces["plain"].rglob("*") if p.is_file())
    assert b"itemQJZ999" in plain_bytes and b"catWVX9" in plain_bytes
    assert any(n.encode() in plain_bytes for n in workspaces["pseudonyms"])


def test_the_sealed_files_read_back_with_the_key(workspaces, monkeypatch):
    ws = workspaces["enc"]
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    (rejects,) = (ws / "rejects").glob("*.csv")
    text = storage.read_text(rejects)
    assert text.startswith("source_file,line,reason,raw") and "itemQJZ999" in text
    log = storage.read_text(ws / "erasure-log.jsonl")
    assert workspaces["enc_scores"].column("user_id")[0].as_py() in log


@pytest.mark.parametrize("key", [None, WRONG, "file:" + WRONG])
def test_a_missing_or_wrong_key_is_one_line_and_changes_nothing(workspaces, monkeypatch, capsys, tmp_path, key):
    ws = workspaces["enc"]
    before = _snapshot(ws)
    monkeypatch.delenv(storage.ENCRYPTION_KEY_ENV, raising=False)
    extra: list[str] = []
    if key and key.startswith("file:"):
        (tmp_path / "k").write_text(key[5:] + "\n")
        extra = ["--encryption-key-file", str(tmp_path / "k")]
    elif key:
        monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, key)
    commands = [["ingest", str(workspaces["data"]), "--format", "csv"],
                ["build", "--lookback", "7d", "--horizon", "3d", "--step", "3d"],
                ["train", "--model", "logreg", "--run", "again", *SMALL],
                ["score", "--run", "logreg", "--quiet"],
                ["forget", "--pseudonym", workspaces["pseudonyms"][0]],
                ["pseudonym", "rawUSERqx1"]]
    for cmd in commands:
        capsys.readouterr()
        assert _cli("--workspace", str(ws), *cmd, *extra) == 1, cmd
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert ("is encrypted: set PURCHASE_INTENT_ENCRYPTION_KEY" in err if key is None
                else "wrong encryption key" in err), err
    assert _snapshot(ws) == before


def test_a_key_is_refused_for_a_plain_workspace_that_holds_data(workspaces, monkeypatch, capsys):
    ws = workspaces["plain"]
    before = _snapshot(ws)
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    assert _cli("--workspace", str(ws), "score", "--run", "logreg", "--quiet") == 1
    err = capsys.readouterr().err.strip()
    assert "holds unencrypted data" in err and len(err.splitlines()) == 1
    assert _snapshot(ws) == before


def test_the_plain_workspace_is_as_before(workspaces):
    ws = workspaces["plain"]
    assert not (ws / storage.MARKER).exists()
    for p in ws.rglob("*.parquet"):
        assert p.read_bytes()[:4] == b"PAR1", p
    assert (ws / "pseudonym.key").exists() is False  # the pseudonymisation key came from the environment
    (rejects,) = (ws / "rejects").glob("*.csv")
    assert rejects.read_text().startswith("source_file,line,reason,raw")


def test_csv_scores_are_refused_in_an_encrypted_workspace(workspaces, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    out = tmp_path / "audience.csv"
    assert _cli("--workspace", str(workspaces["enc"]), "score", "--run", "logreg", "--quiet",
                "--out", str(out), "--top", "50%") == 1
    assert "use a .parquet file name" in capsys.readouterr().err
    assert not out.exists()


def test_a_short_key_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, "short")
    assert _cli("--workspace", str(tmp_path / "ws"), "build") == 1
    assert "needs at least 16" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_seal_round_trip_and_tamper(monkeypatch):
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    sealed = storage.seal(b"itemQJZ001,catWVX1")
    assert sealed.startswith(storage.SEALED_MAGIC) and b"itemQJZ" not in sealed
    assert storage.unseal(sealed) == b"itemQJZ001,catWVX1"
    with pytest.raises(storage.EncryptionKeyError, match="wrong encryption key"):
        storage.unseal(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    monkeypatch.delenv(storage.ENCRYPTION_KEY_ENV)
    assert storage.seal(b"x") == b"x"  # no key: plain
    with pytest.raises(storage.EncryptionKeyError, match="is encrypted"):
        storage.unseal(sealed)


def test_the_key_file_and_the_environment_are_the_same_key(workspaces, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(storage.ENCRYPTION_KEY_ENV, raising=False)
    (tmp_path / "key").write_text(KEY + "\n")
    ws = tmp_path / "ws"
    assert _cli("--encryption-key-file", str(tmp_path / "key"), "--workspace", str(ws),
                "ingest", str(workspaces["data"]), "--format", "csv") == 0
    assert (ws / storage.MARKER).exists() and storage.is_encrypted_file(next((ws / "events").glob("part-*")))
    assert not storage.active()  # the file's key was for that command only
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    capsys.readouterr()
    assert _cli("--workspace", str(ws), "pseudonym", "rawUSERqx1") == 0
    assert capsys.readouterr().out.startswith("rawUSERqx1\t")


def test_large_encrypted_events_are_scanned_not_loaded(workspaces, monkeypatch):
    from purchase_intent.workspace import Workspace
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    q = "SELECT count(*), count(DISTINCT user_id), sum(price), max(ts) FROM events"
    con = Workspace(workspaces["enc"]).connect()
    loaded = con.execute(q).fetchall()
    assert con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events'"
                       ).fetchall() == [("LOCAL TEMPORARY",)]
    monkeypatch.setattr(storage, "TABLE_BYTES_PER_FILE_BYTE", float("inf"))
    con = Workspace(workspaces["enc"]).connect()
    assert con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events'"
                       ).fetchall() == [("VIEW",)]
    assert con.execute(q).fetchall() == loaded


def test_encrypted_events_are_loaded_where_their_table_fits_half_the_memory_limit(workspaces, monkeypatch):
    """The memory limit decides: a table that would take 1 GiB is loaded without a limit (80% of this
    machine's memory), and scanned under a 1GB limit, which it would fill past half."""
    from purchase_intent.workspace import Workspace
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    monkeypatch.delenv(memory.MEMORY_LIMIT_ENV, raising=False)
    monkeypatch.delenv(memory.SPILL_DIR_ENV, raising=False)
    ws = Workspace(workspaces["enc"])
    file_bytes = sum(p.stat().st_size for p in ws.part_paths())
    monkeypatch.setattr(storage, "TABLE_BYTES_PER_FILE_BYTE", 2 ** 30 / file_bytes)

    def kind():
        return ws.connect().execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events'"
                                    ).fetchall()

    if memory.duckdb_bytes() >= 2 ** 31:  # a machine with at least 2.5 GiB
        assert kind() == [("LOCAL TEMPORARY",)]
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1GB")
    assert kind() == [("VIEW",)]
    assert storage.materializes(file_bytes, 2 ** 30, spills=True)  # a spill folder takes what does not fit
    assert not storage.materializes(2 ** 30, 2 ** 30, spills=False)


def test_large_encrypted_events_are_loaded_once_where_duckdb_may_spill(workspaces, monkeypatch, tmp_path):
    """With a spill folder named, events too large for memory are decrypted once into a temp table too:
    DuckDB puts the blocks that do not fit its limit in that folder instead of failing."""
    from purchase_intent.workspace import Workspace
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    monkeypatch.setattr(storage, "TABLE_BYTES_PER_FILE_BYTE", float("inf"))
    q = "SELECT count(*), count(DISTINCT user_id), sum(price), max(ts) FROM events"
    streamed = Workspace(workspaces["enc"]).connect().execute(q).fetchall()
    spill = tmp_path / "encrypted-volume"
    spill.mkdir()
    monkeypatch.setenv(memory.SPILL_DIR_ENV, str(spill))
    con = Workspace(workspaces["enc"]).connect()
    assert con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events'"
                       ).fetchall() == [("LOCAL TEMPORARY",)]
    assert con.execute(q).fetchall() == streamed


def test_rotate_key_keeps_an_encrypted_workspace_encrypted(workspaces, monkeypatch, tmp_path, capsys):
    import shutil

    ws = tmp_path / "rotated"
    shutil.copytree(workspaces["enc"], ws)
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    monkeypatch.delenv("PURCHASE_INTENT_PSEUDONYM_KEY", raising=False)
    old = workspaces["pseudonyms"]
    assert _cli("--workspace", str(ws), "rotate-key", "--generate") == 0
    new_scores = _scores(ws)
    new = new_scores.column("user_id").to_pylist()
    assert new and not set(new) & set(old)  # every pseudonym rekeyed
    needles = old + new + workspaces["ids"]["items"] + workspaces["ids"]["categories"]
    leaks = []
    for p in (p for p in ws.rglob("*") if p.is_file()):
        data = p.read_bytes()
        leaks += [f"{p.relative_to(ws)}: {n}" for n in needles if n.encode() in data]
        if p.suffix == ".parquet":
            assert data[:4] == data[-4:] == b"PARE", p
    assert not leaks, leaks[:10]
    assert len(storage.read_text(ws / "pseudonym.key").split()) == 2  # the key chain, sealed
    capsys.readouterr()
    assert _cli("--workspace", str(ws), "score", "--run", "logreg", "--quiet") == 0  # still scores


def _temp_directory(con) -> str:
    return con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0]


def test_an_encrypted_workspace_spills_only_to_a_named_folder(workspaces, monkeypatch, tmp_path):
    monkeypatch.delenv(memory.SPILL_DIR_ENV, raising=False)
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "300MB")
    monkeypatch.delenv(storage.ENCRYPTION_KEY_ENV, raising=False)
    plain = _temp_directory(Workspace(workspaces["plain"]).connect())
    assert plain.startswith(str(workspaces["plain"] / memory.TMP_DIR_PREFIX))  # as before
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    assert _temp_directory(Workspace(workspaces["enc"]).connect()) == ""  # DuckDB's spill files are plaintext
    ingest_con = duckdb.connect()  # ingest points DuckDB at the system temp dir first: the rule wins
    ingest_con.execute(f"SET temp_directory = '{tmp_path}'")
    memory.configure(ingest_con)
    assert _temp_directory(ingest_con) == ""
    spill = tmp_path / "encrypted-volume"
    spill.mkdir()
    memory.set_spill_dir(str(spill))  # what --spill-dir does
    assert _temp_directory(Workspace(workspaces["enc"]).connect()).startswith(str(spill / memory.TMP_DIR_PREFIX))
    monkeypatch.delenv(memory.SPILL_DIR_ENV)
    with pytest.raises(memory.MemoryLimitError, match="no such folder"):
        memory.set_spill_dir(str(tmp_path / "missing"))


def test_out_of_memory_in_an_encrypted_workspace_says_how_to_spill(monkeypatch, capsys, workspaces, tmp_path):
    monkeypatch.delenv(memory.SPILL_DIR_ENV, raising=False)
    monkeypatch.setenv(storage.ENCRYPTION_KEY_ENV, KEY)
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "1GB")
    con = duckdb.connect()
    memory.configure(con)
    con.execute("SET memory_limit = '2MB'; SET threads = 1")
    with pytest.raises(memory.MemoryLimitError, match=r"^step build needs more memory than the limit 1GB .*"
                                                      r"does not spill plaintext to disk.*--spill-dir DIR"):
        with memory.step("build"):
            con.execute("SELECT count(DISTINCT i::VARCHAR || 'x') FROM range(3000000) t(i)").fetchall()
    # the flag: a folder that does not exist is one line, before anything is read
    assert main(["--workspace", str(workspaces["enc"]), "--spill-dir", str(tmp_path / "nope"), "build"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --spill-dir {tmp_path / 'nope'}: no such folder; create it " \
                                              "(on an encrypted volume) first"
