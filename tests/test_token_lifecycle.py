"""Token lifecycle and authorization: token list/revoke, `revoke NAME --revoke-token`, the
schema upgrade of an older registry, refusals answered before the registry write lock (proved
against the real server with the lock file held by this test), and the audit line (real
server log: present, one line per answer, never the token)."""

import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from bootstrap import bootstrap
from tinc_hub.cli import main
from tinc_hub.enroll import Attempt, audit_line, log_value
from tinc_hub.errors import HubError
from tinc_hub.openapi import openapi_schema
from tinc_hub.registry import TOKEN_ID_CHARS, TokenRow
from tinc_hub.tls import pin_of_cert_file
from tinc_hub.tokens import hash_secret, new_secret, revoke_token
from hub_fixtures import HubEnv, dump_registry, hub, init_hub, rsa_public_pem, wait_until  # noqa: F401
from labkit.loopback_hub import Enrolment, HubProcess, Reply, enrol_concurrently, free_port

# The registry schema as the first release wrote it (before tokens.revoked_at).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    secret_sha256 TEXT PRIMARY KEY,
    uses_total    INTEGER NOT NULL,
    uses_left     INTEGER NOT NULL CHECK (uses_left >= 0),
    expires_at    INTEGER NOT NULL,
    bound_name    TEXT,
    allow_replace INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    name          TEXT PRIMARY KEY,
    address       TEXT NOT NULL UNIQUE,
    address_int   INTEGER NOT NULL UNIQUE,
    public_key    TEXT NOT NULL UNIQUE,
    token_sha256  TEXT NOT NULL,
    enrolled_at   INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
"""


def sd(env: HubEnv) -> List[str]:
    return ["--state-dir", str(env.state.root)]


def secret_of(token: str) -> str:
    return bootstrap.decode_token(token).secret


def id_of(token: str) -> str:
    return hash_secret(secret_of(token))[:TOKEN_ID_CHARS]


def cli(capsys, argv: List[str]) -> Tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def token_list(env: HubEnv, capsys) -> Dict[str, dict]:
    code, out, _ = cli(capsys, sd(env) + ["token", "list", "--json"])
    assert code == 0
    return {row["id"]: row for row in json.loads(out)}


def handmade_token(env: HubEnv, secret: str, sha: str = "", **columns) -> str:
    """Insert a token row directly (e.g. with a chosen hash) and return its printed form."""
    now = int(time.time())
    row = dict(secret_sha256=sha or hash_secret(secret), uses_total=1, uses_left=1,
               expires_at=now + 3600, bound_name=None, allow_replace=False, created_at=now)
    row.update(columns)
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.insert_token(TokenRow(**row))
    return printed(env, secret)


def token_rows(env: HubEnv) -> List[TokenRow]:
    with env.registry.reading() as view:
        return view.list_tokens()


def printed(env: HubEnv, secret: str) -> str:
    """The token string the hub would print for ``secret``."""
    return bootstrap.encode_token(bootstrap.Token(
        env.config.address, env.config.api_port, pin_of_cert_file(env.state.cert_file),
        env.config.net, env.config.name, secret))


# -- schema upgrade ---------------------------------------------------------------------------

def make_old_registry(env: HubEnv) -> str:
    """Replace the hub's registry with one made by the old schema, holding one node enrolled
    by a 5-use token (returned) that is still valid."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(env.state.registry_file) + suffix).unlink(missing_ok=True)
    secret = new_secret()
    now = int(time.time())
    conn = sqlite3.connect(env.state.registry_file)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO tokens VALUES (?, 5, 4, ?, NULL, 0, ?)",
                     (hash_secret(secret), now + 3600, now))
        conn.execute("INSERT INTO nodes VALUES ('old1', '10.77.0.2', ?, ?, ?, ?, ?, NULL)",
                     (0x0A4D0002, rsa_public_pem(60), hash_secret(secret), now, now))
        conn.commit()
    finally:
        conn.close()
    return secret


def columns(env: HubEnv) -> List[str]:
    conn = sqlite3.connect(env.state.registry_file)
    try:
        return [r[1] for r in conn.execute("PRAGMA table_info(tokens)")]
    finally:
        conn.close()


