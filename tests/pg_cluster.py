"""A throwaway PostgreSQL server for the tests and benchmarks/bench_postgres.py.

``initdb`` a cluster in a new folder under the system temp dir, start it with ``pg_ctl`` on a free
TCP port of 127.0.0.1 (password login, scram-sha-256) with its unix socket in the same folder
(trust login for the superuser, used to set up tables and load rows with COPY), and remove it all
on ``stop()``. PostgreSQL refuses to run as root: as root, the server's commands run as the
``postgres`` user (``runuser -u postgres --``), which then owns the folder.

    cluster = start_cluster()
    cluster.admin("CREATE TABLE t (a int)")
    url = cluster.url()          # postgresql://shop:<password>@127.0.0.1:<port>/shop
    cluster.stop()
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote

USER, DATABASE = "shop", "shop"
PASSWORD = "Pw-7%q!Zr8-x"  # characters a URL must percent-encode, so that both forms are checked


def server_bin() -> Optional[Path]:
    """The folder of ``initdb`` and ``pg_ctl`` (on PATH, or Debian's /usr/lib/postgresql/N/bin), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path  # data/, the unix socket, the server log
    port: int
    bin: Path

    def url(self, password: Optional[str] = PASSWORD, user: str = USER, db: str = DATABASE) -> str:
        """The application's URL: TCP with a password (None: no password in the URL)."""
        auth = user + (f":{quote(password, safe='')}" if password is not None else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def admin_url(self, db: str = DATABASE) -> str:
        """The superuser over the unix socket (trust)."""
        return f"postgresql://postgres@/{db}?host={quote(str(self.root), safe='')}&port={self.port}"

    def admin(self, *statements: str, db: str = DATABASE) -> None:
        """Run SQL statements as the superuser (autocommit: CREATE DATABASE, COPY ... FROM a file)."""
        import adbc_driver_postgresql.dbapi as dbapi

        with dbapi.connect(self.admin_url(db), autocommit=True) as conn, conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)

    def copy_csv(self, table: str, csv_path: Path) -> None:
        """COPY a CSV file with a header into ``table`` (the server reads it: it is copied next to the cluster)."""
        dest = self.root / f"load-{os.getpid()}-{Path(csv_path).name}"
        shutil.copyfile(csv_path, dest)
        _chown(dest)
        try:
            self.admin(f"COPY {table} FROM '{dest}' WITH (FORMAT csv, HEADER true)")
        finally:
            dest.unlink(missing_ok=True)

    def stop(self) -> None:
        _run([str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=120)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


def start_cluster() -> Cluster:
    """initdb + start a server; the role ``shop`` (password PASSWORD) owns the database ``shop``."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL's initdb and pg_ctl were not found (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pi-pg-"))  # not under pytest's tmp dirs: those are private to the user
    _chown(root)
    pwfile = root / "pw"
    pwfile.write_text("unused-superuser-password\n")
    _chown(pwfile)
    port = _free_port()
    _run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth-local=trust",
          "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C"])
    opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
    try:
        _run([str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", opts,
              "-w", "-t", "60", "start"])
    except RuntimeError as e:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"{e}\n{log[-2000:]}") from None
    cluster = Cluster(root, port, bin_dir)
    try:
        cluster.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'", db="postgres")
        cluster.admin(f"CREATE DATABASE {DATABASE} OWNER {USER}", db="postgres")
    except Exception:
        cluster.stop()
        raise
    return cluster
