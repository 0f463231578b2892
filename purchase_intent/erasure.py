"""Erasure on request (GDPR art. 17): remove every row of one or more users from a workspace.

    purchase-intent forget --user 12345 [--user 67890]      # raw ids, pseudonymised with the workspace key
    purchase-intent forget --pseudonym 3f9a...             # or their pseudonyms

What is removed, for each user (found by pseudonym, never by raw id):

* events: their rows in every Parquet part the manifest lists (``events/part-*.parquet``); the
  manifest entry of each part records how many rows were erased from it (``erased``);
* rejects: rows of ``rejects/*.csv`` whose fields hold the pseudonym (ids are pseudonymised there),
  and, given the raw id, lines that ingest kept as read because it could not find their id field
  (e.g. a broken quote) where the raw id is one whole field;
* examples and features: their rows of ``examples/examples.parquet`` and the same rows of
  ``features.parquet`` (which is in the examples' row order); ``build.json`` is kept, so runs still
  match their build;
* predictions: rows of every run's ``predictions.parquet`` whose ``example_id`` was one of their
  examples (only for runs trained on the current build; others name examples that no longer exist);
* scores: rows of every Parquet file with a ``user_id`` column and every CSV file with one under
  ``runs/`` (``scores-*.parquet``, audiences), with the counts of a ``.summary.json`` beside it;
* reports: an HTML report that names one of them (it shows the start of a pseudonym) is deleted.

Any other file that still holds a pseudonym stops the erasure before anything changes, with an
error naming the file. Every run of the workspace is then marked stale (``runs/NAME/stale.json``:
reason, time, how many users) when the users had events or examples, since every model, the
pretrained encoder included, learned from the events; `score`, `serve` and `report` warn about a
stale run until it is trained again (training writes a fresh run folder, without the mark). One
line per user goes to ``erasure-log.jsonl``: time, pseudonym and the count removed per kind,
never the raw id.

The commit: one rename of the whole workspace
---------------------------------------------
The erased rows live in many files (events, rejects, examples, predictions, scores), and readers
(`serve`, `explain`) read without the lock, so no order of per-file renames is safe: a reader
between two renames would see events erased but scores not. Instead the new state is built as a
complete second tree next to the workspace, ``<parent>/.tmp-<pid>-<random>-<name>``
(``workspace.atomic_dir``): the rewritten files are written there, every unchanged file is
hard-linked (no copy of the data; every write in the workspace replaces files rather than changing
them in place, so a link never sees a later write), the stale marks and the audit log line are
added, everything is fsynced, and the two trees are swapped with one ``renameat2(RENAME_EXCHANGE)``.
That swap is the commit point: every path looked up before it resolves in the old state, every one
after it in the new. The old tree is then deleted. The lock file is hard-linked too, so the
``flock`` held by this command (``Workspace.lock``) stays held across the swap.

A crash (even ``kill -9``) before the swap leaves the workspace unchanged plus a half-built tree
beside it; after it, the erased workspace plus the old tree beside it. Either leftover carries a
temporary name of a dead process: the next writing command finds the dead holder's lock record and
runs ``Workspace.recover``, which removes them (``forget`` itself also removes them first). So
after recovery the workspace is exactly the old or the new state, and the erased rows are gone
from disk once the old tree is deleted. Where the file system cannot swap two directories (not
Linux), ``atomic_dir`` falls back to two renames, and a crash between them leaves both trees under
temporary names; this is stated as the one gap.

What erasure does not reach: copies outside the workspace (source logs, ``score --out`` files
elsewhere, backups) and the models' weights, which is why the runs are marked stale.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Optional

import duckdb
import numpy as np
import pyarrow as pa

from . import memory, runs, storage
from .pretrain import PRETRAINED_RUN
from .privacy import KEY_ENV, PSEUDONYM_HEX, earlier_pseudonyms, id_text, key_id, load_key, pseudonymise_raw
from .score import summary_path
from .workspace import TMP_PREFIX, Workspace, as_workspace, atomic_dir, link_tree

ERASURE_LOG = "erasure-log.jsonl"
REPORT_ID_CHARS = 12  # the report shows this many characters of a pseudonym
KINDS = ("events", "rejects", "examples", "predictions", "scores", "reports")
_PSEUDONYM = re.compile(f"[0-9a-f]{{{PSEUDONYM_HEX}}}")


class UnknownUserError(ValueError):
    """None of the workspace's files holds a row of the user; nothing was changed."""


