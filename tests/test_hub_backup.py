"""``tinc-hub backup`` and ``tinc-hub restore`` in-process (init --no-start, temp dirs): a
round trip gives back the same hub (registry rows, keys, pin, host files, modes) whose tokens
still enrol; the file is 0600 from birth and never overwritten without --force; damaged and
hostile archives (crafted with tarfile) are refused in one line with nothing written; an
existing hub is refused (kept aside with --force); an older registry is upgraded, a newer one
refused. The booted-machine version: tests/test_hub_restore_boot.py."""

import gzip
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import uuid
from contextlib import closing
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tinc_hub.backup import FORMAT_VERSION, MANIFEST
from tinc_hub.cli import main
from tinc_hub.enroll import Enroller
from tinc_hub.registry import SCHEMA_REVISION, Registry
from tinc_hub.tls import pin_of_cert_file
from labkit import postgres
from hub_fixtures import (HubEnv, dump_registry, enrol_answer, init_hub, install_main_registry,
                          rsa_public_pem)


def hub_files(env: HubEnv) -> Dict[str, tuple]:
    """What a restore must give back: the state's own files and the net's tinc files, with
    their bytes and modes (the registry compared by its rows)."""
    out = {}
    for root in (env.state.root, env.config.net_dir):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "registry.sqlite3" not in path.name and path.name != "registry.lock":
                out[str(path)] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return out


def run(capsys, *argv: str) -> tuple:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def backed_up(tmp_path: Path, capsys):
    """A hub with a node and an unused token, its backup file, and what it held; then the
    hub's state and tinc dirs moved away (a fresh machine at the same paths)."""
    env = init_hub(tmp_path)
    token = env.token(uses=2)
    assert env.enroll(token.token, "node1", rsa_public_pem(1))[0] == 200
    unused = env.token()
    file = tmp_path / "hub.backup"
    code, out, err = run(capsys, "--state-dir", str(env.state.root), "backup", str(file))
    assert code == 0, err
    before = {"files": hub_files(env), "rows": dump_registry(env.registry),
              "pin": pin_of_cert_file(env.state.cert_file)}
    os.rename(env.state.root, tmp_path / "old-state")
    os.rename(tmp_path / "tinc", tmp_path / "old-tinc")
    return {"env": env, "file": file, "err": err, "before": before, "unused": unused.token,
            "token": token.token}


def restore(capsys, env: HubEnv, file, *extra: str) -> tuple:
    return run(capsys, "--state-dir", str(env.state.root), "restore", str(file), "--no-start", *extra)


