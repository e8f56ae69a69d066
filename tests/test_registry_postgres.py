"""The registry on a real PostgreSQL (a throwaway cluster from Debian's binaries, started by
labkit.postgres on 127.0.0.1 and a private socket, removed at the end): two hubs enrolling at
once never hand out one address or name twice (the write lock, and the constraints even without
it), ``--registry`` with the password from a file (never printed) or libpq's PGPASSWORD, a URL
holding a password refused, ``registry copy`` from main's SQLite registry, and the real
``tinc-hub serve`` enrolling into PostgreSQL."""

import json
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from bootstrap import bootstrap
from tinc_hub.cli import main
from tinc_hub.enroll import Enroller
from tinc_hub.registry import (SCHEMA_REVISION, ExposureRow, NodeRow, Registry, RegistryConflict,
                               RegistrySchemaError, RegistryTransaction, Tombstone, TokenRow)
from tinc_hub.registry_url import RegistryURL
from tinc_hub.tls import pin_of_cert_file
from hub_fixtures import HubEnv, enrol_answer, init_hub, install_main_registry, rsa_public_pem
from labkit import postgres
from labkit.loopback_hub import Enrolment, HubProcess, enrol_concurrently, free_port, public_keys

FIXTURES = Path(__file__).parent / "fixtures" / "registry"
MAIN_EXPECTED = json.loads((FIXTURES / "registry-main-65e21c3.json").read_text())
PASSWORD = "pw-" + uuid.uuid4().hex  # unique: any leak of it is found by a plain search

pytestmark = pytest.mark.skipif(postgres.unavailable_reason() is not None,
                                reason=str(postgres.unavailable_reason()))


@pytest.fixture
def database(pg: postgres.ThrowawayPostgres) -> Iterator[str]:
    """A new empty database owned by the role ``hub`` (password PASSWORD); its TCP URL."""
    name = "reg_" + uuid.uuid4().hex[:12]
    url = pg.create_database(name, user="hub", password=PASSWORD)
    yield url
    pg.drop_database(name)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "pgpassword"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def pg_registry(url: str, lock: Path, keep: bool = False) -> Registry:
    return Registry.open(RegistryURL.parse(url, PASSWORD), lock, keep_connections=keep)


def cli(capsys, *argv: str) -> Tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- two hubs, one registry ------------------------------------------------------------------

def two_hubs(tmp_path: Path, url: str) -> List[HubEnv]:
    """Two hubs of one net (own state and hosts/ dirs, own lock files) on one PostgreSQL registry."""
    hubs = []
    for i in range(2):
        env = init_hub(tmp_path / f"hub{i}", vpn_subnet="10.77.0.0/24", net="pgnet")
        registry = pg_registry(url, env.state.lock_file, keep=True)
        registry.ensure_schema()
        hubs.append(env._replace(registry=registry, enroller=Enroller(env.config, registry)))
    return hubs


