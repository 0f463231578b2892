"""Encryption at rest: every file a workspace holds about shoppers is read and written through here.

With ``$PURCHASE_INTENT_ENCRYPTION_KEY`` set (or ``--encryption-key-file PATH``), this process encrypts
what it writes and decrypts what it reads; without a key, the functions below are the plain Parquet
and file calls the workspace always used (DuckDB's own ``read_parquet`` and ``COPY``, pandas/pyarrow).

* Parquet (events, examples, features, predictions, scores, audiences): Parquet modular encryption,
  ``AES_GCM_V1``, footer and every column encrypted (the file starts and ends with ``PARE``). Each file
  has its own random data keys; they are wrapped (AES-GCM, through a key-encryption key, "double
  wrapping") under the master key and kept in the file's footer. The cipher is Arrow's (OpenSSL).
* Any other file about shoppers (rejects CSV, erasure's audit log, the pseudonymisation key file):
  sealed whole, ``MAGIC + nonce (12 bytes) + AES-GCM(master key, content)`` (cryptography's AESGCM).
* The master key is derived from the user's key with scrypt; the user's key never reaches the disk.
  ``<workspace>/encryption.json`` marks the workspace encrypted and holds a key check value (AES-GCM
  of a constant under the master key), so a missing or wrong key is refused before anything is read
  or written (:func:`check_workspace`).

DuckDB here cannot write encrypted Parquet, so in an encrypted workspace DuckDB scans the files
through a decrypting pyarrow dataset (:func:`scan`, streaming) and query results go out as Arrow
record batches into an encrypting ``ParquetWriter`` (:func:`copy_to_parquet`). The events, read by
many queries of one command, are decrypted once into a DuckDB temporary table when the table fits in
half of what DuckDB may hold (:data:`TABLE_BYTES_PER_FILE_BYTE`) or DuckDB may spill it to a folder the
user named (:func:`create_view`).
"""
from __future__ import annotations

import base64
import functools
import io
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

ENCRYPTION_KEY_ENV = "PURCHASE_INTENT_ENCRYPTION_KEY"
MARKER = "encryption.json"  # in the workspace root: encrypted or not, and the key check value
SEALED_MAGIC = b"PI-AESGCM-1\n"  # the first bytes of a sealed (non-Parquet) file
MIN_KEY_CHARS = 16
_KDF_SALT = b"purchase-intent encryption at rest v1"
_CHECK_TEXT = b"purchase-intent key check v1"
_MASTER_KEY_ID = "pi-master"
_HOW = f"set {ENCRYPTION_KEY_ENV} or give --encryption-key-file PATH"


class EncryptionKeyError(RuntimeError):
    """The encryption key is missing, wrong, or given for a workspace that is not encrypted."""


# --- the key --------------------------------------------------------------------------------

_key_from_file: bytes | None = None


def set_key_file(path: str | Path | None) -> None:
    """Use the key in ``path`` (its text, surrounding whitespace stripped) for this process; None: back
    to ``$PURCHASE_INTENT_ENCRYPTION_KEY``."""
    global _key_from_file
    if path is None:
        _key_from_file = None
        return
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise EncryptionKeyError(f"cannot read the encryption key file {path}: {e.strerror or e}") from None
    _key_from_file = _valid_key(data, f"the encryption key file {path}")


def _valid_key(data: bytes, where: str) -> bytes:
    if len(data) < MIN_KEY_CHARS:
        raise EncryptionKeyError(f"{where} holds {len(data)} characters; an encryption key needs at least "
                                 f"{MIN_KEY_CHARS} (make one with `openssl rand -base64 32`)")
    return data


def user_key() -> bytes | None:
    """The key this process encrypts with: ``--encryption-key-file``'s, else ``$PURCHASE_INTENT_ENCRYPTION_KEY``."""
    if _key_from_file is not None:
        return _key_from_file
    env = os.environ.get(ENCRYPTION_KEY_ENV, "").strip()
    return _valid_key(env.encode(), f"${ENCRYPTION_KEY_ENV}") if env else None


def active() -> bool:
    """Whether this process writes encrypted files (a key is given)."""
    return user_key() is not None


