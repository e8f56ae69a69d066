"""Shared helpers for the hub tests (no tests here): a hub initialised in temp dirs
(``--no-start``: no tincd, no boot registration), RSA keys, tokens, and snapshots."""

import functools
import os
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tinc_hub.enroll import Enroller
from tinc_hub.hub_init import InitRequest, run_init
from tinc_hub.liveness import Seen, liveness_dir, read_records, render_host_script
from tinc_hub.registry import Registry
from tinc_hub.state import HubConfig, StateDir
from tinc_hub.tls import pin_of_cert_file
from tinc_hub.tokens import IssuedToken, create_token

HUB_NAME = "hub1"


@functools.lru_cache(maxsize=None)
def rsa_public_pem(index: int, bits: int = 2048, fmt: str = "pkcs1") -> str:
    """A distinct RSA public key per index (cached: key generation is the slow part)."""
    key = _rsa_private(index, bits)
    public_format = (serialization.PublicFormat.PKCS1 if fmt == "pkcs1"
                     else serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(serialization.Encoding.PEM, public_format).decode()


@functools.lru_cache(maxsize=None)
def _rsa_private(index: int, bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class HubEnv(NamedTuple):
    root: Path
    state: StateDir
    config: HubConfig
    registry: Registry
    enroller: Enroller

    def token(self, uses: int = 1, ttl: int = 3600, name: Optional[str] = None,
              replace: bool = False, now: Optional[float] = None) -> IssuedToken:
        return create_token(self.config, self.registry, pin_of_cert_file(self.state.cert_file),
                            uses=uses, ttl=ttl, name=name, allow_replace=replace, now=now)

    def enroll(self, token: str, name: str, key: str, credential: Optional[str] = None) -> Tuple[int, dict]:
        import json

        fields = {"name": name, "public_key": key}
        if credential is not None:
            fields["credential"] = credential
        return enrol_answer(self.enroller, "Bearer " + token, json.dumps(fields).encode())

    def hosts_snapshot(self) -> Dict[str, Tuple[bytes, int]]:
        """Every file under the hub's tinc net dir: bytes and mtime."""
        out = {}
        for path in sorted(self.config.net_dir.rglob("*")):
            if path.is_file():
                out[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
        return out

    def snapshot(self) -> Tuple[List[tuple], Dict[str, Tuple[bytes, int]]]:
        return dump_registry(self.registry), self.hosts_snapshot()


def init_hub(root: Path, vpn_subnet: str = "10.77.0.0/24", net: Optional[str] = None,
             address: str = "127.0.0.1", api_port: int = 8655) -> HubEnv:
    """``tinc-hub init --no-start`` into ``root``/state and ``root``/tinc."""
    state = StateDir(root / "state")
    req = InitRequest(net=net or f"hubt{os.getpid() % 100000}", name=HUB_NAME, address=address,
                      vpn_subnet=vpn_subnet, api_port=api_port, key_size=2048,
                      init="none", tinc_dir=str(root / "tinc"), start=False)
    result = run_init(state, req)
    registry = Registry(state.registry_file, state.lock_file)
    return HubEnv(root, state, result.config, registry, Enroller(result.config, registry))


@pytest.fixture
def hub(tmp_path: Path) -> HubEnv:
    return init_hub(tmp_path)


def enrol_answer(enroller: Enroller, authorization: Optional[str], body: bytes) -> Tuple[int, dict]:
    """One enrolment request as its client sees it: (HTTP status, JSON body)."""
    outcome = enroller.process(authorization, body)
    return outcome.status, outcome.body


def dump_registry(registry: Registry) -> List[tuple]:
    """Every row of every table, in a stable order (to prove a request changed nothing)."""
    with closing(sqlite3.connect(registry.db_path)) as conn:
        out: List[tuple] = []
        for table, order in (("tokens", "secret_sha256"), ("nodes", "name"), ("hubs", "name"),
                             ("settings", "key"), ("removed_nodes", "id")):
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone():
                out.extend((table,) + tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}"))
        return out


def write_registry_sql(env: HubEnv, sql: str, params: tuple = ()) -> None:
    """One raw SQL write on the registry under its write lock, for states the API never makes
    (e.g. every token expired)."""
    with env.registry.exclusive(), closing(sqlite3.connect(env.state.registry_file)) as conn, conn:
        conn.execute(sql, params)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


MAIN_REGISTRY_FIXTURE = Path(__file__).parent / "fixtures" / "registry" / "registry-main-65e21c3"


def install_main_registry(state: StateDir) -> dict:
    """Put a copy of the registry written by main's code (fixtures/registry) in place of the
    state dir's registry.sqlite3; return what it holds (its .json).

    Its tokens were made with tinc-hub's default TTL of 1 h on the day the file was made: so
    that their status does not depend on when the test runs, every token's expiry is moved by
    the same amount, to a day from now, in the copy and in the returned expectation alike
    (the upgrade is then checked against exactly what the copy held)."""
    import json
    import shutil

    expected = json.loads(MAIN_REGISTRY_FIXTURE.with_suffix(".json").read_text())
    for suffix in ("-wal", "-shm"):
        Path(str(state.registry_file) + suffix).unlink(missing_ok=True)
    shutil.copyfile(MAIN_REGISTRY_FIXTURE.with_suffix(".sqlite3"), state.registry_file)
    shift = int(time.time()) + 86400 - min(t["expires_at"] for t in expected["tokens"])
    with closing(sqlite3.connect(state.registry_file)) as conn:
        conn.execute("UPDATE tokens SET expires_at = expires_at + ?", (shift,))
        conn.commit()
    for token in expected["tokens"]:
        token["expires_at"] += shift
    return expected


def event_scripts(base: Path, journal: bool = True) -> Dict[str, Path]:
    """The hub's real host-up and host-down scripts (what init writes) for state dir
    ``base/state``, as files in ``base`` (journal=False: an earlier init's, records only)."""
    scripts = {}
    for event in ("up", "down"):
        path = base / f"host-{event}-{int(journal)}"
        path.write_text(render_host_script(base / "state", event, journal))
        path.chmod(0o755)
        scripts[event] = path
    return scripts


def run_event(script: Path, node: str, remote: str) -> None:
    """Runs a host-up/host-down script as tincd does (NODE, REMOTEADDRESS in its environment)."""
    env = {"PATH": "/usr/bin:/bin", "NODE": node, "REMOTEADDRESS": remote}
    subprocess.run([str(script)], env=env, check=True, timeout=10)


def read_one_by_one(root: Path) -> Dict[str, Seen]:
    """What reading every liveness record of state dir ``root`` gives (no snapshot, no journal)."""
    directory = os.open(liveness_dir(root), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return read_records(directory)
    finally:
        os.close(directory)
