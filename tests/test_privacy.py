"""Keyed pseudonymisation: HMAC-SHA256, key file creation (0600), env override."""
from __future__ import annotations

import hashlib
import hmac
import stat

import pyarrow as pa

from purchase_intent.privacy import KEY_ENV, load_key, pseudonym_for, pseudonym_table, pseudonymise


def test_pseudonym_is_truncated_hmac_sha256():
    key = bytes(range(32))
    ids = ["1", "user-42", "ünïcode", ""]
    out = pseudonymise(ids, key)
    assert out == [hmac.new(key, s.encode(), hashlib.sha256).hexdigest()[:32] for s in ids]
    assert pseudonymise([None], key) == [None]
    assert pseudonymise(["1"], b"k" * 32) != out[:1]  # depends on the key
    long_key = b"x" * 100  # keys longer than a block are hashed first, as in RFC 2104
    assert pseudonymise(["a"], long_key) == [hmac.new(long_key, b"a", hashlib.sha256).hexdigest()[:32]]
    t = pseudonym_table(pa.array(["a", "b"]), key)
    assert t.column("pid").to_pylist() == pseudonymise(["a", "b"], key)
    chunked = pa.chunked_array([ids[:2], ids[2:]])
    assert pseudonym_table(chunked, key).column("pid").to_pylist() == out
    assert pseudonym_table(pa.array(["a", None]), key).column("pid").to_pylist() == [pseudonymise(["a"], key)[0], None]
    assert pseudonym_table(pa.chunked_array([], pa.string()), key).num_rows == 0


def test_key_file_created_once_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    k1 = load_key(tmp_path / "ws")
    path = tmp_path / "ws" / "pseudonym.key"
    assert len(k1) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(tmp_path / "ws") == k1
    assert [p.name for p in (tmp_path / "ws").iterdir()] == ["pseudonym.key"]  # no temp file left
    assert load_key(tmp_path / "other") != k1


def test_env_key_overrides_file(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert load_key(tmp_path) == bytes.fromhex("ab" * 32)
    assert not (tmp_path / "pseudonym.key").exists()
    got = pseudonym_for(tmp_path, ["u1", "u2"])
    assert got == {u: hmac.new(bytes.fromhex("ab" * 32), u.encode(), hashlib.sha256).hexdigest()[:32]
                   for u in ("u1", "u2")}
    monkeypatch.setenv(KEY_ENV, "a passphrase that is long enough")
    assert load_key(tmp_path) == b"a passphrase that is long enough"
