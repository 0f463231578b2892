"""`purchase-intent rotate-key`: afterwards no file holds an old pseudonym, old runs keep working
through the mapping (their scores mapped, scoring again gives the same probabilities), raw ids still
find their users (`pseudonym`, `forget --user`, `score --reidentify`) through the key chain, erased
users stay erased, bad input changes nothing, and a crash midway leaves the old workspace byte for byte."""
from __future__ import annotations

import errno
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from purchase_intent import report, rotation, workspace
from purchase_intent.cli import main
from purchase_intent.privacy import KEY_ENV, key_chain, load_key, pseudonymise
from purchase_intent.simulate import SimConfig, write_events

NEW_KEY = "ab" * 32
TRAIN = ["train", "--model", "logreg", "--min-positives", "1", "--min-negatives", "1"]
HEX32 = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


def _cli(ws: Path, *args: str) -> int:
    return main(["--workspace", str(ws), *args])


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small shop, fully used, with its key in the workspace key file: ingested (rejected rows
    with pseudonyms), built, trained, evaluated, scored (a Parquet file and a gzipped CSV audience),
    reported, and one user erased. Returns (workspace, raw ids, the erased raw id)."""
    mp = pytest.MonkeyPatch()
    mp.delenv(KEY_ENV, raising=False)
    root = tmp_path_factory.mktemp("rotate")
    src = root / "shop.csv"
    write_events(SimConfig(n_users=200, days=30, seed=1), src)
    raw_users = sorted(pd.read_csv(src, usecols=["user_id"])["user_id"].astype(str).unique())
    with open(src, "a") as f:  # a rejected row per user, its id pseudonymised in rejects/
        for u in raw_users:
            f.write(f'"{u}",not-a-time,"view","i1","c1",1.0,"s1"\n')
    ws = root / "ws"
    try:
        assert _cli(ws, "ingest", str(src)) == 0
        assert _cli(ws, "build", "--lookback", "7d", "--horizon", "3d", "--step", "3d") == 0
        assert _cli(ws, *TRAIN) == 0
        assert _cli(ws, "evaluate", "--run", "logreg", "--n-boot", "20") == 0
        assert _cli(ws, "score", "--run", "logreg", "--quiet") == 0
        audience = ["--min-probability", "0", "--out", str(ws / "audience.csv.gz")]
        assert _cli(ws, "score", "--run", "logreg", "--quiet", *audience) == 0
        report.write_report(ws, n_explain=10)
        erased = raw_users[0]
        assert _cli(ws, "forget", "--user", erased) == 0
    finally:
        mp.undo()
    return ws, raw_users, erased


@pytest.fixture
def ws(shop, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(rotation.NEW_KEY_ENV, raising=False)
    dest = tmp_path / "ws"
    shutil.copytree(shop[0], dest)
    return dest


@pytest.fixture
def new_key_file(tmp_path):
    p = tmp_path / "new.key"
    p.write_text(NEW_KEY + "\n")
    return p


def raw_bytes(ws: Path) -> dict[str, str]:
    """Every file's bytes (but the lock's record), to compare a workspace byte for byte."""
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.rglob("*")) if p.is_file() and p.name != ".lock"}


def litter(ws: Path) -> list[str]:
    return sorted(p.name for p in [*ws.rglob(".tmp-*"), *ws.parent.glob(".tmp-*")])


def stored_pseudonyms(ws: Path) -> set[str]:
    """The user and session pseudonyms of the stored events."""
    ev = pd.concat([pd.read_parquet(p) for p in sorted((ws / "events").glob("part-*.parquet"))])
    return set(ev["user_id"].dropna()) | set(ev["session_id"].dropna())


def files_holding(ws: Path, pseudonyms: set[str], skip: tuple = ()) -> list[str]:
    """Every file holding one of ``pseudonyms``: Parquet string columns read, gzip decompressed,
    other files' bytes; HTML also by the 12 characters a report shows."""
    prefixes = {p[:12] for p in pseudonyms}
    hits = []
    for p in sorted(ws.rglob("*")):
        if not p.is_file() or p.name in skip or p.name == "shop.csv":
            continue
        if p.suffix == ".parquet":
            t = pq.read_table(p)
            text = " ".join(str(v) for c in t.column_names if pa.types.is_string(t.schema.field(c).type)
                            for v in t.column(c).to_pylist())
        else:
            data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            text = data.decode("utf-8", errors="replace")
        found = set(HEX32.findall(text)) & pseudonyms
        if p.suffix == ".html":
            found |= set(re.findall(r"[0-9a-f]{12}", text)) & prefixes
        if found:
            hits.append(str(p.relative_to(ws)))
    return hits


