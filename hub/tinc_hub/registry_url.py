"""Where the registry lives: ``--registry URL`` (env TINC_HUB_REGISTRY), checked strictly.

- ``sqlite:////ABSOLUTE/PATH`` or nothing: a SQLite file (default: registry.sqlite3 in the state dir).
- ``postgresql://USER@HOST[:PORT]/DB`` (also ``postgresql+psycopg://``), optionally
  ``?sslmode=…&sslrootcert=…&connect_timeout=…`` or ``?host=/socket/dir``: PostgreSQL through
  psycopg 3 (libpq).

A password is never part of the URL (it would show in ``ps``, shell history and unit files):
one is refused with a hint. It comes from ``--registry-password-file FILE`` (env
TINC_HUB_REGISTRY_PASSWORD_FILE), or from libpq itself (PGPASSWORD, ~/.pgpass, PGPASSFILE). Error
messages from the database pass through :meth:`RegistryURL.translate_errors`, which turns them
into one line and blanks the password should a driver ever echo it.
"""

import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple

from .errors import HubError

if TYPE_CHECKING:
    from .state import StateDir

PG_SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")
# libpq connection parameters a registry URL may carry (no password, no service file indirection)
PG_QUERY_KEYS = frozenset({"sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout",
                           "application_name", "host", "target_session_attrs"})
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}$")  # user and database names
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)$")
_QUERY_VALUE = re.compile(r"^[A-Za-z0-9_./:@=+-]{1,255}$")
PASSWORD_HINT = ("put the password in a file readable only by root and pass --registry-password-file FILE"
                 " (env TINC_HUB_REGISTRY_PASSWORD_FILE), or use PGPASSWORD / ~/.pgpass")


def _refuse(message: str, hint: str = "use postgresql://USER@HOST[:PORT]/DB or sqlite:////ABSOLUTE/PATH") -> HubError:
    return HubError(message, hint)


@dataclass(frozen=True)
class RegistryURL:
    """A checked registry location. ``password`` (from a file) never reaches a message."""

    dialect: str  # "sqlite" or "postgresql"
    path: Optional[Path] = None
    user: str = ""
    host: str = ""
    port: Optional[int] = None
    database: str = ""
    query: Tuple[Tuple[str, str], ...] = ()
    password: Optional[str] = field(default=None, repr=False, compare=False)

    @classmethod
    def sqlite(cls, path: Path) -> "RegistryURL":
        return cls("sqlite", path=Path(path))

    @classmethod
    def parse(cls, text: str, password: Optional[str] = None) -> "RegistryURL":
        """Check a --registry value; HubError (one line, never echoing a password) otherwise."""
        from urllib.parse import parse_qsl, unquote, urlsplit

        text = text.strip()
        scheme, sep, rest = text.partition("://")
        scheme = scheme.lower()
        if not sep:
            raise _refuse("the registry URL has no scheme")  # not echoed: it may hold a password
        if scheme == "sqlite":
            if not rest.startswith("/") or len(rest) < 2 or "?" in rest or "#" in rest:
                raise _refuse("a SQLite registry URL is sqlite:////ABSOLUTE/PATH (three slashes, then the path)")
            path = Path(unquote(rest[1:]))
            if not path.is_absolute() or "\0" in str(path):
                raise _refuse("a SQLite registry URL is sqlite:////ABSOLUTE/PATH (three slashes, then the path)")
            return cls.sqlite(path)
        if scheme not in PG_SCHEMES:
            raise _refuse(f"unsupported registry URL scheme {scheme!r}")
        parts = urlsplit("postgresql://" + rest)
        if parts.fragment:
            raise _refuse("a registry URL has no #fragment")
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        if not at:
            raise _refuse("the registry URL names no database user", "use postgresql://USER@HOST[:PORT]/DB")
        if ":" in userinfo:
            raise HubError("refusing a registry URL that contains a password", PASSWORD_HINT)
        user = unquote(userinfo)
        if not _NAME.match(user):
            raise _refuse("invalid database user name in the registry URL (letters, digits, _ . $ -)")
        try:
            port = parts.port
            host = parts.hostname or ""
        except ValueError:
            raise _refuse("invalid port in the registry URL") from None
        if hostport.startswith("["):
            host = "[" + host + "]"
        if host and not _HOST.match(host):
            raise _refuse(f"invalid host {_safe(host)!r} in the registry URL")
        database = unquote(parts.path.lstrip("/"))
        if not _NAME.match(database):
            raise _refuse("the registry URL names no valid database", "use postgresql://USER@HOST[:PORT]/DB")
        query = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
            if key == "password":
                raise HubError("refusing a registry URL that contains a password", PASSWORD_HINT)
            if key not in PG_QUERY_KEYS or not _QUERY_VALUE.match(value):
                raise _refuse(f"unsupported or invalid registry URL parameter {_safe(key)!r}",
                              "allowed: " + ", ".join(sorted(PG_QUERY_KEYS)))
            query.append((key, value))
        if not host and "host" not in dict(query):
            raise _refuse("the registry URL names no host", "use postgresql://USER@HOST[:PORT]/DB")
        return cls("postgresql", user=user, host=host.strip("[]") if host.startswith("[") else host,
                   port=port, database=database, query=tuple(query), password=password)

    def with_password(self, password: Optional[str]) -> "RegistryURL":
        from dataclasses import replace

        return replace(self, password=password)

    # -- views of it -------------------------------------------------------------------
    def display(self) -> str:
        """For messages and hub.json: never a password."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        query = "&".join(f"{k}={v}" for k, v in self.query)
        return f"postgresql://{self.user}@{host}{port}/{self.database}" + (f"?{query}" if query else "")

    def sqlalchemy_url(self) -> Any:
        import sqlalchemy as sa

        if self.dialect == "sqlite":
            return sa.URL.create("sqlite+pysqlite", database=str(self.path))
        return sa.URL.create("postgresql+psycopg", username=self.user, host=self.host or None,
                             port=self.port, database=self.database, query=dict(self.query))

    def connect_args(self) -> Dict[str, Any]:
        """Driver arguments: the password goes here, never into the URL or a message."""
        return {"password": self.password} if self.password is not None else {}

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Database errors as RegistryError lines (conflict, unavailable, other)."""
        import sqlalchemy.exc

        from .registry_contract import RegistryConflict, RegistryError, RegistryUnavailable

        try:
            try:
                yield
            except _driver_errors() as exc:  # raised by the driver itself (registry._begin)
                raise sqlalchemy.exc.DBAPIError.instance(None, None, exc, _driver_base(exc)) from exc
        except sqlalchemy.exc.IntegrityError as exc:
            raise RegistryConflict(f"registry conflict: {self._clean(exc)}",
                                   "another writer took the same name, address or key; retry") from None
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                sqlalchemy.exc.TimeoutError) as exc:
            hint = ("is PostgreSQL running and reachable, and are the user, database and password right?"
                    if self.dialect == "postgresql" else "is the state dir writable and not corrupted?")
            raise RegistryUnavailable(f"registry {self.display()} unavailable: {self._clean(exc)}", hint) from None
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise RegistryError(f"registry error ({self.display()}): {self._clean(exc)}",
                                "re-run with -v for details") from None

    def _clean(self, exc: BaseException) -> str:
        """The driver's message alone (no SQL, no parameters), on one line, password blanked."""
        orig = getattr(exc, "orig", None) or exc
        text = " ".join(str(orig).split()) or type(orig).__name__
        if self.password:
            text = text.replace(self.password, "********")
        return text[:500]