def test_two_hubs_enrolling_at_once_never_share_an_address_or_a_name(tmp_path: Path, database: str) -> None:
    hubs = two_hubs(tmp_path, database)
    per_hub, threads_per_hub = 40, 8
    keys = public_keys(2 * per_hub + 8)
    token = hubs[0].token(uses=1000).token  # stored in PostgreSQL: both hubs know it
    results: Dict[str, Tuple[int, dict]] = {}
    lock = threading.Lock()
    start = threading.Barrier(2 * threads_per_hub)

    def worker(hub_index: int, thread_index: int) -> None:
        env = hubs[hub_index]
        start.wait()
        for i in range(thread_index, per_hub, threads_per_hub):
            name = f"h{hub_index}n{i}"
            answer = env.enroll(token, name, keys[hub_index * per_hub + i])
            with lock:
                results[name] = answer

    threads = [threading.Thread(target=worker, args=(h, t)) for h in range(2) for t in range(threads_per_hub)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert {name: status for name, (status, _) in results.items()} == {
        f"h{h}n{i}": 200 for h in range(2) for i in range(per_hub)}
    addresses = [answer["address"] for _, answer in results.values()]
    assert len(set(addresses)) == len(addresses) == 2 * per_hub

    # The same new name from both hubs at once: one wins, the other is told the name is taken.
    for round_index in range(4):
        name, barrier, answers = f"race{round_index}", threading.Barrier(2), []

        def race(hub_index: int) -> None:
            barrier.wait()
            answers.append(hubs[hub_index].enroll(token, name, keys[2 * per_hub + 2 * round_index + hub_index]))

        racers = [threading.Thread(target=race, args=(h,)) for h in range(2)]
        for t in racers:
            t.start()
        for t in racers:
            t.join(60)
        assert sorted(status for status, _ in answers) == [200, 409], answers

    with hubs[1].registry.reading() as view:
        rows = view.list_nodes()
        assert view.get_token(hubs[0].enroller._decode(token)).uses_left == 1000 - 2 * per_hub - 4
    assert len(rows) == 2 * per_hub + 4
    assert len({r.address_int for r in rows}) == len({r.name for r in rows}) == len(rows)
    for env in hubs:
        env.registry.dispose()


def test_the_constraints_hold_without_the_write_lock(tmp_path: Path, database: str) -> None:
    """Two writers that skip the advisory lock (raw transactions on two connections) and try
    the same address, name or key: the database refuses the second (RegistryConflict)."""
    first, second = pg_registry(database, tmp_path / "a.lock"), pg_registry(database, tmp_path / "b.lock")
    first.ensure_schema()
    node = NodeRow("n1", "10.77.0.2", 0x0A4D0002, "key1", "t" * 64, 1, 1, None)
    clashes = [NodeRow("n2", "10.77.0.2", 0x0A4D0002, "key2", "t" * 64, 1, 1, None),  # address
               NodeRow("n1", "10.77.0.3", 0x0A4D0003, "key3", "t" * 64, 1, 1, None),  # name
               NodeRow("n4", "10.77.0.4", 0x0A4D0004, "key1", "t" * 64, 1, 1, None)]  # key
    with first._runner() as runner:
        runner.driver.execute("BEGIN")
        RegistryTransaction(runner).insert_node(node)
        runner.driver.execute("COMMIT")
    for clash in clashes:
        with pytest.raises(RegistryConflict, match="registry conflict"):
            with second._runner() as runner:
                runner.driver.execute("BEGIN")
                RegistryTransaction(runner).insert_node(clash)
    with pytest.raises(RegistryConflict):
        with second.transaction() as tx:
            tx.insert_token(TokenRow("s" * 64, 1, -1, 1, None, False, 1))  # CHECK uses_left >= 0
    with second.reading() as view:
        assert [n.name for n in view.list_nodes()] == ["n1"] and view.count_tokens() == 0
    first.dispose()
    second.dispose()


def test_a_newer_schema_in_postgresql_is_refused_and_left_alone(tmp_path: Path, database: str,
                                                                pg: postgres.ThrowawayPostgres) -> None:
    registry = pg_registry(database, tmp_path / "lock")
    assert registry.schema_revision() is None
    assert registry.create() is True and registry.schema_revision() == SCHEMA_REVISION
    assert registry.create() is False
    name = database.rsplit("/", 1)[1]
    with pg.admin(name) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(RegistrySchemaError, match="9999_future.*newer than this tinc-hub knows"):
        registry.upgrade_schema()
    assert registry.schema_revision() == "9999_future"
    registry.dispose()


SHAPE_SQL = """
SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, coalesce(c.column_default, '')
FROM information_schema.columns c WHERE c.table_schema = 'public'
UNION ALL
SELECT t.relname, k.conname, pg_get_constraintdef(k.oid), '', ''
FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'public'
UNION ALL
SELECT tablename, indexname, indexdef, '', '' FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1, 2, 3"""


def schema_shape(pg: postgres.ThrowawayPostgres, url: str) -> List[tuple]:
    """Columns (type, NULL, default), constraints and indexes of every table, as PostgreSQL
    describes them."""
    with pg.admin(url.rsplit("/", 1)[1]) as conn:
        return [tuple(row) for row in conn.execute(SHAPE_SQL)]


def test_migration_0003_upgrades_a_0002_registry_in_postgresql(tmp_path: Path, database: str,
                                                               pg: postgres.ThrowawayPostgres) -> None:
    """Revision 0003 (exposures) on PostgreSQL: a registry at 0002 holding a hub and a node is
    upgraded in place (nothing lost, once), ends with the shape a new registry gets, and
    PostgreSQL itself enforces the table's rules (a node's name, tcp/udp, ports 1-65535, one
    (proto, listen port))."""
    from alembic import command
    from alembic.config import Config
    from tinc_hub import migrations

    registry = pg_registry(database, tmp_path / "lock")
    with registry.engine.connect() as conn:  # revision 0002, as a hub of that version made it
        conn.exec_driver_sql("BEGIN")
        config = Config()
        config.set_main_option("script_location", str(migrations.HERE))
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
        conn.exec_driver_sql("COMMIT")
    assert registry.schema_revision() == "0002"
    node = NodeRow("n1", "10.77.0.2", 0x0A4D0002, "key1", "t" * 64, 1, 1, None)
    with registry._runner() as runner:  # written with 0002's columns only
        runner.driver.execute("BEGIN")
        runner.driver.execute("INSERT INTO nodes (name, address, address_int, public_key, token_sha256,"
                              " enrolled_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                              (node.name, node.address, node.address_int, node.public_key,
                               node.token_sha256, node.enrolled_at, node.updated_at))
        runner.driver.execute("COMMIT")
    with pg.admin(database.rsplit("/", 1)[1]) as conn:
        assert conn.execute("SELECT to_regclass('exposures')").fetchone() == (None,)

    assert registry.upgrade_schema() == ["0003", "0004", "0005"]
    assert registry.upgrade_schema() == []  # current: nothing to do
    assert registry.schema_revision() == SCHEMA_REVISION == "0005"
    with registry.reading() as view:
        assert view.list_nodes() == [node] and view.list_exposures() == []

    fresh_name = "reg_" + uuid.uuid4().hex[:12]
    fresh_url = pg.create_database(fresh_name, user="hub", password=PASSWORD)
    try:
        fresh = pg_registry(fresh_url, tmp_path / "fresh.lock")
        assert fresh.create() is True
        fresh.dispose()
        assert schema_shape(pg, database) == schema_shape(pg, fresh_url)
        assert any(row[0] == "exposures" for row in schema_shape(pg, fresh_url))
    finally:
        pg.drop_database(fresh_name)

    good = ExposureRow(0, "n1", 80, None, 8080, "tcp", False, 1)
    with registry.exclusive(), registry.transaction() as tx:
        assert tx.insert_exposure(good) == 1
    bad = [replace(good, node_name="ghost"),            # not a node
           replace(good, proto="sctp", listen_port=1),  # protocol
           replace(good, node_port=0, listen_port=2),   # port 0
           replace(good, listen_port=70000),            # port above 65535
           replace(good, node_port=81)]                 # tcp 8080 published already

    def insert_rolled_back(row: ExposureRow) -> None:
        with registry._runner() as runner:  # past the code's own checks: the database's
            runner.driver.execute("BEGIN")
            try:
                RegistryTransaction(runner).insert_exposure_rows([replace(row, id=9)])
            finally:
                runner.driver.execute("ROLLBACK")

    insert_rolled_back(replace(good, node_port=81, listen_port=9090))  # control: this one goes in
    for row in bad:
        with pytest.raises(RegistryConflict):
            insert_rolled_back(row)
    with registry.reading() as view:
        assert [(e.id, e.node_name, e.listen_port) for e in view.list_exposures()] == [(1, "n1", 8080)]
    registry.dispose()