def scores(ws: Path) -> pd.DataFrame:
    run = ws / "runs" / "logreg"
    return pd.concat([pd.read_parquet(p) for p in sorted(run.glob("scores-*.parquet"))], ignore_index=True)


# ---------------------------------------------------------------------------------------------
def test_no_file_holds_an_old_pseudonym_and_old_runs_keep_working(shop, ws, new_key_file, capsys):
    _, raw_users, _ = shop
    old_key = load_key(ws)
    old = stored_pseudonyms(ws)
    erased_logged = set(re.findall(r'"pseudonym": "([0-9a-f]{32})"', (ws / "erasure-log.jsonl").read_text()))
    rejected = set(HEX32.findall(" ".join(p.read_text() for p in (ws / "rejects").glob("*.csv"))))
    assert old and erased_logged and rejected
    before = scores(ws)
    assert files_holding(ws, old)  # the check finds them before

    assert _cli(ws, "rotate-key", "--new-key-file", str(new_key_file)) == 0
    out = capsys.readouterr().out
    assert "runs keep working" in out and "logreg" in out and "report.html" in out

    everything_old = old | erased_logged | rejected
    assert files_holding(ws, everything_old) == []
    assert not (ws / "report.html").exists()  # it showed old pseudonyms; `report` writes it again
    assert litter(ws) == []

    # the key is now the chain: the old key alone links nothing, the chain maps raw ids
    new_key = bytes.fromhex(NEW_KEY)
    assert key_chain(load_key(ws)) == (old_key, new_key)
    assert oct((ws / "pseudonym.key").stat().st_mode & 0o777) == "0o600"
    remap = lambda ids: pseudonymise(list(ids), new_key)  # noqa: E731
    assert stored_pseudonyms(ws) == set(remap(old))
    for part in sorted((ws / "events").glob("part-*.parquet")):  # every row where it was, its ids mapped
        was, now = pd.read_parquet(shop[0] / "events" / part.name), pd.read_parquet(part)
        assert now.drop(columns=["user_id", "session_id"]).equals(was.drop(columns=["user_id", "session_id"]))
        assert now["user_id"].tolist() == remap(was["user_id"])
        assert now["session_id"].tolist() == remap(was["session_id"])
        schema = lambda p: [(f.name, f.type) for f in pq.read_schema(p)]  # noqa: E731
        assert schema(part) == schema(shop[0] / "events" / part.name)
    assert not set(pseudonymise(raw_users, old_key)) & stored_pseudonyms(ws)

    # the old run's scores file: the same rows, pseudonyms mapped
    after = scores(ws)
    assert after["user_id"].tolist() == remap(before["user_id"])
    assert after.drop(columns="user_id").equals(before.drop(columns="user_id"))
    # ... and the old run scores the rekeyed workspace as before
    assert _cli(ws, "score", "--run", "logreg", "--quiet", "--out", str(ws / "again.parquet")) == 0
    again = pd.read_parquet(ws / "again.parquet").set_index("user_id")["probability"]
    mapped = before.assign(user_id=remap(before["user_id"])).set_index("user_id")["probability"]
    assert again.reindex(mapped.index).to_numpy() == pytest.approx(mapped.to_numpy())

    # `pseudonym RAW_ID` prints the pseudonym under the chain, which the events hold
    capsys.readouterr()
    assert _cli(ws, "pseudonym", raw_users[5]) == 0
    pid = capsys.readouterr().out.split()[-1]
    assert pid == remap(pseudonymise([raw_users[5]], old_key))[0] and pid in stored_pseudonyms(ws)