@dataclass
class ErasureResult:
    """What `forget` removed: counts per pseudonym and kind, the runs marked stale, the audit log."""

    removed: dict[str, dict[str, int]]  # pseudonym -> kind -> rows (reports: files)
    stale_runs: list[str]
    log: Path
    unmapped_predictions: list[str] = field(default_factory=list)  # runs trained on another build
    already_erased: dict[str, str] = field(default_factory=dict)  # pseudonym -> when, for users erased before


# ---------------------------------------------------------------------------------------------
# who
def resolve_pseudonyms(ws: Workspace, users: Iterable[str] = (),
                       pseudonyms: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The pseudonyms of raw ``users`` (under the workspace key) and ``pseudonyms`` as given,
    deduplicated, and ``{raw id: pseudonym}`` of the users (kept in memory only).

    Raises ValueError when nobody is named, a pseudonym is malformed, or the key is missing or
    not the one the workspace was built with (raw ids would map to pseudonyms it never stored).
    """
    users, pseudonyms = [str(u) for u in users], [str(p).strip().lower() for p in pseudonyms]
    if not users and not pseudonyms:
        raise ValueError("forget needs --user RAW_ID or --pseudonym P (repeatable)")
    bad = [p for p in pseudonyms if not _PSEUDONYM.fullmatch(p)]
    if bad:
        raise ValueError(f"not a pseudonym: {bad[0]!r} ({PSEUDONYM_HEX} hex characters, as `purchase-intent "
                         "pseudonym ID` prints)")
    raw_ids: dict[str, str] = {}
    if users:
        if not os.environ.get(KEY_ENV) and not ws.key_path.exists():
            raise ValueError(f"the pseudonymisation key is missing ({ws.key_path}, or ${KEY_ENV}): raw ids cannot "
                             "be looked up; give --pseudonym instead")
        key = load_key(ws)
        recorded = ws.read_manifest().get("key_id")
        if recorded and recorded != key_id(key):
            raise ValueError("the pseudonymisation key differs from the one this workspace was built with; "
                             f"set {KEY_ENV} back, or give --pseudonym")
        raw_ids = dict(zip(users, pseudonymise_raw(users, key)))
        # a file read before ids were read as ingest reads them now stored '13085.0' under its own pseudonym:
        # each raw id is looked up as written and as pandas writes a whole number too, and those stored are erased
        others = {u: earlier_pseudonyms(u, key) for u in users}
        if any(others.values()):
            stored = _stored_users(ws, [*raw_ids.values(), *(p for ps in others.values() for p in ps)])
            for u, ps in others.items():
                for p in (p for p in ps if p in stored):
                    if raw_ids[u] in stored:
                        pseudonyms.append(p)
                    else:
                        raw_ids[u] = p
    return list(dict.fromkeys(pseudonyms + list(raw_ids.values()))), raw_ids


def _stored_users(ws: Workspace, pids: list[str]) -> set[str]:
    """Which of the pseudonyms ``pids`` hold events or rejected rows in the workspace."""
    found: set[str] = set()
    if ws.part_paths():
        with ws.connect() as con:
            found = {r[0] for r in con.execute("SELECT DISTINCT user_id FROM events WHERE list_contains($p, user_id)",
                                               {"p": pids}).fetchall()}
    for path in sorted(ws.rejects_dir.glob("*.csv")) if ws.rejects_dir.is_dir() else []:
        text = "\n".join(",".join(row) for row in csv_rows(path))
        found |= {p for p in pids if p in text}
    return found


# ---------------------------------------------------------------------------------------------
# the plan: what changes, file by file (read only)
@dataclass
class _Change:
    rel: str  # path relative to the workspace root
    kind: str
    counts: dict[str, int]  # pseudonym -> rows (or 1 for a file removed)
    write: Optional[Callable[[Path], None]]  # writes the new content; None removes the file


def _event_changes(ws: Workspace, pids: list[str], con) -> list[_Change]:
    out = []
    for part in ws.part_paths():
        rows = con.execute(f"SELECT user_id, count(*) FROM {storage.scan(con, [part])} "
                           "WHERE list_contains($p, user_id) GROUP BY 1", {"p": pids}).fetchall()
        if not rows:
            continue

        def write(dest: Path, part=part) -> None:  # the same COPY as ingest's, minus the users' rows
            storage.copy_to_parquet(con, f"SELECT * FROM {storage.scan(con, [part])} WHERE user_id IS NULL OR "
                                    "NOT list_contains($p, user_id)", dest, {"p": pids})
        out.append(_Change(str(part.relative_to(ws.root)), "events", dict(rows), write))
    return out


def csv_rows(path: Path) -> list[list[str]]:
    data = storage.read_bytes(path)  # sealed in an encrypted workspace
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def file_bytes(path: Path) -> bytes:
    """The content of any workspace file, unsealed, and decompressed when it is gzip (what the scans
    for leftover pseudonyms of ``forget`` and ``rotate-key`` read)."""
    data = storage.unseal(path.read_bytes(), path)
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            pass  # not gzip after all: its bytes
    return data


def csv_bytes(rows: list[list[str]], gz: bool) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    data = buf.getvalue().encode("utf-8")
    return storage.seal(gzip.compress(data, mtime=0) if gz else data)


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda dest: dest.write_bytes(data)


_FIELD_SEPARATORS = re.compile(r"[,;\t|:{}\[\]]")


def _raw_id_owner(text: str, raw_ids: dict[str, str]) -> Optional[str]:
    """The pseudonym of the raw id that is a whole field of a rejected line kept as read (a line too
    broken to find its id field in, so ingest could not pseudonymise it), or None."""
    if not raw_ids or _PSEUDONYM.search(text):
        return None
    fields = {id_text(f.strip().strip("\"'").strip()) for f in _FIELD_SEPARATORS.split(text)}
    return next((p for raw, p in raw_ids.items() if id_text(raw) in fields), None)


def _reject_changes(ws: Workspace, pids: list[str], raw_ids: dict[str, str]) -> list[_Change]:
    out = []
    for path in sorted(ws.rejects_dir.glob("*.csv")) if ws.rejects_dir.is_dir() else []:
        rows = csv_rows(path)
        counts: dict[str, int] = defaultdict(int)
        kept = rows[:1]
        for row in rows[1:]:
            hit = next((p for p in pids if any(p in v for v in row)), None)
            if hit is None and len(row) > 3:
                hit = _raw_id_owner(row[3], raw_ids)
            if hit is None:
                kept.append(row)
            else:
                counts[hit] += 1
        if counts:
            out.append(_Change(str(path.relative_to(ws.root)), "rejects", dict(counts),
                               _write_bytes(csv_bytes(kept, gz=False))))
    return out


def _filtered_table(table: pa.Table, keep: np.ndarray, row_group_size: int | None = None) -> Callable[[Path], None]:
    return lambda dest: storage.write_parquet(table.filter(pa.array(keep)), dest, row_group_size)


def _user_counts(user_ids: np.ndarray, pids: list[str]) -> tuple[dict[str, int], np.ndarray]:
    """Rows per pseudonym among ``user_ids``, and the mask of rows to keep."""
    wanted = set(pids)
    hit = np.fromiter((u in wanted for u in user_ids), dtype=bool, count=len(user_ids))
    found, n = np.unique(user_ids[hit], return_counts=True)
    return {str(p): int(k) for p, k in zip(found, n)}, ~hit


def _example_changes(ws: Workspace, pids: list[str]) -> tuple[list[_Change], set[int]]:
    d = ws.examples_dir
    if not (d / runs.EXAMPLES).exists():
        return [], set()
    ex = storage.read_table(d / runs.EXAMPLES)
    counts, keep = _user_counts(np.asarray(ex.column("user_id").to_pylist(), dtype=object), pids)
    if not counts:
        return [], set()
    ids = set(np.asarray(ex.column("example_id"))[~keep].tolist())
    out = [_Change(f"examples/{runs.EXAMPLES}", "examples", counts, _filtered_table(ex, keep))]
    if (d / runs.FEATURES).exists():
        feats = storage.read_table(d / runs.FEATURES)
        if feats.num_rows != ex.num_rows:
            raise RuntimeError(f"{d / runs.FEATURES} has {feats.num_rows} rows for {ex.num_rows} examples: "
                               "rebuild with `purchase-intent build`, then forget again")
        out.append(_Change(f"examples/{runs.FEATURES}", "features", {},
                           _filtered_table(feats, keep, runs.FEATURE_ROW_GROUP)))
    return out, ids


def run_dirs(ws: Workspace) -> list[Path]:
    if not ws.runs_dir.is_dir():
        return []
    return sorted(p for p in ws.runs_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(TMP_PREFIX)
                  and ((p / runs.RUN_JSON).exists() or p.name == PRETRAINED_RUN))


def _prediction_changes(ws: Workspace, example_ids: set[int], pids: list[str],
                        owner: dict[int, str]) -> tuple[list[_Change], list[str]]:
    build = ws.examples_dir / runs.BUILD_JSON
    build_id = json.loads(build.read_text()).get("build_id") if build.exists() else None
    out, unmapped = [], []
    for d in run_dirs(ws):
        path = d / runs.PREDICTIONS
        if not path.exists() or not example_ids:
            continue
        meta = runs.read_meta(d) if (d / runs.RUN_JSON).exists() else {}
        if meta.get("build_id") not in (None, build_id):
            unmapped.append(d.name)
            continue
        table = storage.read_table(path)
        eids = np.asarray(table.column("example_id"))
        hit = np.isin(eids, list(example_ids))
        if hit.any():
            counts: dict[str, int] = defaultdict(int)
            for e in eids[hit].tolist():
                counts[owner[e]] += 1
            out.append(_Change(str(path.relative_to(ws.root)), "predictions", dict(counts),
                               _filtered_table(table, ~hit)))
    return out, unmapped


def _summary_change(ws: Workspace, scores: Path, prob: np.ndarray, keep: np.ndarray) -> Optional[_Change]:
    """The counts of a scores file's ``.summary.json`` once the rows not in ``keep`` are gone."""
    path = summary_path(scores)
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    n_removed = int((~keep).sum())
    s.update(n_rows=int(keep.sum()), expected_buyers=float(prob[keep].sum()),
             expected_precision=float(prob[keep].mean()) if keep.any() else None,
             erased_users=int(s.get("erased_users", 0)) + n_removed)
    if isinstance(s.get("n_scored"), int):
        s["n_scored"] -= n_removed
    if isinstance(s.get("expected_buyers_all"), (int, float)):
        s["expected_buyers_all"] = float(s["expected_buyers_all"]) - float(prob[~keep].sum())
    return _Change(str(path.relative_to(ws.root)), "summaries", {},
                   _write_bytes((json.dumps(s, indent=2) + "\n").encode()))


def _score_changes(ws: Workspace, pids: list[str], skip: set[Path]) -> list[_Change]:
    """Rows of every other Parquet or CSV file with a user_id column in the workspace (scores and
    audiences), with their summaries; source logs (raw ids, not ours to edit) are skipped."""
    out, sources = [], _sources(ws)
    files = sorted(p for p in ws.root.rglob("*.parquet") if p not in skip and p.is_file())
    files += sorted(p for p in ws.root.rglob("*") if p.name.endswith((".csv", ".csv.gz")) and p.is_file()
                    and p.parent != ws.rejects_dir and p.resolve() not in sources)
    for path in files:
        rel = path.relative_to(ws.root)
        if any(part.startswith(TMP_PREFIX) for part in rel.parts) or runs.MODEL_DIR in rel.parts[:-1]:
            continue
        if path.suffix == ".parquet":
            if "user_id" not in storage.read_schema(path).names:
                continue
            table = storage.read_table(path)
            cols = {c: table.column(c).to_pylist() for c in ("user_id", "probability") if c in table.column_names}
        else:
            rows = csv_rows(path)
            if not rows or "user_id" not in rows[0]:
                continue
            cols = {c: [r[rows[0].index(c)] for r in rows[1:]] for c in ("user_id", "probability") if c in rows[0]}
        counts, keep = _user_counts(np.asarray(cols["user_id"], dtype=object), pids)
        if not counts:
            continue
        if path.suffix == ".parquet":
            write = _filtered_table(table, keep)
        else:
            write = _write_bytes(csv_bytes(rows[:1] + [r for r, k in zip(rows[1:], keep) if k],
                                            gz=path.name.endswith(".gz")))
        out.append(_Change(str(rel), "scores", counts, write))
        prob = np.asarray(cols.get("probability", np.zeros(len(keep))), dtype=np.float64)
        summary = _summary_change(ws, path, prob, keep)
        if summary is not None:
            out.append(summary)
    return out


def _sources(ws: Workspace) -> set[Path]:
    """The ingested source files (the manifest's), e.g. the simulated shop `quickstart` writes into the workspace."""
    return {Path(e["source"]).resolve() for e in ws.read_manifest()["files"] if e.get("source")}


def _leftover_changes(ws: Workspace, pids: list[str], planned: set[str]) -> list[_Change]:
    """Every other file: an HTML report naming a user is removed; any other file holding a
    pseudonym stops the erasure (its format is not known here, so it cannot be rewritten)."""
    out, sources = [], _sources(ws)
    needles = [p.encode() for p in pids]
    prefixes = [p[:REPORT_ID_CHARS].encode() for p in pids]
    for path in sorted(ws.root.rglob("*")):
        rel = path.relative_to(ws.root)
        if (not path.is_file() or path.is_symlink() or str(rel) in planned or path.suffix == ".parquet"
                or rel.parts[0] == ERASURE_LOG or any(part.startswith(TMP_PREFIX) for part in rel.parts)):
            continue
        if path.resolve() in sources:
            continue
        data = file_bytes(path)
        if path.suffix in (".html", ".htm"):
            hits = {p: 1 for p, pre in zip(pids, prefixes) if pre in data}
            if hits:
                out.append(_Change(str(rel), "reports", hits, None))
            continue
        if any(n in data for n in needles):
            raise RuntimeError(f"{path} holds a pseudonym to erase and forget does not know its format; "
                               "remove the file (or the user's lines in it), then forget again. Nothing was changed")
    return out


def plan(ws: Workspace, pids: list[str], raw_ids: Optional[dict[str, str]] = None) -> tuple[list[_Change], list[str]]:
    """Every file that changes when ``pids`` are erased, and the runs whose predictions cannot be mapped.

    ``raw_ids`` (raw id -> pseudonym, held in memory only) also finds rejected lines that ingest
    kept as read because it could not locate their id field."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    memory.configure(con, ws.root)  # the user's memory limit; spills under the workspace, as its other steps
    changes = _event_changes(ws, pids, con) if ws.part_paths() else []
    changes += _reject_changes(ws, pids, raw_ids or {})
    ex_changes, example_ids = _example_changes(ws, pids)
    changes += ex_changes
    owner: dict[int, str] = {}
    if example_ids:
        ex = storage.read_table(ws.examples_dir / runs.EXAMPLES, columns=["example_id", "user_id"]).to_pydict()
        owner = {e: u for e, u in zip(ex["example_id"], ex["user_id"]) if e in example_ids}
    pred_changes, unmapped = _prediction_changes(ws, example_ids, pids, owner)
    changes += pred_changes
    skip = {ws.root / c.rel for c in changes} | set(ws.part_paths())
    skip |= {ws.examples_dir / runs.EXAMPLES, ws.examples_dir / runs.FEATURES}
    skip |= {d / runs.PREDICTIONS for d in run_dirs(ws)}
    changes += _score_changes(ws, pids, skip)
    changes += _leftover_changes(ws, pids, {c.rel for c in changes})
    return changes, unmapped


# ---------------------------------------------------------------------------------------------
# the commit: a second tree, swapped in with one rename
def _mark_stale(run_dir: Path, now: str, n_users: int) -> None:
    old = runs.read_stale(run_dir) or {}
    users = int(old.get("users", 0)) + n_users
    mark = {"reason": f"it learned from data of {users} user(s) erased on request (GDPR art. 17)",
            "erased_at": old.get("erased_at", now), "last_erasure_at": now, "users": users}
    (run_dir / runs.STALE_JSON).unlink(missing_ok=True)  # a hard link of the old tree's mark
    (run_dir / runs.STALE_JSON).write_text(json.dumps(mark, indent=2) + "\n")


def _manifest_with_erased(ws: Workspace, changes: list[_Change]) -> bytes:
    erased = {Path(c.rel).name: sum(c.counts.values()) for c in changes if c.kind == "events"}
    manifest = ws.read_manifest()
    for entry in manifest["files"]:
        n = sum(erased.get(p, 0) for p in entry["parts"])
        if n:
            entry["erased"] = int(entry.get("erased", 0)) + n
    return (json.dumps(manifest, indent=2) + "\n").encode()


def forget(workspace: Workspace | str | Path | None = None, users: Iterable[str] = (),
           pseudonyms: Iterable[str] = ()) -> ErasureResult:
    """Erase every row of ``users`` (raw ids) and ``pseudonyms`` from the workspace in one commit.

    Parameters
    ----------
    workspace : the workspace (default: ``$PURCHASE_INTENT_WORKSPACE`` or ``./pi-workspace``).
    users : raw user ids, pseudonymised with the workspace key.
    pseudonyms : pseudonyms, as ``purchase-intent pseudonym`` prints them.

    Returns
    -------
    ErasureResult: rows removed per pseudonym and kind, the runs marked stale, the audit log path.

    Raises
    ------
    UnknownUserError
        When a user has no row in the workspace (nothing is changed, for any of them).
    """
    ws = as_workspace(workspace)
    if not ws.root.is_dir():
        raise FileNotFoundError(f"no workspace at {ws.root}")
    users, pseudonyms = list(users), list(pseudonyms)
    with ws.lock("forget"):
        ws.recover()
        pids, raw_ids = resolve_pseudonyms(ws, users, pseudonyms)
        changes, unmapped = plan(ws, pids, raw_ids)
        removed: dict[str, dict[str, int]] = {p: {k: 0 for k in KINDS} for p in pids}
        for c in changes:
            for p, n in c.counts.items():
                if c.kind in KINDS:
                    removed[p][c.kind] += n
        unknown = [p for p in pids if not any(removed[p].values())]
        log = ws.root / ERASURE_LOG
        erased_at = _erased_before(log) if unknown else {}
        already = {p: erased_at[p] for p in unknown if p in erased_at}  # a re-run of an erasure: nothing left
        if already and len(already) == len(unknown):
            pids, unknown = [p for p in pids if p not in already], []
            removed = {p: removed[p] for p in pids}
            if not pids:
                return ErasureResult(removed={}, stale_runs=[], log=log, already_erased=already)
        if unknown:
            names = {p: raw for raw, p in raw_ids.items()}
            who = ", ".join(f"{names[p]!r} (pseudonym {p})" if p in names else f"pseudonym {p}" for p in unknown)
            raise UnknownUserError(f"no data of user {who} in workspace {ws.root}; nothing was changed")
        learned = sum(removed[p]["events"] + removed[p]["examples"] for p in pids)
        stale = [d.name for d in run_dirs(ws)] if learned else []
        now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        changed = {c.rel: c for c in changes}
        if any(c.kind == "events" for c in changes):
            changed["events/manifest.json"] = _Change("events/manifest.json", "manifest", {},
                                                      _write_bytes(_manifest_with_erased(ws, changes)))
        lines = "".join(json.dumps({"time": now, "pseudonym": p, "removed": removed[p], "runs_marked_stale": stale})
                        + "\n" for p in pids)
        old_log = storage.read_bytes(log) if log.exists() else b""  # sealed in an encrypted workspace
        changed[ERASURE_LOG] = _Change(ERASURE_LOG, "log", {}, _write_bytes(storage.seal(old_log + lines.encode())))
        root = ws.root.resolve()
        with atomic_dir(root) as new:
            link_tree(root, new, {rel: c.write for rel, c in changed.items()})
            if not log.exists():
                (new / ERASURE_LOG).write_bytes(storage.seal(lines.encode()))
            os.chmod(new / ERASURE_LOG, 0o600)  # it names pseudonyms
            for name in stale:
                _mark_stale(new / "runs" / name, now, len(pids))
    return ErasureResult(removed=removed, stale_runs=stale, log=log, unmapped_predictions=unmapped,
                         already_erased=already)


def _erased_before(log: Path) -> dict[str, str]:
    """Pseudonym -> the time of its last erasure, from the audit log."""
    if not log.exists():
        return {}
    out = {}
    for line in storage.read_bytes(log).decode("utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            out[entry["pseudonym"]] = entry["time"]
    return out


def describe(result: ErasureResult) -> str:
    """The lines `purchase-intent forget` prints."""
    lines = [f"pseudonym {p}: already erased at {t}, nothing of it is left" for p, t in result.already_erased.items()]
    for p, counts in result.removed.items():
        what = ", ".join(f"{n:,} {k}" for k, n in counts.items() if n)
        lines.append(f"erased pseudonym {p}: {what}")
    if result.stale_runs:
        lines.append(f"runs marked stale (retrain them): {', '.join(result.stale_runs)}")
    if result.unmapped_predictions:
        lines.append(f"predictions of {', '.join(result.unmapped_predictions)} come from an older build and "
                     "name no current example: left as they are (retrain to replace them)")
    if result.removed:
        lines.append(f"audit line(s) appended to {result.log}")
    return "\n".join(lines)
