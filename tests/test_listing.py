"""The listings at fleet size print what the straightforward code printed:

- ``tinc-hub nodes`` (JSON and table) on a registry with every kind of row (revoked, ephemeral
  never seen / seen / online, the hubs' rows, liveness records up, down, stale, torn, of
  unknown names) is byte for byte what the per-row code (kept here as the reference) printed,
  read from SQLite without SQLAlchemy and, after ``registry copy``, from PostgreSQL through
  the Registry; the rows themselves also with the hub's tincd running (pure function);
- the SQLite read answers exactly RegistryView.listed_nodes(), and leaves every other case
  (missing file, older, newer or legacy schema, not a database) to the Registry;
- JSON in one call of the C encoder is what encoding row by row gives, for any flat rows;
- the read-only listings never import the web server, cryptography, and ``nodes`` on SQLite
  not even SQLAlchemy (a deterministic guard of the start-up time);
- odd liveness records (symlink, directory, FIFO, oversized, not UTF-8) are skipped, never hang.
bench/listing_scale.py measures 50,000 nodes; tests/test_enrol_scale.py times 20,000.
"""

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import given, settings, strategies as st

from hub_fixtures import HubEnv, init_hub
from labkit import postgres
from labkit.registry_fill import fill_registry
from tinc_hub.cli import main
from tinc_hub.listing import json_listing, node_json_listing, node_rows, table_listing
from tinc_hub.liveness import Seen, node_status, online_names, read_liveness
from tinc_hub.registry import NodeRow, iso_utc
from tinc_hub.registry_read import listed_nodes_sqlite
from tinc_hub.registry_url import RegistryURL

VPN = "10.77.0.0/24"
NOW = 1_750_000_000  # the rows' clock
PASSWORD = "pw-" + uuid.uuid4().hex
HEADER = ("NAME", "ADDRESS", "ENROLLED", "REVOKED", "ONLINE", "LAST SEEN", "EPHEMERAL")


# -- the reference: the per-row code tinc-hub nodes ran before (cli.py, ephemeral.expiry) ------

def reference_expiry(node: NodeRow, online: bool, started: Optional[float], now: int) -> Optional[str]:
    if node.ephemeral_seconds is None:
        return None
    if online:
        return "online"
    if started is None:
        return "paused"
    last = node.last_seen_at if node.last_seen_at is not None else now
    return iso_utc(int(max(last, started, 0)) + node.ephemeral_seconds)


def reference_rows(nodes: List[NodeRow], seen: Dict[str, Seen], hub_running: bool,
                   started: Optional[float], now: int) -> List[Dict[str, Any]]:
    online_now = online_names(seen, started)
    rows = []
    for n in nodes:
        live = node_status(seen.get(n.name), hub_running and not n.revoked, now)
        rows.append({"name": n.name, "address": n.address, "enrolled_at": iso_utc(n.enrolled_at),
                     "revoked": n.revoked, "revoked_at": iso_utc(n.revoked_at),
                     "online": live["online"], "last_seen": iso_utc(live["last_seen"]),
                     "ephemeral": n.ephemeral_seconds,
                     "expires": reference_expiry(n, n.name in online_now, started, now)})
    return rows


def reference_json(rows: List[Dict[str, Any]]) -> str:
    encode = json.JSONEncoder().encode
    return "[\n" + ",\n".join(encode(row) for row in rows) + "\n]\n" if rows else "[]\n"


def reference_cells(r: Dict[str, Any]) -> tuple:
    return (r["name"], r["address"], r["enrolled_at"], r["revoked_at"] or "-",
            "yes" if r["online"] else "no", r["last_seen"] or "never",
            "-" if r["expires"] is None else "online" if r["expires"] == "online" else
            "paused (hub tincd down)" if r["expires"] == "paused" else f"removed at {r['expires']}")


