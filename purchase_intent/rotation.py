"""Key rotation: re-pseudonymise a workspace under a new key, in one commit.

    purchase-intent rotate-key --new-key-file new.key      # or $PURCHASE_INTENT_NEW_PSEUDONYM_KEY
    purchase-intent rotate-key --generate                  # a random 32-byte key (key file workspaces)

The workspace never holds raw ids, so it cannot hash them again under the new key. Instead every
stored pseudonym ``p`` becomes ``HMAC-SHA256(new key, p)`` truncated to 32 hex characters, and the
workspace key becomes the *chain* ``old key(s), new key`` (``privacy.key_chain``): the pseudonym of a
raw id is the old one wrapped once more. So

* the old key alone links nothing: ``HMAC(old key, raw id)`` is no longer stored anywhere, and
  pseudonyms that left the workspace before (exported scores, audiences) no longer match it;
* the new key alone links nothing to raw ids either; whoever maps raw ids (``pseudonym``,
  ``forget --user``, ``score --reidentify``, ``serve``, ``explain``, and ``ingest`` of new files)
  needs the whole chain. With the workspace key file, rotate-key writes the chain there (one hex key
  per line, oldest first). With ``$PURCHASE_INTENT_PSEUDONYM_KEY`` it cannot change the variable:
  set it to the hex keys, comma-separated, oldest first (rotate-key says so); until then the
  commands that use the key refuse the old one (its key id no longer matches the manifest's).

What is rewritten: ``user_id`` and ``session_id`` of every events part; every other Parquet or CSV
file with a ``user_id`` or ``session_id`` column (examples, predictions, scores, audiences; values
that are not pseudonyms, such as the raw ids of ``score --reidentify``, are kept); the ``raw`` and
``reason`` fields of ``rejects/*.csv`` (every 32-hex-character token there, which is how ingest
writes pseudonyms into them); the pseudonyms of ``erasure-log.jsonl``. HTML reports that show a
pseudonym are deleted (write them again with ``report``). The manifest records the new key id and
the rotation (time, old and new key ids). Any other file that holds an old pseudonym stops the
rotation before anything changes. Erased users stay erased: nothing is read again from the sources.

Old runs keep working through the mapping: no model reads a pseudonym (features and sequences are
per-user aggregates and event tokens), example ids do not change, and their predictions and scores
files are rewritten with the new pseudonyms; a running ``serve`` must be restarted to load the chain.

The commit is ``forget``'s: the new state is built as a second tree beside the workspace
(rewritten files written, the rest hard-linked) and swapped in with one ``renameat2(RENAME_EXCHANGE)``
(``workspace.link_tree``, ``workspace.atomic_dir``); a crash before the swap leaves the old workspace,
after it the new one, and the next command removes the other tree.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from . import memory, runs, storage
from .erasure import ERASURE_LOG, csv_bytes, csv_rows, file_bytes, run_dirs
from .privacy import (
    KEY_ENV,
    NEW_KEY_ENV,
    PSEUDONYM_HEX,
    as_key,
    chain_text,
    key_chain,
    key_id,
    parse_one_key,
    pseudonym_table,
    pseudonymise,
    workspace_key,
)
from .workspace import TMP_PREFIX, Workspace, as_workspace, atomic_dir, link_tree

ID_COLUMNS = ("user_id", "session_id")  # the columns that hold pseudonyms
REPORT_ID_CHARS = 12  # a report shows this many characters of a pseudonym
_TOKEN = re.compile(rb"(?<![0-9a-f])[0-9a-f]{%d}(?![0-9a-f])" % PSEUDONYM_HEX)
_TOKEN_TEXT = re.compile(r"(?<![0-9a-f])[0-9a-f]{%d}(?![0-9a-f])" % PSEUDONYM_HEX)
_PSEUDONYM_RE = f"^[0-9a-f]{{{PSEUDONYM_HEX}}}$"
_REPORT_TOKEN = re.compile(rb"(?<![0-9a-f])[0-9a-f]{%d}(?![0-9a-f])" % REPORT_ID_CHARS)


class KeyRotationError(ValueError):
    """The rotation cannot be done (no new key, the same key, a file it cannot rewrite); nothing changed."""


@dataclass
class RotationResult:
    """What `rotate-key` did."""

    old_key_id: str
    new_key_id: str
    pseudonyms: int  # distinct pseudonyms mapped
    files: dict[str, int]  # kind -> files rewritten (reports: deleted)
    runs: list[str]  # the workspace's runs: they keep working (their files with user ids were mapped)
    key_file: Optional[Path]  # where the chain was written; None when the key is in the environment
    chain_length: int = 2
    deleted_reports: list[str] = field(default_factory=list)


def read_new_key(path: Optional[str] = None, generate: bool = False) -> bytes:
    """The new key: from ``path`` (hex, or text taken as UTF-8), else ``$PURCHASE_INTENT_NEW_PSEUDONYM_KEY``,
    else 32 random bytes when ``generate``. Raises KeyRotationError when none is given or it is too short."""
    if path is not None and generate:
        raise KeyRotationError("give either --new-key-file or --generate, not both")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KeyRotationError(f"--new-key-file {p}: no such file")
        text, where = p.read_text(errors="replace"), f"--new-key-file {p}"
    elif os.environ.get(NEW_KEY_ENV):
        text, where = os.environ[NEW_KEY_ENV], f"${NEW_KEY_ENV}"
    elif generate:
        return secrets.token_bytes(32)
    else:
        raise KeyRotationError(f"rotate-key needs the new key: --new-key-file FILE, ${NEW_KEY_ENV}, or --generate "
                               "(a random key, written to the workspace key file); nothing was changed")
    if "," in text.strip() or "\n" in text.strip():
        raise KeyRotationError(f"{where} holds more than one key: give the one new key (hex, or text)")
    try:
        return parse_one_key(text)
    except ValueError as e:
        raise KeyRotationError(f"{where}: {e}; nothing was changed") from None


# ---------------------------------------------------------------------------------------------
# mapping old pseudonyms to new ones
def _is_pseudonym(arr: pa.Array) -> pa.Array:
    return pc.fill_null(pc.match_substring_regex(arr, _PSEUDONYM_RE), False)


def _rekey_array(arr: pa.ChunkedArray | pa.Array, key: bytes, seen: set) -> pa.Array:
    """Every pseudonym of a string column wrapped under ``key``; other values (nulls, raw ids) kept."""
    typ = arr.type
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    arr = arr.cast(pa.string())
    is_p = _is_pseudonym(arr)
    uniq = pc.unique(pc.filter(arr, is_p))
    if not len(uniq):
        return arr.cast(typ)
    seen.update(uniq.to_pylist())
    new = pseudonym_table(uniq, key).column("pid").combine_chunks()
    mapped = pc.take(new, pc.index_in(arr, value_set=uniq))
    return pc.if_else(is_p, mapped, arr).cast(typ)


def _rekey_table(table: pa.Table, key: bytes, seen: set) -> Optional[pa.Table]:
    """``table`` with its id columns rekeyed, or None when it has none."""
    text = (pa.types.is_string, pa.types.is_large_string)
    cols = [c for c in ID_COLUMNS if c in table.column_names and any(t(table.schema.field(c).type) for t in text)]
    if not cols:
        return None
    for c in cols:
        table = table.set_column(table.column_names.index(c), table.schema.field(c),
                                 _rekey_array(table.column(c), key, seen))
    return table


def _rekey_text(text: str, key: bytes, seen: set) -> str:
    def sub(m: re.Match) -> str:
        seen.add(m.group(0))
        return pseudonymise([m.group(0)], key)[0]
    return _TOKEN_TEXT.sub(sub, text)


# ---------------------------------------------------------------------------------------------
# the plan: relative path -> a writer of the new content (None: the file is removed)
Writer = Optional[Callable[[Path], None]]


def _event_writers(ws: Workspace, key: bytes, seen: set, con) -> dict[str, Writer]:
    """Each events part with its user and session pseudonyms rekeyed, its rows in their order: the
    distinct pseudonyms are mapped once (``pseudonym_table``, as ingest does) and joined in DuckDB."""
    out: dict[str, Writer] = {}
    for n, part in enumerate(ws.part_paths()):
        src = storage.scan(con, [part])
        cols = [d[0] for d in con.execute(f"SELECT * FROM {src} LIMIT 0").description]
        ids = [c for c in ID_COLUMNS if c in cols]
        if not ids:
            continue
        old = con.sql(" UNION ".join(f"SELECT {c} AS p FROM {src} WHERE regexp_full_match({c}, "
                                         f"'[0-9a-f]{{{PSEUDONYM_HEX}}}')" for c in ids)).to_arrow_table().column(0)
        seen.update(old.to_pylist())
        name = f"rekey_map_{n}"
        con.register(name, pseudonym_table(old, key))
        joins = " ".join(f"LEFT JOIN {name} m_{c} ON m_{c}.raw = e.{c}" for c in ids)
        replace = ", ".join(f"coalesce(m_{c}.pid, e.{c}) AS {c}" for c in ids)

        def write(dest: Path, src=src, joins=joins, replace=replace) -> None:  # rows in their order
            storage.copy_to_parquet(con, f"SELECT e.* EXCLUDE (_row) REPLACE ({replace}) FROM "
                                    f"(SELECT *, row_number() OVER () AS _row FROM {src}) e {joins} ORDER BY e._row",
                                    dest)
        out[str(part.relative_to(ws.root))] = write
    return out


def _reject_writers(ws: Workspace, key: bytes, seen: set) -> dict[str, Writer]:
    out: dict[str, Writer] = {}
    for path in sorted(ws.rejects_dir.glob("*.csv")) if ws.rejects_dir.is_dir() else []:
        rows = csv_rows(path)
        if not rows:
            continue
        cols = [i for i, h in enumerate(rows[0]) if h in ("raw", "reason")]
        new = rows[:1] + [[_rekey_text(v, key, seen) if i in cols else v for i, v in enumerate(r)] for r in rows[1:]]
        if new != rows:
            data = csv_bytes(new, gz=False)
            out[str(path.relative_to(ws.root))] = lambda dest, data=data: dest.write_bytes(data)
    return out


def _sources(ws: Workspace) -> set[Path]:
    return {Path(e["source"]).resolve() for e in ws.read_manifest()["files"] if e.get("source")}


def _skipped(ws: Workspace, path: Path, sources: set[Path]) -> bool:
    rel = path.relative_to(ws.root)
    return (any(p.startswith(TMP_PREFIX) for p in rel.parts) or runs.MODEL_DIR in rel.parts[:-1]
            or path.resolve() in sources or not path.is_file() or path.is_symlink())


def _table_writers(ws: Workspace, key: bytes, seen: set, done: set[str]) -> tuple[dict[str, Writer], set[str]]:
    """Every other Parquet or CSV file with an id column (examples, predictions, scores, audiences),
    and the runs they belong to; source logs in the workspace (raw ids, not ours) are skipped."""
    out: dict[str, Writer] = {}
    run_names: set[str] = set()
    sources = _sources(ws)
    files = sorted(p for p in ws.root.rglob("*") if p.name.endswith((".parquet", ".csv", ".csv.gz")))
    for path in files:
        rel = str(path.relative_to(ws.root))
        if rel in done or _skipped(ws, path, sources) or path.parent == ws.rejects_dir:
            continue
        if path.suffix == ".parquet":
            if not set(ID_COLUMNS) & set(storage.read_schema(path).names):
                continue
            table = _rekey_table(storage.read_table(path), key, seen)
            if table is None:
                continue
            out[rel] = lambda dest, table=table: storage.write_parquet(table, dest)
        else:
            rows = csv_rows(path)
            if not rows or not set(ID_COLUMNS) & set(rows[0]):
                continue
            idx = [rows[0].index(c) for c in ID_COLUMNS if c in rows[0]]
            pattern = re.compile(_PSEUDONYM_RE)

            def cell(i: int, v: str) -> str:
                if i in idx and pattern.match(v):
                    seen.add(v)
                    return pseudonymise([v], key)[0]
                return v
            new = rows[:1] + [[cell(i, v) for i, v in enumerate(r)] for r in rows[1:]]
            data = csv_bytes(new, gz=path.name.endswith(".gz"))
            out[rel] = lambda dest, data=data: dest.write_bytes(data)
        parts = Path(rel).parts
        if parts[0] == "runs" and len(parts) > 2:
            run_names.add(parts[1])
    return out, run_names


def _log_writer(ws: Workspace, key: bytes, seen: set) -> dict[str, Writer]:
    log = ws.root / ERASURE_LOG
    if not log.exists():
        return {}
    lines = []
    for line in storage.read_text(log).splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if isinstance(rec.get("pseudonym"), str) and re.fullmatch(_PSEUDONYM_RE[1:-1], rec["pseudonym"]):
            seen.add(rec["pseudonym"])
            rec["pseudonym"] = pseudonymise([rec["pseudonym"]], key)[0]
        lines.append(json.dumps(rec) + "\n")
    data = storage.seal("".join(lines).encode())
    return {ERASURE_LOG: lambda dest: dest.write_bytes(data)}


def _leftovers(ws: Workspace, seen: set, planned: set[str]) -> dict[str, Writer]:
    """Every other file: an HTML report that shows an old pseudonym is removed; any other file that
    holds one stops the rotation (its format is not known here, so it cannot be rewritten)."""
    out: dict[str, Writer] = {}
    prefixes = {p[:REPORT_ID_CHARS].encode() for p in seen}
    needles = {p.encode() for p in seen}
    known = pa.array(sorted(seen), pa.string())
    sources = _sources(ws)
    for path in sorted(ws.root.rglob("*")):
        rel = str(path.relative_to(ws.root))
        if rel in planned or _skipped(ws, path, sources) or path.name == ".lock":
            continue
        if path.suffix == ".parquet":  # other string columns (the id columns were rewritten above)
            schema = storage.read_schema(path)
            text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
            table = storage.read_table(path, columns=text) if text and len(known) else None
            if table is not None and any(pc.any(pc.is_in(table.column(c).cast(pa.string()), value_set=known)).as_py()
                                         for c in text):
                raise KeyRotationError(f"{path} holds a pseudonym in a column rotate-key does not rewrite (only "
                                       f"{' and '.join(ID_COLUMNS)}); remove the file, then rotate again. Nothing was "
                                       "changed")
            continue
        data = file_bytes(path)
        if path.suffix in (".html", ".htm"):
            if any(m.group(0) in prefixes for m in _REPORT_TOKEN.finditer(data)):
                out[rel] = None
            continue
        if any(m.group(0) in needles for m in _TOKEN.finditer(data)):
            raise KeyRotationError(f"{path} holds a pseudonym and rotate-key does not know its format; remove the "
                                   "file (or its pseudonyms), then rotate again. Nothing was changed")
    return out


def plan(ws: Workspace, new_key: bytes) -> tuple[dict[str, Writer], set[str], set[str]]:
    """Every file that changes (relative path -> writer; None removes it), the old pseudonyms seen,
    and the runs whose files were mapped."""
    seen: set[str] = set()
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    memory.configure(con, ws.root)  # the user's memory limit; spills under the workspace, as its other steps
    writers = _event_writers(ws, new_key, seen, con) if ws.part_paths() else {}
    writers.update(_reject_writers(ws, new_key, seen))
    tables, run_names = _table_writers(ws, new_key, seen, set(writers))
    writers.update(tables)
    writers.update(_log_writer(ws, new_key, seen))
    writers.update(_leftovers(ws, seen, set(writers)))
    return writers, seen, run_names


def rotate_key(workspace: Workspace | str | Path | None = None, new_key: Optional[bytes] = None) -> RotationResult:
    """Re-pseudonymise the workspace under ``new_key`` in one commit (see the module docstring).

    Raises
    ------
    KeyRotationError
        No new key, one shorter than 16 bytes, a key already in the chain, an empty workspace, or a
        file that holds a pseudonym in a format not known here. Nothing is changed.
    ValueError
        The current key is missing or not the one the workspace was pseudonymised with.
    """
    ws = as_workspace(workspace)
    if not ws.root.is_dir():
        raise KeyRotationError(f"no workspace at {ws.root}")
    if new_key is None:
        raise KeyRotationError(f"rotate-key needs the new key: --new-key-file FILE or ${NEW_KEY_ENV}")
    new_key = parse_one_key(new_key.hex())  # the length check
    with ws.lock("rotate-key"):
        ws.recover()
        manifest = ws.read_manifest()
        if not manifest.get("key_id"):
            raise KeyRotationError(f"workspace {ws.root} holds no pseudonymised events yet: nothing to rotate "
                                   "(a new workspace takes the new key at its first ingest)")
        from_env = bool(os.environ.get(KEY_ENV))
        if not from_env and not ws.key_path.exists():
            raise ValueError(f"the pseudonymisation key is missing ({ws.key_path}, or ${KEY_ENV}): restore it, "
                             "then rotate")
        old = key_chain(workspace_key(ws))
        if new_key in old:
            raise KeyRotationError("the new key is the key in use (or an earlier one of its chain): give another "
                                   "key; nothing was changed")
        chain = as_key(old + (new_key,))
        writers, seen, run_names = plan(ws, new_key)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        rotations = list(manifest.get("key_rotations", []))
        rotations.append({"time": now, "from_key_id": manifest["key_id"], "to_key_id": key_id(chain),
                          "pseudonyms": len(seen)})
        manifest = {**manifest, "key_id": key_id(chain), "key_rotations": rotations}
        manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
        writers[str(ws.manifest_path.relative_to(ws.root))] = lambda dest: dest.write_bytes(manifest_bytes)
        key_file = None if from_env else ws.key_path
        if key_file is not None:
            text = storage.seal(chain_text(chain).encode())  # sealed in an encrypted workspace, as ingest writes it
            writers[str(key_file.relative_to(ws.root))] = lambda dest: dest.write_bytes(text)
        root = ws.root.resolve()
        with atomic_dir(root) as new:
            link_tree(root, new, writers)
            if key_file is not None:
                os.chmod(new / key_file.name, 0o600)
    kinds: dict[str, int] = {}
    for rel, w in writers.items():
        kind = _kind(rel, w)
        kinds[kind] = kinds.get(kind, 0) + 1
    all_runs = sorted({d.name for d in run_dirs(ws)} | run_names)
    return RotationResult(old_key_id=rotations[-1]["from_key_id"], new_key_id=key_id(chain), pseudonyms=len(seen),
                          files=kinds, runs=all_runs, key_file=key_file, chain_length=len(key_chain(chain)),
                          deleted_reports=sorted(r for r, w in writers.items() if w is None))


def _kind(rel: str, writer: Writer) -> str:
    parts = Path(rel).parts
    if writer is None:
        return "reports deleted"
    if parts[0] == "events":
        return "events" if rel.endswith(".parquet") else "manifest"
    if parts[0] in ("rejects", "examples", "runs"):
        return {"runs": "run files"}.get(parts[0], parts[0])
    if rel == ERASURE_LOG:
        return "erasure log"
    if rel == "pseudonym.key":
        return "key file"
    return "other files"


def describe(result: RotationResult) -> str:
    """The lines `purchase-intent rotate-key` prints."""
    what = ", ".join(f"{n} {k}" for k, n in sorted(result.files.items()))
    lines = [f"rotated the pseudonym key: key id {result.old_key_id} -> {result.new_key_id}; "
             f"{result.pseudonyms:,} pseudonyms mapped ({what})"]
    if result.runs:
        lines.append(f"runs keep working (no model reads a pseudonym; example ids are unchanged): "
                     f"{', '.join(result.runs)}")
    if result.deleted_reports:
        lines.append(f"reports deleted (they showed old pseudonyms; write them again): "
                     f"{', '.join(result.deleted_reports)}")
    if result.key_file is not None:
        lines.append(f"the key chain ({result.chain_length} keys, oldest first) is in {result.key_file}: keep all "
                     "of them, raw ids map to pseudonyms through the whole chain")
    else:
        lines.append(f"the key is ${KEY_ENV}: set it now to the {result.chain_length} keys as hex, comma-separated, "
                     "oldest first (the old one(s), then the new one); the old key alone is refused")
    lines.append("restart any running `serve` of this workspace (it holds the old key)")
    return "\n".join(lines)