def test_forget_and_reidentify_by_raw_id_after_rotation_and_erased_users_stay_erased(shop, ws, new_key_file,
                                                                                    tmp_path, capsys):
    _, raw_users, erased = shop
    assert _cli(ws, "rotate-key", "--new-key-file", str(new_key_file)) == 0
    chain = load_key(ws)
    erased_now = pseudonymise([erased], chain)[0]
    assert erased_now not in stored_pseudonyms(ws)
    assert f'"pseudonym": "{erased_now}"' in (ws / "erasure-log.jsonl").read_text()  # the audit line, mapped
    capsys.readouterr()
    assert _cli(ws, "forget", "--user", erased) == 0  # still erased: nothing of them to find, and the audit
    assert f"pseudonym {erased_now}: already erased at" in capsys.readouterr().out  # log, mapped, says so

    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(raw_users) + "\n")
    out = tmp_path / "reid.csv"
    assert _cli(ws, "score", "--run", "logreg", "--quiet", "--reidentify", str(ids), "--out", str(out)) == 0
    reid = pd.read_csv(out, dtype=str)
    assert len(reid) > 10 and reid["raw_user_id"].notna().all()  # every scored user found by raw id
    raw = reid["raw_user_id"].iloc[0]
    pid = pseudonymise([raw], chain)[0]
    assert reid["user_id"].iloc[0] == pid and pid in stored_pseudonyms(ws)

    assert _cli(ws, "forget", "--user", raw) == 0
    assert "erased pseudonym " + pid in capsys.readouterr().out
    assert files_holding(ws, {pid}, skip=("erasure-log.jsonl",)) == []


def test_rotating_twice_and_an_environment_key(shop, tmp_path, monkeypatch, capsys):
    """With the key in $PURCHASE_INTENT_PSEUDONYM_KEY the chain goes back there: until it does, the old
    key is refused; a second rotation wraps once more."""
    monkeypatch.delenv(rotation.NEW_KEY_ENV, raising=False)
    ws = tmp_path / "ws"
    shutil.copytree(shop[0], ws)
    old_hex = (ws / "pseudonym.key").read_text().strip()
    (ws / "pseudonym.key").unlink()
    monkeypatch.setenv(KEY_ENV, old_hex)
    monkeypatch.setenv(rotation.NEW_KEY_ENV, NEW_KEY)
    assert _cli(ws, "rotate-key", "--generate") == 1  # the chain cannot be written for an environment key
    assert "--new-key-file" in capsys.readouterr().err
    assert _cli(ws, "rotate-key") == 0
    assert f"${KEY_ENV}: set it now" in capsys.readouterr().out
    assert not (ws / "pseudonym.key").exists()
    raw = shop[1][3]
    assert _cli(ws, "pseudonym", raw) == 1  # the old key alone is refused, in one line
    assert "differs from the one this workspace was built with" in capsys.readouterr().err
    monkeypatch.setenv(KEY_ENV, f"{old_hex},{NEW_KEY}")
    assert _cli(ws, "pseudonym", raw) == 0
    pid = capsys.readouterr().out.split()[-1]
    assert pid in stored_pseudonyms(ws)
    third = "cd" * 16
    monkeypatch.setenv(rotation.NEW_KEY_ENV, third)
    assert _cli(ws, "rotate-key") == 0
    monkeypatch.setenv(KEY_ENV, f"{old_hex},{NEW_KEY},{third}")
    assert pseudonymise([raw], load_key(ws))[0] == pseudonymise([pid], bytes.fromhex(third))[0]
    assert pseudonymise([raw], load_key(ws))[0] in stored_pseudonyms(ws)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "identical", "short", "two keys", "no key file", "unknown file",
                                  "unknown column"])