def test_two_hubs_starting_commands_at_once_migrate_an_older_registry_once(
        tmp_path: Path, database: str, password_file: Path, pg: postgres.ThrowawayPostgres) -> None:
    """Two hubs (own state dirs, own lock files) run a command at once on a registry at 0001:
    real processes. The test holds the write lock (PostgreSQL's advisory lock, as a third hub's
    writer would) until both wait for it, then lets go: one migrates, the other finds it done."""
    from alembic import command
    from alembic.config import Config
    from tinc_hub import migrations
    from tinc_hub.registry_contract import WRITE_LOCK_KEY

    registry = pg_registry(database, tmp_path / "lock")
    with registry.engine.connect() as conn:  # revision 0001, as the first PostgreSQL hubs made it
        conn.exec_driver_sql("BEGIN")
        config = Config()
        config.set_main_option("script_location", str(migrations.HERE))
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.exec_driver_sql("COMMIT")
    registry.dispose()
    hubs = [init_hub(tmp_path / f"hub{i}", vpn_subnet="10.77.0.0/24", net="pgnet") for i in range(2)]
    tinc_hub = Path(sys.executable).parent / "tinc-hub"
    name = database.rsplit("/", 1)[1]

    def waiting(conn) -> int:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                            ).fetchone()[0]

    with pg.admin(name) as holder, pg.admin(name) as watcher:
        holder.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK_KEY,))
        procs = [subprocess.Popen([str(tinc_hub), "--state-dir", str(env.state.root), "--registry", database,
                                   "--registry-password-file", str(password_file), "nodes", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  text=True) for env in hubs]
        try:
            from hub_fixtures import wait_until

            assert wait_until(lambda: waiting(watcher) == 2, 30), "both commands should wait for the lock"
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK_KEY,))
        results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [json.loads(out) for out, _ in results] == [[], []]
    assert len([err for _, err in results if "upgraded in place from schema 0001 to" in err]) == 1, results
    registry = pg_registry(database, tmp_path / "lock")
    assert registry.schema_revision() == SCHEMA_REVISION
    registry.dispose()


