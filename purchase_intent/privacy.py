"""Keyed pseudonymisation of user and session ids.

A pseudonym is ``HMAC-SHA256(key, raw_id)`` hex-encoded and truncated to 32 hex characters
(128 bits). Without the key the raw id cannot be recovered or confirmed by hashing guesses;
with it, the key holder can look up the pseudonym of a known id
(``purchase-intent pseudonym ID...``).

The key comes from ``$PURCHASE_INTENT_PSEUDONYM_KEY`` (hex, or any other text taken as UTF-8
bytes), else from ``<workspace>/pseudonym.key``, created on first use with 32 random bytes
(hex), mode 0600, atomically. The same key must be used for every ingest into one workspace:
the manifest records a key id (a hash of the key, not the key) and ingest refuses a different one.

After ``purchase-intent rotate-key`` (:mod:`~purchase_intent.rotation`) the key is a *chain*
``k1, k2, ...`` (oldest first): the pseudonym of a raw id is ``P_n(...P_2(P_1(raw)))`` where
``P_i(x) = HMAC-SHA256(k_i, x)`` truncated to 32 hex characters, each applied to the previous
pseudonym's text. A rotation wraps every stored pseudonym in one more ``P``; the raw ids, which the
workspace never holds, are not needed. The key file then holds one key per line, oldest first;
``$PURCHASE_INTENT_PSEUDONYM_KEY`` holds them as hex, separated by commas (or newlines). Every
function here takes a single key (bytes) or a chain (a tuple of bytes).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import pyarrow as pa

from purchase_intent import storage
from purchase_intent.workspace import Workspace, fsync_dir, tmp_path

KEY_ENV = "PURCHASE_INTENT_PSEUDONYM_KEY"
NEW_KEY_ENV = "PURCHASE_INTENT_NEW_PSEUDONYM_KEY"  # the new key of `rotate-key` (rotation.py)
PSEUDONYM_HEX = 32  # hex characters kept from the 64-character HMAC-SHA256 digest
MIN_KEY_BYTES = 16
Key = Union[bytes, tuple]  # one key, or a chain of keys (oldest first) after rotate-key


def parse_one_key(text: str) -> bytes:
    """One key: hex, else the text's UTF-8 bytes; at least 16 bytes (ValueError otherwise)."""
    text = text.strip()
    if not text:
        raise ValueError("the pseudonymisation key is empty")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = text.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the pseudonymisation key must hold at least {MIN_KEY_BYTES} bytes (32 hex characters)")
    return key


def _is_hex_key(part: str) -> bool:
    try:
        return len(bytes.fromhex(part.strip())) >= MIN_KEY_BYTES
    except ValueError:
        return False


def _parse_key(text: str) -> Key:
    """One key (hex, else UTF-8 text), or a chain: several hex keys, one per line or comma-separated."""
    parts = [p for p in re.split(r"[,\n]", text.strip()) if p.strip()]
    if len(parts) > 1 and all(_is_hex_key(p) for p in parts):
        return tuple(bytes.fromhex(p.strip()) for p in parts)
    return parse_one_key(text)


def key_chain(key: Key) -> tuple:
    """``key`` as a chain: a tuple of one or more keys, oldest first."""
    chain = (bytes(key),) if isinstance(key, (bytes, bytearray)) else tuple(bytes(k) for k in key)
    if not chain:
        raise ValueError("the pseudonymisation key is empty")
    return chain


def chain_text(key: Key) -> str:
    """The text of a key file (or of ``$PURCHASE_INTENT_PSEUDONYM_KEY``) for ``key``: hex, one key per line."""
    return "".join(k.hex() + "\n" for k in key_chain(key))


def as_key(chain: tuple) -> Key:
    """A chain of one key as that key (bytes), else the chain itself."""
    return chain[0] if len(chain) == 1 else tuple(chain)