def _driver_errors() -> Tuple[type, ...]:
    """The base exception classes of the loaded database drivers."""
    import sqlite3
    import sys

    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error, psycopg.Error) if psycopg is not None else (sqlite3.Error,)


def _driver_base(exc: BaseException) -> type:
    """The DBAPI Error class ``exc`` derives from (DBAPIError.instance maps its subclasses)."""
    return next(base for base in _driver_errors() if isinstance(exc, base))


def _safe(text: str) -> str:
    """Anything after a colon in a user part may be a password: cut it before echoing."""
    return re.sub(r"(://[^/@]*?):[^/@]*@", r"\1:********@", text)[:200]


def read_password_file(path: str) -> str:
    """The first line of FILE (the password); HubError when unreadable, empty, or readable by
    other users (as ssh does with a private key)."""
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise HubError(f"the registry password file {path} is accessible to other users",
                               f"chmod 600 {shlex.quote(path)}")
            line = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise HubError(f"cannot read the registry password file {path}: {exc.strerror}",
                       "pass a readable file to --registry-password-file") from None
    if not line:
        raise HubError(f"the registry password file {path} is empty", "write the password on its first line")
    return line


def registry_url_of_state(state: "StateDir", url: Optional[str] = None,
                          password_file: Optional[str] = None) -> RegistryURL:
    """Where the hub's registry is: ``url`` (--registry / TINC_HUB_REGISTRY), else the one
    hub.json records, else registry.sqlite3 in the state dir. The password comes from
    ``password_file``, else (with hub.json's registry) the file hub.json names, else libpq's
    own PGPASSWORD / .pgpass / PGPASSFILE."""
    if url is None and state.exists():
        config = state.load_config()
        url, password_file = config.registry, password_file or config.registry_password_file
    if not url:
        return RegistryURL.sqlite(state.registry_file)
    password = read_password_file(password_file) if password_file else None
    return RegistryURL.parse(url, password)
