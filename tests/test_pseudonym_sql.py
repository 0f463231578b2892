"""Pseudonyms computed in DuckDB SQL equal HMAC-SHA256 from Python's hmac module, bit for bit."""
from __future__ import annotations

import hashlib
import hmac
import random

import duckdb
import pyarrow as pa
import pytest

from purchase_intent.privacy import (
    PSEUDONYM_HEX,
    hmac_pads,
    pseudonym_params,
    pseudonym_sql,
    pseudonym_table,
    pseudonymise,
)

KEYS = {
    "16 bytes": bytes(range(16)),
    "32 bytes": bytes(range(32)),
    "63 bytes": bytes(range(200, 255)) + b"\x00" * 8,
    "64 bytes": bytes(range(64)),
    "65 bytes": bytes(range(65)),
    "100 bytes": b"x" * 100,
    "1000 bytes": bytes(random.Random(1).randrange(256) for _ in range(1000)),
    "utf-8 text": "schlüssel-🔑-ключ-鍵".encode(),
    "zero bytes": b"\x00" * 32,
}


def _ids() -> list[str]:
    rng = random.Random(0)
    ids = ["", " ", "0", "1", "u1", "user-42", "ünïcode", "日本語のユーザー", "🛒🛍️", "emoji\u200djoiner",
           "'", "''", '"', 'a"b\'c', "\\", "\\x00", "\\xff", "back\\slash", "%s", "$1", "?", "--", "/*x*/",
           "a,b", "tab\there", "line\nbreak", "cr\r\nlf", "NULL", "null", "None",
           "0xdeadbeef", "a\x00b", "\x01\x02\x7f", "\x7f\x80\xff", "\ufffd", "\ud7ff\ue000", "\U0010ffff",
           "x" * 55, "x" * 56, "x" * 63, "x" * 64, "x" * 65, "x" * 119, "x" * 120, "é" * 40,
           "y" * 10_000, "ü" * 5_000]
    ids += ["".join(chr(rng.randrange(1, 0x250)) for _ in range(rng.randrange(1, 80))) for _ in range(300)]
    ids += [bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40))).decode("latin-1") for _ in range(300)]
    ids += [str(rng.randrange(10**12)) for _ in range(300)]
    return ids


def _reference(ids: list[str], key: bytes) -> list[str]:
    return [hmac.new(key, s.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX] for s in ids]


@pytest.mark.parametrize("name", list(KEYS))
def test_sql_pseudonyms_equal_python_hmac(name):
    key = KEYS[name]
    ids = _ids()
    con = duckdb.connect()
    con.register("ids", pa.table({"n": pa.array(range(len(ids))), "raw": pa.array(ids, pa.string())}))
    got = [r[0] for r in con.execute(f"SELECT {pseudonym_sql('raw')} FROM ids ORDER BY n", pseudonym_params(key))
           .fetchall()]
    want = _reference(ids, key)
    assert got == want
    assert pseudonymise(ids, key) == want
    assert pseudonym_table(pa.array(ids), key).column("pid").to_pylist() == want


def test_sql_pseudonym_of_null_is_null_and_of_other_types_is_of_their_text():
    key = KEYS["32 bytes"]
    con = duckdb.connect()
    cols = ", ".join(pseudonym_sql(e) for e in ("NULL", "42", "'a'"))
    row = con.execute(f"SELECT {cols}", pseudonym_params(key)).fetchone()
    assert row == (None, *_reference(["42", "a"], key))


def test_hmac_pads_follow_rfc_2104():
    ipad, opad = hmac_pads(b"k" * 16)
    assert ipad == bytes([ord("k") ^ 0x36] * 16 + [0x36] * 48)
    assert opad == bytes([ord("k") ^ 0x5C] * 16 + [0x5C] * 48)
    long_key = b"z" * 65
    assert hmac_pads(long_key) == hmac_pads(hashlib.sha256(long_key).digest())


def test_key_is_not_in_the_sql_text():
    key = bytes(range(32))
    sql = pseudonym_sql("raw")
    for block in hmac_pads(key):
        assert block.hex() not in sql
    assert key.hex() not in sql