@functools.lru_cache(maxsize=8)
def _master(key: bytes) -> bytes:
    return Scrypt(salt=_KDF_SALT, length=32, n=2 ** 14, r=8, p=1).derive(key)


def _aead(key: bytes | None = None) -> AESGCM:
    k = key if key is not None else user_key()
    if k is None:
        raise EncryptionKeyError(f"no encryption key: {_HOW}")
    return AESGCM(_master(k))


# --- the workspace's marker -----------------------------------------------------------------


def is_encrypted_workspace(root: str | Path) -> bool:
    return (Path(root) / MARKER).is_file()


def _holds_data(root: Path) -> bool:
    return any((root / d).exists() for d in ("events", "rejects", "examples", "runs"))


def check_workspace(root: str | Path) -> bool:
    """Refuse a missing or wrong key for an encrypted workspace, and a key for an unencrypted one that
    holds data; True when the workspace is (or, given a key and still empty, is to be) encrypted. A
    writer then records :func:`new_marker` in a workspace that has none (``Workspace.lock`` does)."""
    root = Path(root)
    marker = root / MARKER
    key = user_key()
    if marker.is_file():
        if key is None:
            raise EncryptionKeyError(f"workspace {root} is encrypted: {_HOW}")
        try:
            rec = json.loads(marker.read_text())
            raw = base64.b64decode(rec["check"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise EncryptionKeyError(f"{marker} is damaged ({e}); restore it from a backup") from None
        try:
            ok = _aead(key).decrypt(raw[:12], raw[12:], b"check") == _CHECK_TEXT
        except InvalidTag:
            ok = False
        if not ok:
            raise EncryptionKeyError(f"wrong encryption key for workspace {root}: give the key it was created "
                                     "with; nothing was read or written")
        return True
    if key is None:
        return False
    if _holds_data(root):
        raise EncryptionKeyError(f"workspace {root} holds unencrypted data and an encryption key is given: "
                                 f"unset {ENCRYPTION_KEY_ENV} (and --encryption-key-file) to use it, "
                                 "or use a new workspace")
    return True


def new_marker() -> dict:
    """The content of ``encryption.json`` for the key given: the key check value, never the key."""
    nonce = os.urandom(12)
    check = base64.b64encode(nonce + _aead().encrypt(nonce, _CHECK_TEXT, b"check")).decode()
    return {"version": 1, "parquet": "modular encryption, AES_GCM_V1, footer and all columns encrypted",
            "other_files": "AES-256-GCM, sealed whole", "kdf": "scrypt (n=2^14, r=8, p=1)",
            "check": check, "note": "key check value only; the key is never stored here"}


# --- sealed files (anything but Parquet) -------------------------------------------------------


def seal(data: bytes) -> bytes:
    """``data`` sealed with AES-GCM when a key is given, else ``data`` unchanged."""
    if not active():
        return data
    nonce = os.urandom(12)
    return SEALED_MAGIC + nonce + _aead().encrypt(nonce, data, SEALED_MAGIC)


def unseal(data: bytes, what: str | Path = "a file") -> bytes:
    """The content of ``data`` (sealed or plain)."""
    if not data.startswith(SEALED_MAGIC):
        return data
    if not active():
        raise EncryptionKeyError(f"{what} is encrypted: {_HOW}")
    body = data[len(SEALED_MAGIC):]
    try:
        return _aead().decrypt(body[:12], body[12:], SEALED_MAGIC)
    except InvalidTag:
        raise EncryptionKeyError(f"cannot decrypt {what}: wrong encryption key, or the file is damaged") from None


def read_bytes(path: str | Path) -> bytes:
    return unseal(Path(path).read_bytes(), path)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def is_sealed(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SEALED_MAGIC)) == SEALED_MAGIC


# --- Parquet ----------------------------------------------------------------------------------


class _LocalKms(pe.KmsClient):
    """Wraps the per-file keys with AES-GCM under the master key; no key server involved."""

    def __init__(self, aead: AESGCM):
        super().__init__()
        self._aead = aead

    def wrap_key(self, key_bytes, master_key_identifier):
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, key_bytes, master_key_identifier.encode())).decode()

    def unwrap_key(self, wrapped_key, master_key_identifier):
        raw = base64.b64decode(wrapped_key)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], master_key_identifier.encode())
        except InvalidTag:
            raise EncryptionKeyError("cannot decrypt a Parquet file: wrong encryption key") from None