def load_key(workspace_root: str | Path | Workspace) -> Key:
    """The pseudonymisation key: from ``$PURCHASE_INTENT_PSEUDONYM_KEY`` or the workspace key file
    (bytes; a tuple of keys, oldest first, after a key rotation).

    The key file ``<workspace>/pseudonym.key`` is created on first use (32 random bytes as hex,
    mode 0600). Creation is atomic and race-free: the key is written to a temporary file and
    hard-linked into place, so two processes starting together end up with the same key.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        return _parse_key(env)
    root = workspace_root.root if isinstance(workspace_root, Workspace) else Path(workspace_root)
    path = root / "pseudonym.key"
    if not path.exists():
        try:
            _create_key_file(root, path)
        except OSError as e:
            raise RuntimeError(f"cannot create the pseudonymisation key {path}: {e.strerror or e}") from e
    try:
        return _parse_key(storage.read_bytes(path).decode(errors="replace"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}; restore the key file (or set {KEY_ENV})") from None


def workspace_key(workspace: str | Path | Workspace) -> Key:
    """:func:`load_key`, checked against the key id the workspace's manifest records: a key other than
    the one its ids were pseudonymised with (e.g. the old key after ``rotate-key``) raises ValueError."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    key = load_key(ws)
    recorded = ws.read_manifest().get("key_id")
    if recorded and recorded != key_id(key):
        rotated = " (it was rotated: the key is now the chain of the old and new keys)" \
            if ws.read_manifest().get("key_rotations") else ""
        raise ValueError(f"the pseudonymisation key differs from the one this workspace was built with (key id "
                         f"{key_id(key)}, the workspace's is {recorded}){rotated}; set {KEY_ENV} to its key: hex "
                         "keys, comma-separated, oldest first")
    return key


