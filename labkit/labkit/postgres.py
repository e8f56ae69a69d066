"""A throwaway PostgreSQL cluster for the tests: Debian's binaries (/usr/lib/postgresql/*/bin),
a new data directory in a private temp dir, run as the ``postgres`` system user when we are
root (initdb refuses root), listening only on 127.0.0.1 at a free port and on a unix socket in
that temp dir. Local (socket) connections are trusted; TCP ones need a password
(scram-sha-256). :meth:`ThrowawayPostgres.stop` (also at interpreter exit) stops the server and
removes everything. A system cluster (pg_lsclusters) is never touched.

    with ThrowawayPostgres() as pg:
        url = pg.create_database("reg1", user="hub", password="s3cret")
        # postgresql://hub@127.0.0.1:PORT/reg1 (the password is not in it)
"""

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from .loopback_hub import free_port

SUPERUSER = "postgres"
START_TIMEOUT_S = 60


def postgres_bin_dir() -> Optional[Path]:
    """The newest /usr/lib/postgresql/VERSION/bin that has initdb and pg_ctl, or None."""
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(path).parent.name
        if version.isdigit() and os.access(f"{path}/initdb", os.X_OK) and os.access(f"{path}/pg_ctl", os.X_OK):
            found.append((int(version), Path(path)))
    return max(found)[1] if found else None


def unavailable_reason() -> Optional[str]:
    """Why a throwaway cluster cannot run here (for pytest.skip), or None."""
    if postgres_bin_dir() is None:
        return "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin (tests/setup-env installs postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run initdb as"
    return None


class ThrowawayPostgres:
    """One private PostgreSQL server; ``start()`` / ``stop()`` or a ``with`` block."""

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        if self.bin_dir is None:
            raise RuntimeError(unavailable_reason())
        self.port = 0
        self.root: Optional[Path] = None
        self.started = False

    # -- paths -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    # -- running commands as the cluster owner ----------------------------------------------
    def _as_owner(self, argv: List[str]) -> List[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--"] + argv
        return argv

    def _run(self, argv: List[str], timeout: float = START_TIMEOUT_S) -> None:
        result = subprocess.run(self._as_owner(argv), stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=timeout, cwd="/")
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")

    def start(self) -> "ThrowawayPostgres":
        self.root = Path(tempfile.mkdtemp(prefix="tinc-pg-"))
        atexit.register(self.stop)
        try:
            os.chmod(self.root, 0o700)
            self.socket_dir.mkdir(mode=0o700)
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                for path in (self.root, self.socket_dir):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                       "-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
                       "--no-instructions", "--no-sync"])
            self.port = free_port()
            with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(
                    "\n# labkit.postgres: a throwaway test cluster\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n"
                    "max_connections = 200\n"
                    "shared_buffers = 32MB\n"
                    "fsync = off\n"  # a test cluster: durability is SQLite's business here
                    "full_page_writes = off\n"
                    "log_min_messages = warning\n")
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                       "-w", "-t", str(START_TIMEOUT_S), "start"])
            self.started = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove the temp dir; safe to call twice."""
        if self.root is None:
            return
        if self.started:
            try:
                self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast",
                           "-w", "-t", "30", "stop"])
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                           "-w", "-t", "30", "stop"])
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "ThrowawayPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin -------------------------------------------------------------------------
    def admin(self, dbname: str = "postgres"):  # -> psycopg.Connection
        """A superuser connection over the private socket (autocommit)."""
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER,
                               dbname=dbname, autocommit=True)

    def create_database(self, name: str, user: str, password: Optional[str] = None) -> str:
        """A login role (made if missing, with ``password`` for TCP) owning a new database
        ``name``; returns its TCP URL (postgresql://USER@127.0.0.1:PORT/NAME, no password)."""
        from psycopg import sql

        with self.admin() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user)))
            if password is not None:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user),
                                                                         sql.Literal(password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                         sql.Identifier(user)))
        return self.url(name, user)

    def url(self, name: str, user: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{name}"

    def socket_url(self, name: str, user: str) -> str:
        """The same database over the private unix socket (trusted: no password)."""
        return f"postgresql://{user}@:{self.port}/{name}?host={self.socket_dir}"

    def drop_database(self, name: str) -> None:
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop_server(self) -> None:
        """Stop the server but keep the cluster (start it again with :meth:`start_server`)."""
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])
        self.started = False

    def start_server(self) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                   "-w", "-t", str(START_TIMEOUT_S), "start"])
        self.started = True