def test_cli_works_on_a_registry_made_by_the_old_schema(hub: HubEnv, capsys) -> None:
    secret = make_old_registry(hub)
    assert "revoked_at" not in columns(hub)
    code, out, err = cli(capsys, sd(hub) + ["nodes", "--json"])
    assert code == 0, err
    assert [n["name"] for n in json.loads(out)] == ["old1"]
    assert "revoked_at" in columns(hub)
    listed = token_list(hub, capsys)
    assert list(listed) == [hash_secret(secret)[:TOKEN_ID_CHARS]]
    row = next(iter(listed.values()))
    assert (row["status"], row["uses_left"], row["uses_total"], row["nodes"]) == ("active", 4, 5, ["old1"])
    # The old token still enrols, then is revoked by id and refused.
    token = printed(hub, secret)
    assert hub.enroll(token, "new1", rsa_public_pem(61))[0] == 200
    assert cli(capsys, sd(hub) + ["token", "revoke", row["id"]])[0] == 0
    assert hub.enroll(token, "new2", rsa_public_pem(62))[0] == 401
    assert cli(capsys, sd(hub) + ["token", "create", "--json"])[0] == 0
    assert cli(capsys, sd(hub) + ["revoke", "old1"])[0] == 0


def test_serve_schema_upgrade_is_idempotent_and_keeps_rows(hub: HubEnv) -> None:
    make_old_registry(hub)
    before = dump_registry(hub.registry)
    hub.registry.ensure_schema()  # what `serve` runs at start
    after = dump_registry(hub.registry)
    # tokens gain revoked_at (0001), nodes kind and the credential columns (0002); then settings;
    # tokens ephemeral_seconds, nodes ephemeral_seconds and last_seen_at (0004)
    expected = [row + (None, None) if row[0] == "tokens" else row + ("node", None, None, None, None)
                for row in before]
    assert after == expected + [("settings", "generation", "0")]
    mtime = hub.state.registry_file.stat().st_mtime_ns
    assert hub.registry.upgrade_schema() == []  # current: only read
    assert hub.state.registry_file.stat().st_mtime_ns == mtime
    assert dump_registry(hub.registry) == after


# -- token list / revoke ----------------------------------------------------------------------