def test_round_trip_gives_back_the_same_hub_whose_tokens_still_enrol(backed_up, capsys):
    env, file = backed_up["env"], backed_up["file"]
    assert file.stat().st_mode & 0o777 == 0o600
    assert "SECRETS" in backed_up["err"] and "tinc private key" in backed_up["err"]
    with tarfile.open(file, "r:gz") as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(MANIFEST))
    assert names[0] == MANIFEST and "state/registry.sqlite3" in names
    assert "tinc/hosts/node1" in names and "tinc/rsa_key.priv" in names
    assert {k: manifest[k] for k in ("format_version", "schema_revision", "net", "hub", "pin")} == {
        "format_version": FORMAT_VERSION, "schema_revision": SCHEMA_REVISION,
        "net": env.config.net, "hub": env.config.name, "pin": backed_up["before"]["pin"]}
    assert manifest["registry"] == {"kind": "sqlite"} and manifest["tinc_hub_version"]

    code, out, err = restore(capsys, env, file)
    assert code == 0, err
    assert f"pin {backed_up['before']['pin']}" in out and "not restored: liveness" in out
    assert hub_files(env) == backed_up["before"]["files"]  # bytes and modes
    assert dump_registry(env.registry) == backed_up["before"]["rows"]
    assert env.state.root.stat().st_mode & 0o777 == 0o700
    assert not list(env.root.glob(".tinc-hub-restore-*"))  # the staging dir is gone
    registry = Registry(env.state.registry_file, env.state.lock_file)
    with closing(sqlite3.connect(env.state.registry_file)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    enroller = Enroller(env.config, registry)
    status, body = enrol_answer(enroller, "Bearer " + backed_up["unused"],
                                json.dumps({"name": "node2", "public_key": rsa_public_pem(2)}).encode())
    assert status == 200, body  # a token made before the backup
    status, _ = enrol_answer(enroller, "Bearer " + backed_up["token"],
                             json.dumps({"name": "node3", "public_key": rsa_public_pem(3)}).encode())
    assert status == 200  # its second use was left
    status, _ = enrol_answer(enroller, "Bearer " + backed_up["token"],
                             json.dumps({"name": "node4", "public_key": rsa_public_pem(4)}).encode())
    assert status == 401  # spent, as it would be on the old hub


def test_the_file_is_private_from_birth_and_never_overwritten_without_force(tmp_path, capsys):
    env = init_hub(tmp_path)
    file = tmp_path / "hub.backup"
    file.write_text("precious\n")
    old_umask = os.umask(0)
    try:
        code, _, err = run(capsys, "--state-dir", str(env.state.root), "backup", str(file))
        assert code == 1 and "exists: not overwritten" in err and "--force" in err
        assert len(err.strip().splitlines()) == 1
        assert file.read_text() == "precious\n"
        code, _, err = run(capsys, "--state-dir", str(env.state.root), "backup", str(file), "--force")
        assert code == 0, err
    finally:
        os.umask(old_umask)
    assert file.stat().st_mode & 0o777 == 0o600
    assert tarfile.open(file, "r:gz").getnames()[0] == MANIFEST
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not list(env.state.root.glob(".tinc-hub-backup-*"))


def test_backup_to_stdout_and_restore_from_stdin(backed_up, tmp_path):
    """`backup -` piped into `restore -` (fresh interpreters, as an admin would over ssh)."""
    env = backed_up["env"]
    cli = [sys.executable, "-m", "tinc_hub.cli"]
    old = ["--state-dir", str(tmp_path / "old-state")]
    os.rename(tmp_path / "old-tinc", tmp_path / "tinc")  # the old hub at its paths again
    dumped = subprocess.run(cli + old + ["backup", "-"], capture_output=True, timeout=120)
    assert dumped.returncode == 0, dumped.stderr
    assert b"SECRETS" in dumped.stderr and dumped.stdout[:2] == b"\x1f\x8b"
    os.rename(tmp_path / "tinc", tmp_path / "old-tinc")
    loaded = subprocess.run(cli + ["--state-dir", str(env.state.root), "restore", "-", "--no-start"],
                            input=dumped.stdout, capture_output=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert dump_registry(env.registry) == backed_up["before"]["rows"]
    assert hub_files(env) == backed_up["before"]["files"]


def test_an_existing_hub_is_refused_and_kept_aside_with_force(backed_up, capsys):
    env, file = backed_up["env"], backed_up["file"]
    assert restore(capsys, env, file)[0] == 0
    capsys.readouterr()
    (env.config.hosts_dir / "stranger").write_text("kept\n")
    code, _, err = restore(capsys, env, file)
    assert code == 1 and "a hub's state exists already" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = restore(capsys, env, file, "--force")
    assert code == 0, err
    kept = sorted(p.name for p in env.state.root.glob("hub.json.replaced-*"))
    assert len(kept) == 1 and "kept the replaced file as" in out
    assert list(env.config.net_dir.glob("rsa_key.priv.replaced-*"))
    assert dump_registry(env.registry) == backed_up["before"]["rows"]


# -- hostile and damaged archives --------------------------------------------------------------

def members_of(file: Path) -> Dict[str, bytes]:
    with tarfile.open(file, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def pack(members: List[tuple], manifest_update: Optional[Callable[[dict], None]] = None,
         resign: bool = True) -> bytes:
    """A gzip'd tar of (name, bytes or a TarInfo-tweaking function) in order; the manifest
    (if first) gets its files' sizes and digests again unless resign is False."""
    out = io.BytesIO()
    body = dict((n, d) for n, d in members if isinstance(d, bytes))
    with gzip.GzipFile(fileobj=out, mode="wb") as zipped, tarfile.open(fileobj=zipped, mode="w") as tar:
        for name, data in members:
            if name == MANIFEST and resign:
                manifest = json.loads(data)
                manifest["files"] = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                     for n, d in body.items() if n != MANIFEST}
                if manifest_update:
                    manifest_update(manifest)
                data = json.dumps(manifest).encode()
            info = tarfile.TarInfo(name)
            if callable(data):
                data(info)
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def good(file: Path) -> List[tuple]:
    members = members_of(file)
    return [(MANIFEST, members.pop(MANIFEST))] + sorted(members.items())


def replaced(items: List[tuple], name: str, data) -> List[tuple]:
    return [(n, data if n == name else d) for n, d in items]


def symlink(info: tarfile.TarInfo) -> None:
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"


def device(info: tarfile.TarInfo) -> None:
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3


def directory(info: tarfile.TarInfo) -> None:
    info.type = tarfile.DIRTYPE


def raw_header(name: str, kind: bytes, size: int) -> bytes:
    """One ustar header block claiming ``size`` bytes of data (which never follow)."""
    info = tarfile.TarInfo(name)
    info.size = 0
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b"%011o\x00" % size
    block[156:157] = kind
    block[148:156] = b"        "
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def huge_extended_header(kind: bytes) -> bytes:
    """A GNU long name (L) or pax (x) header claiming 1 TiB: tarfile would read it all."""
    return gzip.compress(raw_header("././@LongLink", kind, 1 << 40) + b"\x00" * 4096)


def edited_hub_json(file: Path, **changes) -> bytes:
    data = json.loads(members_of(file)["state/hub.json"])
    data.update(changes)
    return json.dumps(data).encode()


def newer_registry(file: Path, tmp_path: Path) -> bytes:
    path = tmp_path / "newer.sqlite3"
    path.write_bytes(members_of(file)["state/registry.sqlite3"])
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
        conn.commit()
    return path.read_bytes()


HOSTILE = {
    "not gzip": lambda f, t: b"PK\x03\x04" + os.urandom(200),
    "truncated": lambda f, t: f.read_bytes()[: len(f.read_bytes()) // 2],
    "empty tar": lambda f, t: pack([]),
    "manifest not first": lambda f, t: pack(good(f)[1:] + good(f)[:1]),
    "parent path": lambda f, t: pack(good(f) + [("../escape", b"x")], resign=False),
    "absolute path": lambda f, t: pack(good(f) + [("/etc/cron.d/x", b"x")], resign=False),
    "dot path": lambda f, t: pack(good(f) + [("tinc/hosts/../../x", b"x")]),
    "unlisted member": lambda f, t: pack(good(f) + [("tinc/hosts/extra", b"x")], resign=False),
    "symlink": lambda f, t: pack(replaced(good(f), "tinc/hosts/node1", symlink), resign=False),
    "device": lambda f, t: pack(replaced(good(f), "tinc/hosts/node1", device), resign=False),
    "directory": lambda f, t: pack(good(f) + [("tinc/hosts/node2", directory)], resign=False),
    "huge long name": lambda f, t: huge_extended_header(tarfile.GNUTYPE_LONGNAME),
    "huge pax header": lambda f, t: huge_extended_header(tarfile.XHDTYPE),
    "damaged member": lambda f, t: pack(replaced(good(f), "state/hub.json", b"{}" + b" " * (
        len(members_of(f)["state/hub.json"]) - 2)), resign=False),
    "duplicate member": lambda f, t: pack(good(f) + good(f)[1:2], resign=False),
    "missing member": lambda f, t: pack([m for m in good(f) if m[0] != "tinc/hosts/node1"],
                                        resign=False),
    "newer format": lambda f, t: pack(good(f), lambda m: m.update(format_version=FORMAT_VERSION + 1)),
    "control characters": lambda f, t: pack(good(f), lambda m: m.update(created_at="\x1b]0;x\x07")),
    "oversized member": lambda f, t: pack(good(f), lambda m: m["files"]["tinc/hosts/node1"].update(
        size=1 << 30)),
    "hostile hub.json": lambda f, t: pack(replaced(good(f), "state/hub.json",
                                                   edited_hub_json(f, net="../../etc/cron.d"))),
    "relative tinc dir": lambda f, t: pack(replaced(good(f), "state/hub.json",
                                                    edited_hub_json(f, tinc_dir="etc/tinc"))),
    "foreign TLS certificate": lambda f, t: pack(replaced(
        good(f), "state/tls/key.pem", members_of(t / "other.backup")["state/tls/key.pem"])),
    "foreign tinc key": lambda f, t: pack(replaced(
        good(f), "tinc/rsa_key.priv", members_of(t / "other.backup")["tinc/rsa_key.priv"])),
    "not a database": lambda f, t: pack(replaced(good(f), "state/registry.sqlite3",
                                                 b"SQLite format 3\x00" + b"\xff" * 4080)),
    "newer registry": lambda f, t: pack(replaced(good(f), "state/registry.sqlite3",
                                                 newer_registry(f, t))),
}
EXPECTED = {
    "not gzip": "not a readable gzip'd tar", "truncated": "backup refused",
    "empty tar": "empty", "manifest not first": "not manifest.json",
    "parent path": "not listed", "absolute path": "not listed",
    "dot path": "is not one a backup holds", "unlisted member": "not listed",
    "symlink": "not a regular file", "device": "not a regular file",
    "directory": "not a regular file", "damaged member": "damaged",
    "huge long name": "extended headers", "huge pax header": "extended headers",
    "duplicate member": "appears twice", "missing member": "missing",
    "newer format": "newer than this tinc-hub", "control characters": "printable",
    "oversized member": "out of bounds", "hostile hub.json": "invalid net name",
    "relative tinc dir": "not an absolute path", "foreign TLS certificate": "not the TLS key's",
    "foreign tinc key": "is not the key of hosts/hub1", "not a database": "not a SQLite database",
    "newer registry": "newer than this tinc-hub",
}


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    """A hub's good backup and another hub's (whose keys are foreign to the first), made once;
    the first hub's state and tinc dirs then moved away. Every case below is refused before
    anything is written, so they share it."""
    root = tmp_path_factory.mktemp("hostile")
    env = init_hub(root)
    token = env.token()
    assert env.enroll(token.token, "node1", rsa_public_pem(1))[0] == 200
    other = init_hub(root / "other", net="othernet")
    for hub, name in ((env, "hub.backup"), (other, "other.backup")):
        assert main(["--state-dir", str(hub.state.root), "backup", str(root / name)]) == 0
    os.rename(env.state.root, root / "old-state")
    os.rename(root / "tinc", root / "old-tinc")
    return {"env": env, "root": root, "file": root / "hub.backup"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_damaged_archives_are_refused_with_nothing_written(archives, capsys, case):
    env, root = archives["env"], archives["root"]
    bad = root / f"bad-{case.replace(' ', '-')}.backup"
    bad.write_bytes(HOSTILE[case](archives["file"], root))
    capsys.readouterr()
    code, out, err = restore(capsys, env, bad)
    assert code == 1, out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tinc-hub: error: "), err
    assert EXPECTED[case] in err, err
    assert "\x1b" not in err
    assert not env.state.root.exists() and not (root / "tinc").exists()
    assert not list(root.glob(".tinc-hub-restore-*"))


def test_an_older_registry_is_upgraded_on_restore(tmp_path, capsys):
    env = init_hub(tmp_path)
    expected = install_main_registry(env.state)  # written by main's code before Alembic
    file = tmp_path / "hub.backup"
    assert main(["--state-dir", str(env.state.root), "backup", str(file)]) == 0
    os.rename(env.state.root, tmp_path / "old-state")
    os.rename(tmp_path / "tinc", tmp_path / "old-tinc")
    capsys.readouterr()
    code, out, err = restore(capsys, env, file)
    assert code == 0, err
    assert f"schema legacy, upgraded to {SCHEMA_REVISION}" in out
    registry = Registry(env.state.registry_file, env.state.lock_file)
    assert registry.schema_revision() == SCHEMA_REVISION
    with registry.reading() as view:
        assert sorted(n.name for n in view.list_nodes()) == sorted(n["name"] for n in expected["nodes"])


@pytest.mark.skipif(postgres.unavailable_reason() is not None,
                    reason=str(postgres.unavailable_reason()))
def test_a_postgresql_hub_is_backed_up_without_its_registry_or_password(tmp_path, capsys, pg):
    """The registry moved to a real PostgreSQL ('registry copy'): the backup names its URL and
    password file, holds neither the rows nor the password, and says so; restore needs the
    password file in place and then finds the hub's tokens in PostgreSQL."""
    password = "pw-" + uuid.uuid4().hex
    name = "bk_" + uuid.uuid4().hex[:12]
    url = pg.create_database(name, user="hub", password=password)
    try:
        env = init_hub(tmp_path)
        issued = env.token()
        secret = tmp_path / "pgpassword"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        state = ["--state-dir", str(env.state.root)]
        assert main(state + ["registry", "copy", "--to", url, "--to-password-file", str(secret)]) == 0
        file = tmp_path / "hub.backup"
        code, _, err = run(capsys, *state, "backup", str(file))
        assert code == 0, err
        assert "is NOT in the backup" in err and "pg_dump" in err
        members = members_of(file)
        assert "state/registry.sqlite3" not in members
        assert not any(password.encode() in data for data in members.values())
        manifest = json.loads(members[MANIFEST])
        assert manifest["registry"] == {"kind": "postgresql", "url": url,
                                        "password_file": str(secret)}
        os.rename(env.state.root, tmp_path / "old-state")
        os.rename(tmp_path / "tinc", tmp_path / "old-tinc")
        os.rename(secret, tmp_path / "elsewhere")
        code, _, err = restore(capsys, env, file)
        assert code == 1 and f"password file {secret} is missing" in err, err
        assert not env.state.root.exists()
        os.rename(tmp_path / "elsewhere", secret)
        code, out, err = restore(capsys, env, file)
        assert code == 0, err
        assert f"registry: {url}" in out
        code, out, _ = run(capsys, *state, "token", "list", "--json")
        assert code == 0 and [t["id"] for t in json.loads(out)] == [issued.id]
    finally:
        pg.drop_database(name)


def test_a_hostile_hub_json_cannot_write_the_registry_outside_the_state_dir(backed_up, capsys):
    """hub.json says where the SQLite registry lives, and restore writes the archive's copy
    there as root: a path outside the state dir (here a new directory, in real life any file
    of the system) is written only when the admin names it with --registry; else refused in
    one line with nothing written."""
    env, file = backed_up["env"], backed_up["file"]
    planted = env.root / "planted" / "evil"
    url = f"sqlite:///{planted}"
    hostile = env.root / "registry-elsewhere.backup"
    hostile.write_bytes(pack(replaced(good(file), "state/hub.json", edited_hub_json(file, registry=url))))
    code, out, err = restore(capsys, env, hostile)
    assert code == 1, out + err
    assert len(err.strip().splitlines()) == 1 and f"--registry {url}" in err, err
    assert not planted.parent.exists() and not env.state.root.exists()
    code, out, err = run(capsys, "--state-dir", str(env.state.root), "--registry", url, "restore",
                         str(hostile), "--no-start")
    assert code == 0, out + err
    assert f"registry: {planted}" in out
    assert dump_registry(Registry(planted, env.state.lock_file)) == backed_up["before"]["rows"]