@functools.lru_cache(maxsize=8)
def _crypto(key: bytes) -> tuple[pe.CryptoFactory, pe.KmsConnectionConfig]:
    """(CryptoFactory, KmsConnectionConfig) for one user key (one factory per key: no cache shared)."""
    aead = _aead(key)
    return pe.CryptoFactory(lambda _config: _LocalKms(aead)), pe.KmsConnectionConfig()


def _encryption_properties():
    factory, kms = _crypto(user_key())
    cfg = pe.EncryptionConfiguration(footer_key=_MASTER_KEY_ID, uniform_encryption=True,
                                     encryption_algorithm="AES_GCM_V1", plaintext_footer=False,
                                     double_wrapping=True, data_key_length_bits=256, internal_key_material=True)
    return factory.file_encryption_properties(kms, cfg)


def _decryption_properties(path: str | Path):
    key = user_key()
    if key is None:
        raise EncryptionKeyError(f"{path} is encrypted: {_HOW}")
    factory, kms = _crypto(key)
    return factory.file_decryption_properties(kms, pe.DecryptionConfiguration())


def is_encrypted_file(path: str | Path) -> bool:
    """Whether a Parquet file has an encrypted footer (``PARE``)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PARE"
    except OSError:
        return False


def _table(data: pa.Table | Any) -> pa.Table:
    return data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)


def write_parquet(data: pa.Table | Any, path: str | Path, row_group_size: int | None = None) -> None:
    """A table or DataFrame to ``path`` (encrypted when a key is given; a DataFrame without its index);
    ``row_group_size``: rows per row group (None: pyarrow's default)."""
    kw = {} if row_group_size is None else {"row_group_size": int(row_group_size)}
    if not active():
        if isinstance(data, pa.Table):
            pq.write_table(data, path, **kw)
        else:
            data.to_parquet(path, index=False, **kw)
        return
    pq.write_table(_table(data), path, encryption_properties=_encryption_properties(), **kw)


def parquet_bytes(data: pa.Table | Any) -> bytes:
    """A table or DataFrame as the bytes of a Parquet file (encrypted when a key is given)."""
    if not active():
        return data.to_parquet(index=False) if not isinstance(data, pa.Table) else _bytes_of(data)
    return _bytes_of(_table(data), encryption_properties=_encryption_properties())


def _bytes_of(table: pa.Table, **kw) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


def parquet_writer(path: str | Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A ``ParquetWriter`` (encrypting when a key is given)."""
    if not active():
        return pq.ParquetWriter(path, schema)
    return pq.ParquetWriter(path, schema, encryption_properties=_encryption_properties())


def _read_kw(path: str | Path) -> dict:
    return {"decryption_properties": _decryption_properties(path)} if is_encrypted_file(path) else {}


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a table (decrypted when encrypted)."""
    return pq.read_table(path, columns=columns, **_read_kw(path))


def read_frame(path: str | Path, columns: list[str] | None = None):
    """A Parquet file as a DataFrame (decrypted when encrypted)."""
    import pandas as pd  # here, not at the top: pandas (and pyarrow.dataset) take ~0.3 s to import, and the
    # command line reads this module before it knows whether the command needs them

    if not is_encrypted_file(path):
        return pd.read_parquet(path, columns=columns)
    return read_table(path, columns).to_pandas()


def read_schema(path: str | Path) -> pa.Schema:
    return pq.read_schema(path, **_read_kw(path))


def read_metadata(path: str | Path) -> pq.FileMetaData:
    return pq.read_metadata(path, **_read_kw(path))


def parquet_file(path: str | Path) -> pq.ParquetFile:
    """A ``ParquetFile`` to read row group by row group (decrypting when encrypted)."""
    return pq.ParquetFile(path, **_read_kw(path))


def _sql_str(p: str | Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


_scan_ids = itertools.count()


def scan(con, paths: Iterable[str | Path], union_by_name: bool = False) -> str:
    """What to put after FROM to read Parquet ``paths`` in DuckDB connection ``con``.

    Plain files: DuckDB's ``read_parquet``. Encrypted ones: a decrypting pyarrow dataset registered in
    ``con`` (DuckDB pulls its record batches as it goes, with projection and filters pushed down)."""
    paths = [Path(p) for p in paths]
    if not any(is_encrypted_file(p) for p in paths):
        files = ", ".join(_sql_str(p) for p in paths)
        return f"read_parquet([{files}]{', union_by_name = true' if union_by_name else ''})"
    import pyarrow.dataset as ds  # imports pandas (see read_frame)

    factory, kms = _crypto(user_key() or _missing_key(paths[0]))
    config = ds.ParquetDecryptionConfig(factory, kms, pe.DecryptionConfiguration())
    fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(decryption_config=config))
    schemas = [read_schema(p) for p in paths]
    schema = pa.unify_schemas(schemas) if union_by_name else schemas[0]
    name = f"_pi_scan_{next(_scan_ids)}"
    con.register(name, ds.dataset([str(p) for p in paths], schema=schema, format=fmt))
    return name


# DuckDB memory that the events' temporary table takes per byte of their encrypted Parquet files: 4.2 measured
# (duckdb_memory()) on a 10M-event simulated log, 1,328 MiB for 317 MiB of Parquet; rounded up
TABLE_BYTES_PER_FILE_BYTE = 4.5


def materializes(file_bytes: int, memory_bytes: int, spills: bool) -> bool:
    """Whether encrypted events of ``file_bytes`` (their Parquet files) are decrypted once into a temporary
    table, where DuckDB may hold ``memory_bytes``: when DuckDB may spill it (``spills``: a spill folder is
    named), or when the table (:data:`TABLE_BYTES_PER_FILE_BYTE`) fits in half of ``memory_bytes``, leaving
    the other half to the queries. Else every query scans the files through the decrypting dataset: about 2x
    a build's time, and no bound on memory either (a 20M-event log filled 18.8 GiB that way and stopped, where
    loaded once it built in 1.06x its plaintext time: BENCHMARKS.md, "Encrypted logs loaded once wherever
    their table fits in memory")."""
    return spills or file_bytes * TABLE_BYTES_PER_FILE_BYTE <= memory_bytes / 2


def create_view(con, name: str, paths: Iterable[str | Path], union_by_name: bool = False,
                spills: bool = False, memory_bytes: int = 0) -> None:
    """``name`` in ``con``: the rows of Parquet ``paths``, for queries to read by that name.

    Plain files: a view over DuckDB's ``read_parquet`` (as before encryption existed). Encrypted ones:
    decrypted once into a temporary table (DuckDB's own storage, as fast to query as plain Parquet) where
    :func:`materializes` says so for ``memory_bytes``, what ``con`` may hold (its memory limit), and
    ``spills`` (``con`` may spill to a folder the user named, where DuckDB puts the table's blocks that do
    not fit its memory limit); else a view over the decrypting dataset."""
    paths = [Path(p) for p in paths]
    source = scan(con, paths, union_by_name)
    if not source.startswith("_pi_scan_") or not materializes(sum(p.stat().st_size for p in paths), memory_bytes,
                                                              spills):
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {source}")
        return
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {source}")
    con.unregister(source)


def _missing_key(path: Path) -> bytes:
    raise EncryptionKeyError(f"{path} is encrypted: {_HOW}")


def copy_to_parquet(con, sql: str, path: str | Path, params: dict | None = None, compression: str | None = None,
                    row_group_size: int = 122_880) -> None:
    """Write the result of the DuckDB query ``sql`` to the Parquet file ``path`` (encrypted when a key
    is given: streamed as record batches, never whole in memory). ``compression`` (e.g. "zstd") and
    ``row_group_size``: None / DuckDB's default row groups unless given."""
    if not active():
        opts = "".join(f", {k} {v}" for k, v in (("COMPRESSION", compression), ("ROW_GROUP_SIZE", row_group_size))
                       if v is not None)
        con.execute(f"COPY ({sql}) TO {_sql_str(path)} (FORMAT parquet{opts})", params)
        return
    reader = con.sql(sql, params=params).to_arrow_reader(row_group_size)
    with pq.ParquetWriter(path, reader.schema, encryption_properties=_encryption_properties(),
                          compression=compression or "snappy") as writer:
        for batch in reader:
            writer.write_batch(batch)