def reference_table(rows: List[Dict[str, Any]]) -> str:
    table = [HEADER] + [reference_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n" for row in table)


# -- a registry with every kind of row ---------------------------------------------------------

def varied_hub(root: Path) -> HubEnv:
    """12 nodes: fill1 revoked, fill2..fill5 ephemeral (fill2 never seen, fill3 seen long ago,
    fill4 seen lately with an "up" record, fill5 revoked), distinct enrolment times; the hub's
    own row; liveness records of every shape (and of names that are no node)."""
    env = init_hub(root, vpn_subnet=VPN)
    fill_registry(env.registry, VPN, 12, reserved=[env.config.hub_address], clock=NOW)
    with closing(sqlite3.connect(env.state.registry_file)) as db, db:
        for i in range(12):
            db.execute("UPDATE nodes SET enrolled_at = ? WHERE name = ?", (NOW - 7 * i, f"fill{i}"))
        db.execute("UPDATE nodes SET revoked_at = ? WHERE name IN ('fill1', 'fill5')", (NOW + 60,))
        for name, seconds, seen in (("fill2", 600, None), ("fill3", 3600, NOW - 5000),
                                    ("fill4", 86400, NOW - 30), ("fill5", 900, NOW - 100)):
            db.execute("UPDATE nodes SET ephemeral_seconds = ?, last_seen_at = ? WHERE name = ?",
                       (seconds, seen, name))
    records = {"fill0": "up 1750000100 192.0.2.10\n", "fill1": "up 1750000200 192.0.2.11\n",
               "fill3": "down 1749990000 \n", "fill4": "up 1750000300 192.0.2.14\n",
               "fill6": "up 1749000000 192.0.2.16\n",  # before the tincd of some cases started
               "fill7": "garbage\n", "fill8": "down 123 x y z\n", "ghost": "up 1750000000 192.0.2.99\n",
               ".fill9.1234": "up 1750000000 torn\n", "bad-name": "up 1750000000 x\n"}
    directory = env.state.root / "liveness"
    directory.mkdir()
    for name, text in records.items():
        (directory / name).write_text(text)
    return env


@pytest.fixture(scope="module")
def shared_varied_hub(tmp_path_factory) -> HubEnv:
    """One varied_hub for the tests that only read it."""
    return varied_hub(tmp_path_factory.mktemp("varied"))


def registry_nodes(env: HubEnv) -> List[NodeRow]:
    with env.registry.reading() as view:
        return view.list_nodes()


def run_cli(capsys, env: HubEnv, *argv: str) -> str:
    capsys.readouterr()
    assert main(["--state-dir", str(env.state.root), *argv]) == 0
    return capsys.readouterr().out


def test_nodes_prints_what_the_per_row_code_printed(shared_varied_hub: HubEnv, capsys) -> None:
    env = shared_varied_hub
    seen = read_liveness(env.state.root)
    assert sorted(seen) == ["fill0", "fill1", "fill3", "fill4", "fill6", "fill8", "ghost"]
    expected = reference_rows(registry_nodes(env), seen, False, None, NOW)  # no hub tincd here
    assert len(expected) == 12 and "hub1" not in {r["name"] for r in expected}
    out = run_cli(capsys, env, "nodes", "--json")
    assert out == reference_json(expected)
    assert out.count("\n") == 12 + 2  # one row per line
    assert run_cli(capsys, env, "nodes") == reference_table(expected)
    # every kind of value is there
    by_name = {r["name"]: r for r in json.loads(out)}
    assert by_name["fill1"]["revoked"] and by_name["fill1"]["revoked_at"] == iso_utc(NOW + 60)
    assert by_name["fill2"]["expires"] == "paused" and by_name["fill0"]["expires"] is None
    assert by_name["fill3"]["last_seen"] == iso_utc(1749990000)


@pytest.mark.parametrize("hub_running, started", [(True, NOW - 1000.0), (True, 1749500000.5),
                                                  (True, None), (False, None)])
def test_node_rows_match_the_reference_with_the_hub_tincd_running(shared_varied_hub: HubEnv, hub_running: bool,
                                                                   started: Optional[float]) -> None:
    env = shared_varied_hub
    seen = read_liveness(env.state.root)
    url = RegistryURL.sqlite(env.state.registry_file)
    listed = listed_nodes_sqlite(url)
    rows = node_rows(listed, seen, hub_running, started, NOW + 10)
    assert rows == reference_rows(registry_nodes(env), seen, hub_running, started, NOW + 10)
    assert node_json_listing(listed, seen, hub_running, started, NOW + 10) == reference_json(rows)
    if hub_running and started is not None:
        assert [r["name"] for r in rows if r["online"]] == ["fill0", "fill4", "fill6"]
        assert {r["name"]: r["expires"] for r in rows if r["ephemeral"]}["fill4"] == "online"


@pytest.mark.parametrize("odd", [
    ("n\u00e9\"}, {", "10.0.0.9", NOW, None, None, None),  # a string to escape
    (7, "10.0.0.9", NOW, None, None, None),  # no str: SQLite keeps any type in any column
    ("fill0", b"10.0.0.9", NOW, None, None, None),
    ("fill0", "10.0.0.9", NOW, NOW + 1.5, 60.0, None),
    ("fill0", "10.0.0.9", NOW, None, True, NOW),
    ("fill0", "10.0.0.9", None, None, None, None),
    ("fill0", "10.0.0.9", "yesterday", None, None, None),
])
def test_node_json_listing_is_the_rows_encoding_for_any_registry_value(odd: tuple) -> None:
    """Values of other types than the registry's (a hand-edited SQLite file) print what the
    rows print, or fail as they do."""
    listed = [("fill1", "10.0.0.1", NOW, None, 600, NOW - 5), odd, ("fill2", "10.0.0.2", NOW - 1, NOW, None, None)]
    seen = {"fill0": Seen(True, NOW - 3, "192.0.2.1"), "fill1": Seen(False, NOW - 9, "")}
    for running, started in ((True, NOW - 100.5), (False, None)):
        try:
            expected = json_listing(node_rows(listed, seen, running, started, NOW))
        except TypeError:
            with pytest.raises(TypeError):
                node_json_listing(listed, seen, running, started, NOW)
            continue
        assert node_json_listing(iter(listed), seen, running, started, NOW) == expected


def test_the_sqlite_read_is_the_registry_read_or_leaves_it_to_the_registry(tmp_path: Path) -> None:
    env = varied_hub(tmp_path)
    path = env.state.registry_file
    with env.registry.reading() as view:
        assert listed_nodes_sqlite(RegistryURL.sqlite(path)) == view.listed_nodes()
    missing = tmp_path / "missing.sqlite3"
    assert listed_nodes_sqlite(RegistryURL.sqlite(missing)) is None and not missing.exists()
    not_a_db = tmp_path / "junk.sqlite3"
    not_a_db.write_bytes(b"not a database" * 100)
    assert listed_nodes_sqlite(RegistryURL.sqlite(not_a_db)) is None
    assert listed_nodes_sqlite(RegistryURL.parse("postgresql://hub@127.0.0.1/x")) is None
    for revision in ("0004", "9999"):  # to upgrade / to refuse: the Registry's job
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        assert listed_nodes_sqlite(RegistryURL.sqlite(path)) is None
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP TABLE alembic_version")  # legacy (before Alembic)
    assert listed_nodes_sqlite(RegistryURL.sqlite(path)) is None


@pytest.mark.skipif(postgres.unavailable_reason() is not None, reason=str(postgres.unavailable_reason()))
def test_nodes_on_postgresql_prints_the_same_bytes(tmp_path: Path, capsys, pg) -> None:
    env = varied_hub(tmp_path)
    before = run_cli(capsys, env, "nodes", "--json"), run_cli(capsys, env, "nodes")
    name = "listing_" + uuid.uuid4().hex[:12]
    url = pg.create_database(name, user="hub", password=PASSWORD)
    password_file = tmp_path / "pgpassword"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    try:
        run_cli(capsys, env, "registry", "copy", "--to", url, "--to-password-file", str(password_file))
        assert json.loads(env.state.config_file.read_text())["registry"] == url  # hub.json names PG
        os.rename(env.state.registry_file, tmp_path / "old.sqlite3")  # nothing can read SQLite now
        assert (run_cli(capsys, env, "nodes", "--json"), run_cli(capsys, env, "nodes")) == before
    finally:
        pg.drop_database(name)


# -- JSON ---------------------------------------------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(alphabet="}, {\"\\\na\u00e9\u2028", max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "}, {"]), _VALUES, max_size=3), max_size=6))
def test_json_listing_is_the_row_by_row_encoding(rows: List[Dict[str, Any]]) -> None:
    assert json_listing(rows) == reference_json(rows)
    assert json.loads(json_listing(rows)) == rows


def test_table_listing_aligns_like_ljust() -> None:
    cells = [("a", "bbb", ""), ("cccc", "d", "e")]
    assert table_listing(("X", "Y", "Z"), cells) == "X     Y    Z\na     bbb\ncccc  d    e\n"


# -- what the read-only listings import -----------------------------------------------------------

HEAVY = ("sqlalchemy", "alembic", "psycopg", "cryptography", "starlette", "uvicorn", "anyio",
         "http", "ssl")  # http.client and ssl: bootstrap's pinned exchange imports them itself
WITH_SQLALCHEMY = ("sqlalchemy", "http", "ssl")  # which imports http and ssl of its own


@pytest.fixture(scope="module")
def plain_hub(tmp_path_factory) -> HubEnv:
    env = init_hub(tmp_path_factory.mktemp("plain"), vpn_subnet=VPN)
    env.registry.dispose()
    return env


@pytest.mark.parametrize("argv, allowed", [
    (["nodes", "--json"], ()), (["nodes"], ()),  # SQLite: not even SQLAlchemy
    (["token", "list", "--json"], WITH_SQLALCHEMY), (["hubs"], WITH_SQLALCHEMY),
    (["expose", "list"], WITH_SQLALCHEMY),
])
def test_read_only_listings_import_no_web_server_and_no_cryptography(plain_hub: HubEnv, argv: List[str],
                                                                     allowed: tuple) -> None:
    env = plain_hub
    script = ("import contextlib, io, json, sys\n"
              "from tinc_hub.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    code = main(sys.argv[1:])\n"
              f"print(json.dumps([code, sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})]))\n")
    done = subprocess.run([sys.executable, "-c", script, "--state-dir", str(env.state.root), *argv],
                          capture_output=True, text=True, timeout=60, check=True)
    code, imported = json.loads(done.stdout)
    assert code == 0, done.stderr
    assert set(imported) <= set(allowed), f"tinc-hub {' '.join(argv)} imported {imported}"


# -- odd liveness records ---------------------------------------------------------------------------

def test_odd_liveness_records_are_skipped_and_never_hang(tmp_path: Path) -> None:
    directory = tmp_path / "liveness"
    directory.mkdir()
    (directory / "good").write_text("up 1750000000 192.0.2.1\n")
    (tmp_path / "elsewhere").write_text("up 1750000000 192.0.2.2\n")
    (directory / "link").symlink_to(tmp_path / "elsewhere")  # not tinc-hub's: not followed
    (directory / "adir").mkdir()
    os.mkfifo(directory / "fifo")  # no writer: a blocking open would hang here
    (directory / "huge").write_text("up 1750000000 " + "x" * 5000)
    (directory / "latin").write_bytes(b"up 1750000000 \xe9\n")
    (directory / "superscript").write_text("up \u00b2 x\n")  # str.isdigit() but not int()
    assert read_liveness(tmp_path) == {"good": Seen(True, 1750000000, "192.0.2.1")}
    assert read_liveness(tmp_path / "nowhere") == {}
