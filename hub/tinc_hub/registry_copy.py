"""``tinc-hub registry copy --to postgresql://…``: move a single hub's registry onto PostgreSQL.

Every token, node and hub (revoked and removed ones too), exposure, tombstone and the settings are copied in one transaction of the target, under this
hub's registry write lock (no local enrolment, token or revocation can land meanwhile), into a
target that must be empty (no registry tables, or a registry schema without rows). The target
gets the same schema revision (Alembic, migrated to this code's head like the source). After the
copy, the rows are read back and compared (counts and every value). Then hub.json records the
target URL (no password), so that every later command, and the API once restarted, uses it.

The API server keeps its old registry open until it restarts: with ``switch`` the copy refuses
while another process has the SQLite file open (``/proc/*/fd``), so that no enrolment can go to
the old file after the copy.
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

from .errors import HubError
from .registry import SCHEMA_REVISION, ExposureRow, HubRow, NodeRow, Registry, Tombstone, TokenRow
from .registry_url import RegistryURL, read_password_file
from .state import StateDir


@dataclass(frozen=True)
class CopyResult:
    tokens: int
    nodes: int
    revoked_nodes: int
    exposures: int
    revision: str
    target: str  # the target URL without password
    switched: bool


def processes_using(path: Path) -> List[int]:
    """Pids (other than this one) with ``path`` open, from /proc (those this user may see)."""
    try:
        wanted = os.stat(path)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    st = os.stat(fd.path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (wanted.st_dev, wanted.st_ino):
                    pids.append(int(entry.name))
                    break
    return pids


@dataclass(frozen=True)
class Contents:
    """Everything a registry holds (nodes: every row of ``nodes``, the hubs' too)."""
    tokens: List[TokenRow]
    nodes: List[NodeRow]
    hubs: List[HubRow]
    settings: Dict[str, str]  # without the generation counter
    exposures: List[ExposureRow]
    tombstones: List[Tombstone]  # removed nodes: a returning machine is told why (410)


def _read_all(registry: Registry) -> Contents:
    with registry.snapshot() as view:
        settings = view.settings()
        settings.pop("generation", None)
        return Contents(view.list_tokens(), view.list_rows(), view.list_hubs(), settings,
                        view.list_exposures(), view.list_tombstones())


def write_config_atomically(state: StateDir, text: str) -> None:
    """Replace hub.json (mode 0600) by rename: a crash leaves the old or the new file."""
    tmp = state.config_file.with_name(f".{state.config_file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state.config_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(state.root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def copy_registry(state: StateDir, source: Registry, to: str, password_file: Optional[str],
                  switch: bool = True) -> CopyResult:
    """Copy ``source`` (migrated to this code's schema) into the empty registry at ``to``."""
    password = read_password_file(password_file) if password_file else None
    target_url = RegistryURL.parse(to, password)
    if target_url.dialect != "postgresql":
        raise HubError("registry copy --to takes a PostgreSQL URL", "use postgresql://USER@HOST[:PORT]/DB")
    if source.dialect == "postgresql" and source.url.display() == target_url.display():
        raise HubError(f"the hub already uses {target_url.display()}", "nothing to copy")
    target = Registry.open(target_url, state.lock_file)
    try:
        with source.exclusive():  # no writer of this hub until the copy is verified and recorded
            if switch and source.db_path is not None:
                users = processes_using(source.db_path)
                if users:
                    raise HubError(f"{source.db_path} is open in process(es) {', '.join(map(str, users))}"
                                   " (the API server?): enrolments it takes after the copy would be lost",
                                   "stop the API service first, then re-run; or pass --no-switch")
            _refuse_non_empty(target)
            source_contents = _read_all(source)
            tokens, nodes = source_contents.tokens, source_contents.nodes
            target.create()  # the schema, by the same migrations (no-op if already there)
            with target.transaction() as tx:
                if tx.count_tokens() or tx.count_nodes() or tx.list_hubs():  # again, under the target's write lock
                    raise HubError(f"{target.describe()} is not empty (filled meanwhile)",
                                   "copy only into an empty registry")
                tx.insert_tokens(tokens)
                tx.insert_nodes(nodes)
                tx.insert_hub_rows(source_contents.hubs)
                tx.insert_exposure_rows(source_contents.exposures)  # after their nodes
                for tombstone in source_contents.tombstones:  # in removal order
                    tx.add_tombstone(tombstone)
                for key, value in sorted(source_contents.settings.items()):
                    tx.put_setting(key, value)
            copied = _read_all(target)
            revision = target.schema_revision()
            if copied != source_contents or revision != SCHEMA_REVISION:
                raise HubError(f"verification failed: {target.describe()} holds {len(copied.tokens)} token(s)"
                               f" and {len(copied.nodes)} node(s) at schema {revision!r}, the source"
                               f" {len(tokens)} and {len(nodes)} at {SCHEMA_REVISION!r}",
                               "hub.json was not changed; empty the target and re-run")
            if switch:
                config = state.load_config()
                recorded = replace(config, registry=target_url.display(),
                                   registry_password_file=os.path.abspath(password_file) if password_file else None)
                write_config_atomically(state, recorded.to_json())
    finally:
        target.dispose()
    nodes = [n for n in nodes if n.kind == "node"]
    return CopyResult(tokens=len(tokens), nodes=len(nodes), exposures=len(source_contents.exposures),
                      revoked_nodes=sum(1 for n in nodes if n.revoked), revision=str(revision),
                      target=target_url.display(), switched=switch)


def _refuse_non_empty(target: Registry) -> None:
    revision = target.schema_revision()
    if revision is None:
        return
    if revision != SCHEMA_REVISION:
        raise HubError(f"{target.describe()} already holds a registry (schema {revision!r})",
                       "copy only into an empty database")
    with target.reading() as view:
        tokens, nodes = view.count_tokens(), view.count_nodes()
    if tokens or nodes:
        raise HubError(f"{target.describe()} is not empty: it holds {tokens} token(s) and {nodes} node(s)",
                       "copy only into an empty registry (a new database)")