# -- the command line ------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path: Path) -> HubEnv:
    return init_hub(tmp_path, vpn_subnet="10.77.0.0/24", net=MAIN_EXPECTED["net"])


def test_registry_option_password_file_and_pgpassword(hub: HubEnv, database: str, password_file: Path,
                                                      capsys, monkeypatch) -> None:
    base = ["--state-dir", str(hub.state.root), "--registry", database]
    code, out, err = cli(capsys, *base, "--registry-password-file", str(password_file), "token", "create", "--json")
    assert code == 0, err
    code, out, err = cli(capsys, *base, "--registry-password-file", str(password_file), "token", "list", "--json")
    assert code == 0 and len(json.loads(out)) == 1
    # libpq's own PGPASSWORD, and the env twin of --registry
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    monkeypatch.setenv("TINC_HUB_REGISTRY", database)
    code, out, err = cli(capsys, "--state-dir", str(hub.state.root), "token", "list", "--json")
    assert code == 0 and len(json.loads(out)) == 1
    with hub.registry.reading() as view:  # the hub's own SQLite file was not used
        assert view.count_tokens() == 0


def test_a_password_is_never_printed(hub: HubEnv, database: str, tmp_path: Path, capsys) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text(PASSWORD + "-but-wrong\n")
    wrong.chmod(0o644)
    code, out, err = cli(capsys, "--state-dir", str(hub.state.root), "--registry", database,
                         "--registry-password-file", str(wrong), "nodes")
    assert code == 1 and "is accessible to other users (hint: chmod 600" in err
    wrong.chmod(0o600)
    for verbose in ([], ["-v"]):
        code, out, err = cli(capsys, "--state-dir", str(hub.state.root), "--registry", database,
                             "--registry-password-file", str(wrong), *verbose, "nodes")
        assert code == 1 and PASSWORD not in out + err
        assert "password authentication failed" in err and "(hint: is PostgreSQL running" in err
        if not verbose:
            assert err.count("\n") == 1
    with_password = database.replace("hub@", f"hub:{PASSWORD}@")
    for argv in (["--registry", with_password, "nodes"], ["--registry", database + f"?password={PASSWORD}", "nodes"],
                 ["registry", "copy", "--to", with_password]):
        code, out, err = cli(capsys, "--state-dir", str(hub.state.root), *argv)
        assert code == 1 and PASSWORD not in out + err, err
        assert "refusing a registry URL that contains a password" in err and "--registry-password-file" in err
    # the real process: nothing in its argv either (ps), the password only in the file
    proc = subprocess.run([sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(hub.state.root),
                           "--registry", with_password, "-v", "nodes"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and PASSWORD not in proc.stdout + proc.stderr


def test_registry_copy_moves_main_registry_to_postgresql(hub: HubEnv, database: str, password_file: Path,
                                                         capsys, pg: postgres.ThrowawayPostgres) -> None:
    MAIN_EXPECTED.update(install_main_registry(hub.state))  # token expiries: a day from now
    state = ["--state-dir", str(hub.state.root)]
    # exposures (revision 0003) travel too, with their ids: one of a node, one of a revoked node
    source = Registry.for_state(hub.state)
    source.upgrade_schema()
    with source.exclusive(), source.transaction() as tx:
        tx.insert_exposure_rows([ExposureRow(3, "alpha", 80, None, 8080, "tcp", False, 1700000000),
                                 ExposureRow(7, "gamma", 53, "192.0.2.1", 53, "udp", True, 1700000001)])
        exposures = tx.list_exposures()
        # tombstones too: an ephemeral node removed after 600 s offline, one released by an admin
        tx.add_tombstone(Tombstone("delta", "d" * 64, 1700000100, 600))
        tx.add_tombstone(Tombstone("delta", None, 1700000200, None))
        tombstones = tx.list_tombstones()
    source.dispose()
    copy = state + ["registry", "copy", "--to", database, "--to-password-file", str(password_file)]

    # refused while another process holds the SQLite registry open (a running API server)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb');"
                               " print('open', flush=True); sys.stdin.read()", str(hub.state.registry_file)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        code, out, err = cli(capsys, *copy)
        assert code == 1 and f"process(es) {holder.pid}" in err and "stop the API service first" in err
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert pg_registry(database, hub.state.lock_file).schema_revision() is None  # nothing written

    code, out, err = cli(capsys, *copy)
    assert code == 0, err
    assert f"copied 4 token(s) and 3 node(s) (1 revoked), schema {SCHEMA_REVISION}, 2 exposure(s)" in out
    assert "counts verified" in out
    assert "restart the API service" in out and PASSWORD not in out + err
    recorded = json.loads(hub.state.config_file.read_text())
    assert (recorded["registry"], recorded["registry_password_file"]) == (database, str(password_file))
    assert PASSWORD not in hub.state.config_file.read_text()
    assert oct(hub.state.config_file.stat().st_mode & 0o777) == "0o600"

    init_hub(hub.root, vpn_subnet="10.77.0.0/24", net=MAIN_EXPECTED["net"])  # init re-run: both kept
    assert json.loads(hub.state.config_file.read_text()) == recorded

    # every later command uses PostgreSQL and the password file that hub.json names
    code, out, err = cli(capsys, *state, "nodes", "--json")
    assert code == 0, err
    assert {n["name"]: n["revoked"] for n in json.loads(out)} == {"alpha": False, "beta": False, "gamma": True}
    target = pg_registry(database, hub.state.lock_file)
    with target.reading() as view:
        assert [t.__dict__ for t in view.list_tokens()] == [dict(t, ephemeral_seconds=None)
                                                            for t in MAIN_EXPECTED["tokens"]]
        assert [n.__dict__ for n in view.list_nodes()] == [dict(n, kind="node", credential_sha256=None,
                                                                 credential_used_at=None,
                                                                 ephemeral_seconds=None, last_seen_at=None)
                                                            for n in MAIN_EXPECTED["nodes"]]
        assert view.list_exposures() == exposures and [e.id for e in exposures] == [3, 7]
        assert view.list_tombstones() == tombstones and len(tombstones) == 2
        assert view.tombstone_for("d" * 64) == Tombstone("delta", "d" * 64, 1700000100, 600)
    assert target.schema_revision() == SCHEMA_REVISION

    # the active token enrols through the copied registry; the revoked one still is revoked
    enroller = Enroller(hub.state.load_config(), target)
    token = bootstrap.encode_token(bootstrap.Token(
        hub.config.address, hub.config.api_port, pin_of_cert_file(hub.state.cert_file), hub.config.net,
        hub.config.name, MAIN_EXPECTED["active_token_secret"]))
    status, answer = enrol_answer(enroller, "Bearer " + token,
                                  json.dumps({"name": "zeta", "public_key": rsa_public_pem(7)}).encode())
    assert (status, answer["address"]) == (200, "10.77.0.5")
    target.dispose()

    # a second copy into the (now non-empty) target is refused, hub.json untouched
    other = init_hub(hub.root / "other", vpn_subnet="10.77.0.0/24", net=MAIN_EXPECTED["net"])
    code, out, err = cli(capsys, "--state-dir", str(other.state.root), "registry", "copy", "--to", database,
                         "--to-password-file", str(password_file))
    assert code == 1 and "is not empty: it holds 4 token(s) and 4 node(s)" in err
    assert "registry" not in json.loads(other.state.config_file.read_text())


# -- the real server -------------------------------------------------------------------------

def test_serve_enrols_into_postgresql(tmp_path: Path, database: str, password_file: Path) -> None:
    port = free_port()
    env = init_hub(tmp_path, vpn_subnet="10.77.0.0/24", api_port=port)
    registry = pg_registry(database, env.state.lock_file)
    registry.ensure_schema()
    env = env._replace(registry=registry)
    token = env.token(uses=50).token
    server = HubProcess(env.state.root, port, env.state.cert_file, tmp_path / "serve.log",
                        extra=["--registry", database, "--registry-password-file", str(password_file),
                               "--rate-limit", "off"]).start()
    try:
        keys = public_keys(50)
        replies = enrol_concurrently(server, [Enrolment(token, f"s{i}", keys[i]) for i in range(50)])
        assert [r.status for r in replies] == [200] * 50
    finally:
        server.stop()
    assert PASSWORD not in server.log_text()
    with registry.reading() as view:
        nodes = view.list_nodes()
    assert len({n.address for n in nodes}) == 50
    assert {p.name for p in env.config.hosts_dir.iterdir()} == {n.name for n in nodes} | {env.config.name}
    with Registry(env.state.registry_file, env.state.lock_file).reading() as view:
        assert view.count_tokens() == view.count_nodes() == 0  # the SQLite file was not used
    registry.dispose()


def test_registry_copy_no_switch_leaves_hub_json(hub: HubEnv, database: str, password_file: Path,
                                                 capsys) -> None:
    hub.token(uses=3)
    before = hub.state.config_file.read_bytes()
    state = ["--state-dir", str(hub.state.root), "registry", "copy"]
    code, out, err = cli(capsys, *state, "--to", "sqlite:////tmp/elsewhere.sqlite3")
    assert code == 1 and "takes a PostgreSQL URL" in err
    code, out, err = cli(capsys, *state, "--to", database, "--to-password-file", str(password_file),
                         "--no-switch")
    assert code == 0 and "copied 1 token(s) and 0 node(s)" in out and "hub.json unchanged" in out
    assert hub.state.config_file.read_bytes() == before
    target = pg_registry(database, hub.state.lock_file)
    with target.reading() as view, hub.registry.reading() as source:
        assert view.list_tokens() == source.list_tokens()
    target.dispose()


def test_postgresql_down_answers_503_and_the_node_script_waits_for_it(
        tmp_path: Path, pg: postgres.ThrowawayPostgres, database: str, password_file: Path) -> None:
    """PostgreSQL stopped under a running hub: POST /v1/enroll answers 503 with Retry-After and
    one clear line (audit: failed, 503), nothing is written; bootstrap.py's own client keeps
    retrying and enrols once PostgreSQL is back."""
    import ssl
    import urllib.error
    import urllib.request

    from labkit import netlab

    port = free_port()
    env = init_hub(tmp_path, vpn_subnet="10.77.0.0/24", api_port=port)
    registry = pg_registry(database, env.state.lock_file)
    registry.ensure_schema()
    env = env._replace(registry=registry)
    issued = env.token(uses=2)
    server = HubProcess(env.state.root, port, env.state.cert_file, tmp_path / "serve.log",
                        extra=["--registry", database, "--registry-password-file", str(password_file),
                               "--rate-limit", "off"]).start()
    hosts_before = sorted(p.name for p in env.config.hosts_dir.iterdir())
    result: Dict[str, object] = {}
    try:
        pg.stop_server()
        try:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            request = urllib.request.Request(
                f"https://127.0.0.1:{port}/v1/enroll", method="POST",
                data=json.dumps({"name": "down", "public_key": rsa_public_pem(21)}).encode(),
                headers={"Authorization": "Bearer " + issued.token,
                         "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, context=context, timeout=30)
            assert refused.value.code == 503
            assert refused.value.headers["Retry-After"] == "5"
            assert "cannot reach its registry" in json.loads(refused.value.read())["error"]
            assert sorted(p.name for p in env.config.hosts_dir.iterdir()) == hosts_before

            def node() -> None:  # the node script's client, started while PostgreSQL is down
                try:
                    result["answer"] = bootstrap.enroll(
                        issued.token, bootstrap.decode_token(issued.token), "127.0.0.1", port,
                        "waiter", rsa_public_pem(22), timeout=60)
                except Exception as exc:  # reported below
                    result["error"] = exc

            waiter = threading.Thread(target=node)
            waiter.start()
            netlab.wait_until(lambda: server.log_text().count("status=503") >= 2, 30,
                              what="the node's first attempt answered 503")
        finally:
            pg.start_server()
        waiter.join(timeout=90)
        assert "error" not in result, result.get("error")
        assert result["answer"]["name"] == "waiter"
    finally:
        server.stop()
    log = server.log_text()
    assert "result=failed status=503" in log and PASSWORD not in log
    with registry.reading() as view:
        assert [n.name for n in view.list_nodes()] == ["waiter"]
    registry.dispose()


def test_ephemeral_reaper_statements_on_postgresql(tmp_path: Path, database: str) -> None:
    """Revision 0004 on PostgreSQL: last-seen writes without a generation bump, the conditional
    DELETE (skipped for a node seen meanwhile, done once when two reapers race), the tombstone."""
    from tinc_hub.ephemeral import reap_in_transaction

    registry = pg_registry(database, tmp_path / "lock")
    registry.create()
    rows = [NodeRow(name, "10.77.0.%d" % i, 0x0A4D0000 + i, "key%d" % i, "t" * 64, 100, 100, None,
                    credential_sha256="c%d" % i, ephemeral_seconds=30, last_seen_at=100)
            for i, name in ((2, "n1"), (3, "n2"))]
    with registry.exclusive(), registry.transaction() as tx:
        tx.insert_nodes(rows)
    with registry.reading() as view:
        generation = view.generation()
    with registry.exclusive(), registry.transaction(bump=False) as tx:
        tx.mark_seen(["n2"], 120)
        tx.mark_seen(["n2"], 110)  # never backwards
    with registry.reading() as view:
        assert view.generation() == generation and view.get_node("n2").last_seen_at == 120
    with registry.exclusive(), registry.transaction() as tx:
        assert [n.name for n in reap_in_transaction(tx, rows, 130)] == ["n1"]
    with registry.exclusive(), registry.transaction() as tx:
        assert reap_in_transaction(tx, rows, 130) == []
    with registry.reading() as view:
        assert [n.name for n in view.list_nodes()] == ["n2"]
        assert view.tombstone_for("c2") == Tombstone("n1", "c2", 130, 30)