def _create_key_file(root: Path, path: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:  # sealed in an encrypted workspace
            f.write(storage.seal((secrets.token_bytes(32).hex() + "\n").encode()))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key first
        except FileExistsError:
            pass
        fsync_dir(root)
    finally:
        tmp.unlink(missing_ok=True)


def key_id(key: Key) -> str:
    """A short public fingerprint of the key or key chain (to detect a key change between ingests)."""
    chain = key_chain(key)
    if len(chain) == 1:
        return hashlib.sha256(b"purchase-intent key id\0" + chain[0]).hexdigest()[:16]
    h = hashlib.sha256(b"purchase-intent key chain id\0")
    for k in chain:
        h.update(len(k).to_bytes(8, "big") + k)
    return h.hexdigest()[:16]


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """The HMAC-SHA256 (RFC 2104) inner and outer key blocks ``(K ^ ipad, K ^ opad)``, 64 bytes each.

    ``HMAC(K, m) = SHA256((K ^ opad) || SHA256((K ^ ipad) || m))``, where ``K`` is the key padded
    with zero bytes to the 64-byte block, after hashing it if it is longer than a block.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


@functools.lru_cache(maxsize=8)
def _hmac_states(key: bytes) -> tuple["hashlib._Hash", "hashlib._Hash"]:
    # The inner and outer pads hashed once; per id only copies are made, which is about twice as
    # fast as hmac.new per id. Cached: rotate-key maps pseudonyms one by one (callers only copy the states).
    ipad, opad = hmac_pads(key)
    return hashlib.sha256(ipad), hashlib.sha256(opad)


def pseudonym_sql(expr: str, n_keys: int = 1) -> str:
    """DuckDB SQL for the pseudonym of the text expression ``expr`` (SQL text, e.g. a column name)
    under a key chain of ``n_keys`` keys (1: a single key).

    The same value as :func:`pseudonymise`: HMAC-SHA256 over the UTF-8 bytes of the text, as hex,
    truncated to 32 characters; NULL maps to NULL. It computes inside DuckDB, vectorised and on
    all its threads, but hashes the key blocks again for every id (4 SHA-256 blocks for an id of
    up to 55 bytes, where :func:`pseudonym_table` hashes 2); ingest uses it for its maps of
    distinct ids (on two free cores faster than :func:`pseudonym_table` on one), and per row for a
    log's session ids when their map would not fit in memory. The key blocks are query
    parameters, never part of the SQL text (which DuckDB quotes in its error messages): execute
    with ``pseudonym_params(key)``.
    """
    for i in range(int(n_keys)):
        suffix = f"_{i}" if i else ""
        inner = f"unhex(sha256(CAST($pseudonym_ipad{suffix} AS BLOB) || encode(CAST({expr} AS VARCHAR))))"
        expr = f"left(sha256(CAST($pseudonym_opad{suffix} AS BLOB) || {inner}), {PSEUDONYM_HEX})"
    return expr


def pseudonym_params(key: Key) -> dict[str, bytes]:
    """The named parameters that :func:`pseudonym_sql` needs (each key's HMAC blocks, as BLOBs);
    give ``pseudonym_sql`` ``n_keys=len(key_chain(key))``."""
    out = {}
    for i, k in enumerate(key_chain(key)):
        ipad, opad = hmac_pads(k)
        suffix = f"_{i}" if i else ""
        out[f"pseudonym_ipad{suffix}"], out[f"pseudonym_opad{suffix}"] = ipad, opad
    return out


_WHOLE_FLOAT = re.compile(r"-?[0-9]+\.0+")


def id_text(raw: str) -> str:
    """A raw user or session id as ingest reads it (``events._id_sql``): without the spaces around it, and a
    whole number written as a float (``13085.0``) as the integer. Look-ups of raw ids go through it, so that
    ``forget 13085`` and ``forget 13085.0`` find the one user a CSV wrote as ``13085.0``."""
    t = raw.strip(" ")
    return t[:t.index(".")] if "." in t and _WHOLE_FLOAT.fullmatch(t) else t


def earlier_pseudonyms(raw: str, key: Key) -> list[str]:
    """Pseudonyms that a file read before ingest read ids as :func:`id_text` does may hold ``raw`` under: of the
    id as written, and of a whole number as pandas writes it as a float (``13085`` -> ``13085.0``); the ones
    that differ from its pseudonym now. Look-ups try them where the pseudonym now finds nothing."""
    t = id_text(raw)
    texts = dict.fromkeys([raw, f"{t}.0" if re.fullmatch(r"-?[0-9]+", t) else raw])
    now = pseudonymise_raw([raw], key)[0]
    return [p for p in dict.fromkeys(pseudonymise(list(texts), key)) if p != now]


def pseudonymise_raw(ids: Iterable[str], key: Key) -> list[str]:
    """Pseudonyms of raw ids as ingest stores them: :func:`pseudonymise` of each :func:`id_text`."""
    return pseudonymise([None if i is None else id_text(i) for i in ids], key)


def pseudonymise(ids: Iterable[str], key: Key) -> list[str]:
    """Pseudonyms of ``ids``: HMAC-SHA256(key, id) as hex, truncated to 32 characters (under a
    chain, each key in turn over the previous pseudonym).

    Parameters
    ----------
    ids : iterable of str
        Raw ids (UTF-8 encoded before hashing). ``None`` maps to ``None``.
    key : bytes or tuple of bytes
        The key (or key chain) from :func:`load_key`.

    Returns
    -------
    list of str
        One pseudonym per id, in order.
    """
    chain = key_chain(key)
    out = _pseudonymise_one(ids, chain[0])
    for k in chain[1:]:
        out = _pseudonymise_one(out, k)
    return out


def _pseudonymise_one(ids: Iterable[str], key: bytes) -> list[str]:
    inner, outer = _hmac_states(key)
    out: list[str] = []
    append = out.append
    for s in ids:
        if s is None:
            append(None)
            continue
        i = inner.copy()
        i.update(s.encode("utf-8"))
        o = outer.copy()
        o.update(i.digest())
        append(o.hexdigest()[:PSEUDONYM_HEX])
    return out


def pseudonym_table(ids: pa.Array | pa.ChunkedArray, key: Key) -> pa.Table:
    """A mapping table ``(raw VARCHAR, pid VARCHAR)`` for distinct raw ids, to join in DuckDB.

    Null ids map to null. The pseudonyms are built as one buffer of fixed-width hex strings
    (no Python string per pseudonym), which makes this about twice as fast as
    :func:`pseudonymise` on millions of ids.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    ids = ids.cast(pa.string())
    chain = key_chain(key)
    pids = _pseudonym_array(ids, chain[0])
    for k in chain[1:]:
        pids = _pseudonym_array(pids, k)
    return pa.table({"raw": ids, "pid": pids})


def _pseudonym_array(ids: pa.Array, key: bytes) -> pa.Array:
    n = len(ids)
    if ids.null_count:
        return pa.array(_pseudonymise_one(ids.to_pylist(), key), pa.string())
    inner, outer = _hmac_states(key)
    new_inner, new_outer = inner.copy, outer.copy
    digests = []
    append = digests.append
    for raw in ids.cast(pa.binary()).to_pylist():  # UTF-8 bytes of each id
        i = new_inner()
        i.update(raw)
        o = new_outer()
        o.update(i.digest())
        append(o.digest())
    packed = np.frombuffer(b"".join(digests), np.uint8).reshape(n, 32)[:, : PSEUDONYM_HEX // 2]
    text = packed.tobytes().hex().encode("ascii")  # (n * PSEUDONYM_HEX,)
    offsets = np.arange(n + 1, dtype=np.int32) * PSEUDONYM_HEX
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))


def pseudonym_for(workspace: Workspace | str | Path, ids: Iterable[str]) -> dict[str, str]:
    """The pseudonyms of raw ``ids`` under this workspace's key (for the key holder's look-ups).

    Returns
    -------
    dict
        ``{raw_id: pseudonym}``.
    """
    ids = [str(i) for i in ids]
    return dict(zip(ids, pseudonymise_raw(ids, workspace_key(workspace))))


# --- thresholds ------------------------------------------------------------------------------------
# As Google Analytics' data thresholds: a count of fewer than MIN_USERS users (but more than none) is not
# printed in a report table or an audience summary, so that an aggregate cannot single out a few shoppers
# (MIN_USERS, the default of --min-users, is defined with the commands' settings in config.py).


def below_threshold(n_users: int | float | None, k: int) -> bool:
    """True when a cell of ``n_users`` users must be withheld: 0 < n < k (an empty cell singles out nobody)."""
    return n_users is not None and 0 < n_users < k


def count_text(n: int | float | None, n_users: int | float | None, k: int) -> str:
    """``n`` formatted, or ``"< k"`` when its cell holds fewer than ``k`` users (``n_users``)."""
    if n is None:
        return "–"
    return f"< {k}" if below_threshold(n_users, k) else f"{int(n):,}"


def check_min_users(k: int) -> int:
    """``k`` as given to ``--min-users``: an integer >= 1 (1 turns the thresholds off)."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"--min-users must be an integer >= 1 (1 shows every count), got {k!r}")
    return int(k)


def read_raw_ids(path: str | Path) -> list[str]:
    """The key holder's raw user ids for ``score --reidentify``: a CSV file whose ``user_id`` column (else its
    first column) holds them, with a header line; or a ``.txt`` file with one id per line, no header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--reidentify {path}: no such file (give the key holder's file of raw user ids)")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".txt":
            ids = [line.strip() for line in f]
        else:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                raise ValueError(f"--reidentify {path}: the file is empty (a header line, then one raw id per line)")
            col = header.index("user_id") if "user_id" in header else 0
            ids = [r[col].strip() for r in rows if len(r) > col]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"--reidentify {path}: no raw user id in the file")
    return ids