def test_bad_input_is_one_line_and_changes_nothing(ws, case, tmp_path, capsys):
    before = raw_bytes(ws)
    args = ["rotate-key"]
    key_file = tmp_path / "k"
    if case == "identical":
        key_file.write_text((ws / "pseudonym.key").read_text())
    elif case == "short":
        key_file.write_text("abcd" * 4)  # 8 bytes
    elif case == "two keys":
        key_file.write_text(f"{NEW_KEY},{'cd' * 32}")
    else:
        key_file.write_text(NEW_KEY)
    if case != "missing":
        args += ["--new-key-file", str(key_file)]
    if case == "no key file":
        (ws / "pseudonym.key").rename(tmp_path / "kept.key")
        before = raw_bytes(ws)
    if case == "unknown file":
        pid = sorted(stored_pseudonyms(ws))[0]
        (ws / "notes.txt").write_text(f"call back {pid}\n")
        before = raw_bytes(ws)
    if case == "unknown column":
        pid = sorted(stored_pseudonyms(ws))[0]
        pq.write_table(pa.table({"shopper": [pid, "x"]}), ws / "runs" / "logreg" / "contacts.parquet")
        before = raw_bytes(ws)
    assert _cli(ws, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    expected = {"missing": "needs the new key", "identical": "is the key in use", "short": "at least 16 bytes",
                "two keys": "more than one key", "no key file": "key is missing",
                "unknown file": "notes.txt holds a pseudonym",
                "unknown column": "contacts.parquet holds a pseudonym in a column"}[case]
    assert expected in err
    assert raw_bytes(ws) == before and litter(ws) == []


def test_a_locked_workspace_is_refused(ws, new_key_file, capsys):
    before = raw_bytes(ws)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(ws / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, b'{\"command\": \"build\", \"pid\": 1}', 0)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _cli(ws, "rotate-key", "--new-key-file", str(new_key_file)) == 1
        err = capsys.readouterr().err
        assert "another build is running" in err and err.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()
    assert raw_bytes(ws) == before and litter(ws) == []


@pytest.mark.parametrize("where", ["staging", "swap"])
def test_a_crash_midway_leaves_the_old_workspace_byte_identical(ws, new_key_file, monkeypatch, where, capsys):
    before = raw_bytes(ws)
    if where == "staging":  # some files rewritten into the new tree, then the disk is full
        real, calls = pq.write_table, []

        def write_table(table, dest, *a, **k):
            calls.append(dest)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(dest))
            return real(table, dest, *a, **k)
        monkeypatch.setattr(pq, "write_table", write_table)
    else:  # the whole new tree staged, the swap fails
        def exchange(a, b):
            raise OSError(errno.EIO, "Input/output error", str(b))
        monkeypatch.setattr(workspace, "_exchange", exchange)
    assert _cli(ws, "rotate-key", "--new-key-file", str(new_key_file)) == 1
    assert "error:" in capsys.readouterr().err
    assert raw_bytes(ws) == before and litter(ws) == []
    monkeypatch.undo()
    assert _cli(ws, "rotate-key", "--new-key-file", str(new_key_file)) == 0  # and it goes through afterwards