def test_token_list_shows_every_state_and_never_the_secret(hub: HubEnv, capsys) -> None:
    active = hub.token(uses=5)
    spent = hub.token()
    assert hub.enroll(spent.token, "used1", rsa_public_pem(1))[0] == 200
    expired = hub.token(ttl=60, now=time.time() - 120)
    bound = hub.token(name="web_1", replace=True)
    revoked = hub.token(uses=3)
    assert cli(capsys, sd(hub) + ["token", "revoke", revoked.id[:7]])[0] == 0

    listed = token_list(hub, capsys)
    assert {i: r["status"] for i, r in listed.items()} == {
        active.id: "active", spent.id: "spent", expired.id: "expired", bound.id: "active",
        revoked.id: "revoked"}
    assert listed[spent.id]["nodes"] == ["used1"] and listed[spent.id]["uses_left"] == 0
    assert (listed[bound.id]["name"], listed[bound.id]["replace"]) == ("web_1", True)
    assert listed[revoked.id]["revoked_at"] and listed[active.id]["revoked_at"] is None
    assert set(listed[active.id]) == {"id", "status", "created_at", "expires_at", "uses_left",
                                      "uses_total", "name", "replace", "revoked_at", "ephemeral",
                                      "nodes"}

    code, out, _ = cli(capsys, sd(hub) + ["token", "list"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "EXPIRES", "USES", "NAME", "REPLACE", "EPHEMERAL",
                                "REVOKED", "STATUS"]
    by_id = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_id[active.id][3:] == ["5/5", "-", "no", "-", "-", "active"]
    assert by_id[bound.id][3:] == ["1/1", "web_1", "yes", "-", "-", "active"]
    assert by_id[revoked.id][-1] == "revoked" and by_id[revoked.id][3] == "3/3"
    for issued in (active, spent, expired, bound, revoked):
        text = json.dumps(listed) + out
        assert secret_of(issued.token) not in text
        assert hash_secret(secret_of(issued.token)) not in text  # only a 10-digit prefix


def test_token_revoke_prefix_rules(hub: HubEnv, capsys) -> None:
    a = handmade_token(hub, new_secret(), sha="abcdef1111" + "0" * 54)
    handmade_token(hub, new_secret(), sha="abcdef2222" + "0" * 54)
    before = dump_registry(hub.registry)
    for argv, expected, words in (
            (["abcdef"], 1, "ambiguous"),
            (["abcdef3"], 1, "no token with id"),
            (["abcde"], 2, "6 to 64 hex digits"),
            (["abcdeg1"], 2, "hex digits"),
            (["'; rm -rf /"], 2, "hex digits")):
        code, out, err = cli(capsys, sd(hub) + ["token", "revoke"] + argv)
        assert code == expected, (argv, err)
        assert out == "" and err.startswith("tinc-hub: error: ") and err.count("\n") == 1
        assert words in err and "(hint: " in err
    assert dump_registry(hub.registry) == before
    code, out, _ = cli(capsys, sd(hub) + ["token", "revoke", "ABCDEF1"])  # case-insensitive
    assert code == 0 and "abcdef1111 revoked" in out
    code, out, _ = cli(capsys, sd(hub) + ["token", "revoke", "abcdef1111"])
    assert code == 0 and "already revoked" in out
    assert hub.enroll(a, "n1", rsa_public_pem(1))[0] == 401


def test_revoked_token_refused_like_spent_and_the_refusal_changes_nothing(hub: HubEnv, capsys) -> None:
    fleet = hub.token(uses=5)
    spent = hub.token()
    assert hub.enroll(fleet.token, "a1", rsa_public_pem(1))[0] == 200
    assert hub.enroll(spent.token, "s1", rsa_public_pem(2))[0] == 200
    spent_status, _ = hub.enroll(spent.token, "s2", rsa_public_pem(3))
    assert cli(capsys, sd(hub) + ["token", "revoke", fleet.id])[0] == 0
    before = hub.snapshot()
    status, answer = hub.enroll(fleet.token, "a2", rsa_public_pem(4))
    assert status == spent_status == 401 and answer == {"error": "token revoked"}
    # A revoked token also refuses the replay of its own enrolment.
    assert hub.enroll(fleet.token, "a1", rsa_public_pem(1)) == (401, {"error": "token revoked"})
    assert hub.snapshot() == before
    assert token_list(hub, capsys)[fleet.id]["uses_left"] == 4


def test_replace_without_name_is_a_usage_error(hub: HubEnv, capsys, monkeypatch) -> None:
    before = dump_registry(hub.registry)
    code, out, err = cli(capsys, sd(hub) + ["token", "create", "--replace"])
    assert code == 2 and out == ""
    assert err.startswith("tinc-hub: error: --replace needs --name") and err.count("\n") == 1
    monkeypatch.setenv("TINC_HUB_TOKEN_REPLACE", "1")  # the env twin too
    assert cli(capsys, sd(hub) + ["token", "create"])[0] == 2
    assert dump_registry(hub.registry) == before
    with pytest.raises(HubError):
        hub.token(replace=True)
    assert dump_registry(hub.registry) == before


def test_bound_replace_token_cannot_rekey_another_node(hub: HubEnv) -> None:
    fleet = hub.token(uses=3).token
    assert hub.enroll(fleet, "web_1", rsa_public_pem(1))[0] == 200
    assert hub.enroll(fleet, "web_2", rsa_public_pem(2))[0] == 200
    rekey = hub.token(name="web_1", replace=True).token
    before = hub.snapshot()
    status, answer = hub.enroll(rekey, "web_2", rsa_public_pem(3))
    assert status == 403 and "bound to node 'web_1'" in answer["error"]
    assert hub.snapshot() == before
    assert hub.enroll(rekey, "web_1", rsa_public_pem(3))[0] == 200


def test_unbound_replace_token_from_an_older_hub_rekeys_no_node(hub: HubEnv) -> None:
    """An older tinc-hub made --replace tokens without --name (still in an upgraded registry):
    such a token enrols new names like any token, but takes over no enrolled name."""
    fleet = hub.token().token
    assert hub.enroll(fleet, "victim", rsa_public_pem(1))[0] == 200
    legacy = handmade_token(hub, new_secret(), uses_total=5, uses_left=5, allow_replace=True)
    before = hub.snapshot()
    status, answer = hub.enroll(legacy, "victim", rsa_public_pem(2))
    assert status == 409 and "--name victim --replace" in answer["error"], answer
    assert hub.snapshot() == before
    assert hub.enroll(legacy, "newcomer", rsa_public_pem(3))[0] == 200


def test_revocation_is_dated_when_it_takes_effect_not_when_it_was_asked(hub: HubEnv) -> None:
    """`token revoke` waiting for the write lock (an enrolment holds it) is dated after the
    wait: no node enrolled with the token carries a later date than its revocation."""
    issued = hub.token(uses=5)
    done: List[bool] = []
    fd = os.open(hub.state.lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as an enrolment in progress holds it
        asked = int(time.time())
        revoker = threading.Thread(target=lambda: done.append(revoke_token(hub.registry, issued.id)[1]))
        revoker.start()
        assert wait_until(lambda: int(time.time()) > asked, 2, 0.01)
        released = int(time.time())
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    revoker.join(timeout=30)
    assert done == [True]
    revoked_at = next(r for r in token_rows(hub) if r.id == issued.id).revoked_at
    assert revoked_at is not None and revoked_at >= released > asked


# -- revoke NAME and the token that enrolled it -----------------------------------------------

def test_revoked_machine_with_a_fleet_token_cannot_come_back_under_a_new_name(hub: HubEnv, capsys) -> None:
    code, out, _ = cli(capsys, sd(hub) + ["token", "create", "--uses", "5", "--json"])
    assert code == 0
    fleet = json.loads(out)["token"]
    assert hub.enroll(fleet, "machine_a", rsa_public_pem(1))[0] == 200
    code, out, err = cli(capsys, sd(hub) + ["revoke", "machine_a", "--revoke-token"])
    assert code == 0 and f"token {id_of(fleet)} revoked" in out
    assert "can still enrol" not in err
    before = hub.snapshot()
    status, answer = hub.enroll(fleet, "machine_b", rsa_public_pem(5))  # same machine, new name
    assert (status, answer) == (401, {"error": "token revoked"})
    status, _ = hub.enroll(fleet, "machine_b", rsa_public_pem(6))  # and with a new key
    assert status == 401
    assert hub.snapshot() == before


def test_revoke_without_the_flag_names_the_token_and_the_command_that_ends_it(hub: HubEnv, capsys) -> None:
    fleet = hub.token(uses=5).token
    assert hub.enroll(fleet, "machine_c", rsa_public_pem(1))[0] == 200
    code, out, err = cli(capsys, sd(hub) + ["revoke", "machine_c"])
    assert code == 0 and "token" not in out
    warning = next(line for line in err.splitlines() if "can still enrol" in line)
    assert f"token {id_of(fleet)}, which enrolled machine_c, can still enrol 4 more" in warning
    command = re.search(r"end it with '([^']+)'\)", warning).group(1)
    argv = shlex.split(command)
    assert argv[0] == "tinc-hub" and argv[-3:] == ["token", "revoke", id_of(fleet)]
    assert main(argv[1:]) == 0  # the printed command, as the admin would run it
    assert hub.enroll(fleet, "machine_d", rsa_public_pem(2)) == (401, {"error": "token revoked"})
    # A token bound to the revoked name, or already spent, gets no warning.
    bound = hub.token(name="machine_e", uses=2).token
    assert hub.enroll(bound, "machine_e", rsa_public_pem(3))[0] == 200
    spent = hub.token().token
    assert hub.enroll(spent, "machine_f", rsa_public_pem(4))[0] == 200
    for name in ("machine_e", "machine_f"):
        code, _, err = cli(capsys, sd(hub) + ["revoke", name])
        assert code == 0 and "can still enrol" not in err


# -- audit line -------------------------------------------------------------------------------

def test_log_value_keeps_every_value_on_one_line() -> None:
    assert log_value(None) == "-" and log_value("10.0.0.2") == "10.0.0.2"
    assert log_value("-") == '"-"' and log_value("") == '""'
    assert log_value(["a\nb"]) == "<list>" and log_value(5) == "<int>"
    forged = "x\n2024-01-01 tinc_hub.audit INFO enrolment result=new name=evil\x1b[2J\u2028"
    shown = log_value(forged)
    assert shown.isascii() and shown.isprintable() and "\n" not in shown and "\x1b" not in shown
    assert json.loads(shown) == forged
    assert len(log_value("y" * 10000)) < 120
    line = audit_line("refused", 401, Attempt("::1", name="a b", token="abc"), "token expired")
    assert line == 'enrolment result=refused status=401 name="a b" address=- client=::1 token=abc reason="token expired"'


def test_audit_lines_from_the_enroller(hub: HubEnv, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tinc_hub.audit")
    fleet = hub.token(uses=2)
    rekey = hub.token(name="n1", replace=True, uses=2)
    raw = lambda name, i: json.dumps({"name": name, "public_key": rsa_public_pem(i)}).encode()  # noqa: E731
    assert hub.enroller.process("Bearer " + fleet.token, raw("n1", 1), client="192.0.2.9").status == 200
    assert hub.enroller.process("Bearer " + fleet.token, raw("n1", 1), client="192.0.2.9").status == 200
    assert hub.enroller.process("Bearer " + rekey.token, raw("n1", 2), client="192.0.2.9").status == 200
    assert hub.enroller.process("Bearer " + rekey.token, raw("n2", 3), client="192.0.2.9").status == 403
    assert hub.enroller.process("Bearer nonsense", raw("n3", 3), client="192.0.2.9").status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "tinc_hub.audit"]
    common = "client=192.0.2.9"
    assert lines == [
        f"enrolment result=new status=200 name=n1 address=10.77.0.2 {common} token={fleet.id}",
        f"enrolment result=replay status=200 name=n1 address=10.77.0.2 {common} token={fleet.id}",
        f"enrolment result=rekeyed status=200 name=n1 address=10.77.0.2 {common} token={rekey.id}",
        f"enrolment result=refused status=403 name=n2 address=- {common} token={rekey.id}"
        " reason=\"token is bound to node 'n1', not 'n2'\"",
        f"enrolment result=refused status=401 name=- address=- {common} token=- reason=\"malformed token\""]


# -- the real server: pre-lock refusals and the audit log -------------------------------------

@pytest.fixture
def served(tmp_path: Path):
    port = free_port()
    env = init_hub(tmp_path, api_port=port)
    server = HubProcess(env.state.root, port, env.state.cert_file, tmp_path / "serve.log")
    server.start()
    try:
        yield env, server
    finally:
        server.stop()


def test_spent_expired_revoked_tokens_and_replays_answered_while_the_write_lock_is_held(served) -> None:
    env, server = served
    spent = env.token().token
    first = enrol_concurrently(server, [Enrolment(spent, "replayed", rsa_public_pem(1))])[0]
    assert first.status == 200
    expired = env.token(ttl=60, now=time.time() - 120).token
    revoked = env.token(uses=5)
    assert revoked.id in [row[1][:TOKEN_ID_CHARS] for row in dump_registry(env.registry) if row[0] == "tokens"]
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.revoke_token(hash_secret(secret_of(revoked.token)), int(time.time()))
    valid = env.token().token
    refused = [Enrolment(spent, "other1", rsa_public_pem(2)),
               Enrolment(expired, "other2", rsa_public_pem(3)),
               Enrolment(revoked.token, "other3", rsa_public_pem(4)),
               Enrolment(printed(env, new_secret()), "other4", rsa_public_pem(5))]
    # the node's replay carries the credential its first answer issued; once the hub has
    # recorded that the node has it (its first showing), a replay writes nothing, takes no lock
    replay = Enrolment(spent, "replayed", rsa_public_pem(1), first.body["credential"])
    assert enrol_concurrently(server, [replay])[0].status == 200

    fd = os.open(env.state.lock_file, os.O_RDWR)
    released = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the registry write lock, as a CLI writer would hold it
        waiting: List[Reply] = []
        writer = threading.Thread(target=lambda: waiting.extend(
            enrol_concurrently(server, [Enrolment(valid, "newcomer", rsa_public_pem(6))], timeout=60)))
        writer.start()
        started = time.monotonic()
        replies = enrol_concurrently(server, refused + [replay], timeout=10)
        elapsed = time.monotonic() - started
        assert [r.status for r in replies] == [401, 401, 401, 401, 200], replies
        assert [r.body.get("error") for r in replies[:4]] == [
            "token already used", "token expired", "token revoked", "unknown token"]
        assert elapsed < 5, elapsed
        writer.join(timeout=1.0)
        assert writer.is_alive() and not waiting  # the new enrolment waits for the lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        released = True
        writer.join(timeout=60)
        assert not writer.is_alive()
        assert waiting[0].status == 200 and waiting[0].body["name"] == "newcomer"
    finally:
        if not released:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_audit_lines_in_the_server_log_never_the_token(served) -> None:
    env, server = served
    good = env.token(uses=1).token
    forged_name = "x\n2024-01-01 00:00:00,000 tinc_hub.audit INFO enrolment result=new name=evil\x1b[31m"
    items = [Enrolment(good, "audited", rsa_public_pem(1)),
             Enrolment(good, "second", rsa_public_pem(2)),
             Enrolment(good, forged_name, rsa_public_pem(3))]
    statuses = [enrol_concurrently(server, [item])[0].status for item in items]
    assert statuses == [200, 401, 400]
    expected = 3
    audit: List[str] = []

    def logged() -> bool:
        audit[:] = [l for l in server.log.read_text(errors="replace").splitlines() if " tinc_hub.audit " in l]
        return len(audit) >= expected

    deadline = time.monotonic() + 10
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(audit) == expected, server.log_text()
    tid = id_of(good)
    assert audit[0].endswith(f"INFO enrolment result=new status=200 name=audited address=10.77.0.2"
                             f" client=127.0.0.1 token={tid}")
    assert audit[1].endswith(f"enrolment result=refused status=401 name=second address=-"
                             f" client=127.0.0.1 token={tid} reason=\"token already used\"")
    assert "result=refused status=400 name=\"x\\n2024-01-01" in audit[2] and "\\u001b[31m" in audit[2]
    text = server.log.read_text(errors="replace")
    assert "\x1b" not in text
    assert not any(line.startswith("2024-01-01") for line in text.splitlines())
    secret = secret_of(good)
    assert secret not in text and good not in text and hash_secret(secret) not in text


def test_openapi_documents_revoked_tokens_and_replace_tokens_naming_their_node() -> None:
    responses = openapi_schema()["paths"]["/v1/enroll"]["post"]["responses"]
    assert "revoked token" in responses["401"]["description"]
    assert "--name NAME --replace" in responses["409"]["description"]


def test_internal_error_line_stays_one_line_whatever_the_path(served) -> None:
    """Starlette's route regex ends in `$`, which also matches before a final newline: POST
    /v1/enroll%0A reaches the handler. With the hub broken (its own host file gone: a 500),
    the error line (request.url.path, which urlsplit strips of newlines) stays one line."""
    env, server = served
    shutil.rmtree(env.config.hosts_dir)  # hosts/ is not a directory: a hub fault
    env.config.hosts_dir.write_text("")
    body = json.dumps({"name": "broken", "public_key": rsa_public_pem(1)}).encode()
    head = ("POST /v1/enroll%0A HTTP/1.1\r\nHost: h\r\n"
            f"Authorization: Bearer {env.token().token}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(head + body)
            answer = sock.recv(300)
    assert answer.startswith(b"HTTP/1.1 500 "), answer
    assert wait_until(lambda: "internal error on POST" in server.log_text(), 5)
    lines = [line for line in server.log_text().splitlines() if "internal error on POST" in line]
    assert len(lines) == 1 and "POST /v1/enroll: NotADirectoryError: " in lines[0], lines
