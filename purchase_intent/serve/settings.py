"""Typed settings of the scoring API: one dataclass, filled from flags and the environment.

API keys come from ``PURCHASE_INTENT_API_KEYS`` (comma-separated) and/or ``--api-key-file`` (one
key per line, ``#`` comments); both sources are merged. The server refuses to start without a key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..workspace import RUN_JSON

API_KEYS_ENV = "PURCHASE_INTENT_API_KEYS"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ServeSettings:
    """Everything `purchase-intent serve` is configured with."""

    workspace: str = "pi-workspace"
    run: str = "lightgbm"  # a run name under runs_dir (or a path inside it)
    runs_dir: Optional[str] = None  # the only place runs are loaded from; None = <workspace>/runs
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default_factory=tuple, repr=False)
    max_events: int = 5_000  # events per user in one request (422 above)
    max_users: int = 100  # users in one batch request (422 above)
    max_body_bytes: int = 8 * 1024 * 1024  # request body size (413 above)
    future_tolerance_s: float = 300.0  # clock skew allowed for `ts` / `at` in the future
    log_level: str = "warning"
    # after loading the run, move every live object out of the garbage collector's sight
    # (gc.freeze), so that full collections stop walking the modules and the model; it is
    # process-wide, so `serve` turns it on and in-process apps (tests) leave it off
    freeze_gc: bool = False
    # record this process in <runs dir>/.servers/ while it serves (serve.pidfile), so that `retrain`
    # can signal it to reload a promoted run; `serve` turns it on, in-process apps (tests) leave it off
    record_pid: bool = False

    @property
    def runs_path(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir else Path(self.workspace) / "runs"


def read_api_keys(env: Optional[str] = None, key_file: Optional[str | Path] = None) -> tuple[str, ...]:
    """Keys from the environment value (comma-separated) and a key file (one per line)."""
    env = os.environ.get(API_KEYS_ENV, "") if env is None else env
    keys = [k.strip() for k in env.split(",")]
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            keys.append(line)
    out = tuple(dict.fromkeys(k for k in keys if k))
    short = [k for k in out if len(k) < 8]
    if short:
        raise ValueError(f"{len(short)} API key(s) are shorter than 8 characters; use long random keys")
    return out


def resolve_run_dir(runs_dir: str | Path, run: str | Path) -> Path:
    """The directory of ``run``, which must lie inside ``runs_dir``; ValueError otherwise.

    A run is a plain name (letters, digits, ``.``, ``_``, ``-``) or a path that resolves (links
    followed) to a direct child of ``runs_dir``; nothing outside it is ever loaded.
    """
    root = Path(runs_dir).resolve()
    text = str(run)
    if _RUN_NAME.match(text) and text not in (".", ".."):
        candidate = (root / text).resolve()
    else:
        candidate = Path(text).resolve()
    if candidate.parent != root:
        raise ValueError(f"run {text!r} is not a run directory inside {root}")
    if not (candidate / RUN_JSON).is_file():
        raise FileNotFoundError(f"no run {candidate.name!r} in {root}")
    return candidate