def test_a_killed_rotation_leaves_old_or_new(ws, new_key_file):
    """kill -9 just before the swap leaves the old workspace, right after it the new one; the next
    command removes the other tree."""
    old_bytes = raw_bytes(ws)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop(KEY_ENV, None)
    outcomes = []
    for when in ("before", "after"):
        trial = ws.parent / f"trial-{when}"
        shutil.copytree(ws, trial)
        code = (
            "import os, signal, sys\n"
            "from purchase_intent import cli, workspace\n"
            "real = workspace._exchange\n"
            "def exchange(a, b):\n"
            f"    if {when!r} == 'before': os.kill(os.getpid(), signal.SIGKILL)\n"
            "    ok = real(a, b)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "workspace._exchange = exchange\n"
            f"cli.main(['--workspace', {str(trial)!r}, 'rotate-key', '--new-key-file', {str(new_key_file)!r}])\n")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert r.returncode == -9, r.stderr
        assert litter(trial)  # the other tree is left beside it
        assert _cli(trial, "pseudonym", "x") == 0  # a reader sees one state
        assert _cli(trial, "ingest", str(ws / "absent.csv")) == 1  # the next writer recovers first
        assert litter(trial) == []
        now = raw_bytes(trial)
        outcomes.append("old" if now == old_bytes else "new" if len(key_chain(load_key(trial))) == 2 else "neither")
    assert outcomes == ["old", "new"]


# ---------------------------------------------------------------------------------------------
def test_a_key_chain_wraps_pseudonyms_in_python_arrow_and_sql_alike(tmp_path, monkeypatch):
    import duckdb

    from purchase_intent.privacy import key_id, pseudonym_params, pseudonym_sql, pseudonym_table
    k1, k2, k3 = bytes(range(32)), b"second key, as text bytes", bytes.fromhex("cd" * 40)
    ids = ["u1", "ünïcode", "", None, "x" * 70]
    one = pseudonymise(ids, k1)
    chain = pseudonymise(ids, (k1, k2, k3))
    assert chain == [None if p is None else pseudonymise(pseudonymise([p], k2), k3)[0] for p in one]
    assert pseudonym_table(pa.array(ids, pa.string()), (k1, k2, k3)).column("pid").to_pylist() == chain
    con = duckdb.connect()
    sql = f"SELECT {pseudonym_sql('id', n_keys=3)} FROM (SELECT unnest($ids::VARCHAR[]) AS id)"
    assert [r[0] for r in con.execute(sql, {**pseudonym_params((k1, k2, k3)), "ids": ids}).fetchall()] == chain
    assert key_id(k1) == hashlib.sha256(b"purchase-intent key id\0" + k1).hexdigest()[:16]  # as before chains
    assert len({key_id(k1), key_id((k1, k2)), key_id((k2, k1))}) == 3
    # the environment and the key file hold a chain as hex keys, oldest first
    monkeypatch.setenv(KEY_ENV, f"{k1.hex()},{k2.hex()}")
    assert load_key(tmp_path) == (k1, k2)
    monkeypatch.setenv(KEY_ENV, "a passphrase, with a comma, long enough")  # text: one key, commas and all
    assert load_key(tmp_path) == b"a passphrase, with a comma, long enough"
    monkeypatch.delenv(KEY_ENV)
    (tmp_path / "pseudonym.key").write_text(f"{k1.hex()}\n{k3.hex()}\n")
    assert load_key(tmp_path) == (k1, k3)


def test_ingest_after_rotation_files_new_events_under_the_same_pseudonyms(shop, ws, new_key_file, tmp_path):
    _, raw_users, _ = shop
    assert _cli(ws, "rotate-key", "--new-key-file", str(new_key_file)) == 0
    raw = raw_users[9]
    more = tmp_path / "more.csv"
    more.write_text("user_id,ts,event,item_id,category,price,session_id\n"
                    f'"{raw}",1706745600000,"view","i1","c1",1.0,"s9"\n"new-shopper",1706745600000,"view","i1","c1",1.0,"s9"\n')
    assert _cli(ws, "ingest", str(more)) == 0
    chain = load_key(ws)
    ev = pd.concat([pd.read_parquet(p) for p in sorted((ws / "events").glob("part-*.parquet"))])
    mine = pseudonymise([raw], chain)[0]
    assert (ev["user_id"] == mine).sum() >= 2  # the old events (rekeyed) and the new one, one shopper
    assert pseudonymise(["new-shopper"], chain)[0] in set(ev["user_id"])
