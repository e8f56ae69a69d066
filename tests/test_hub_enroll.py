"""The pure enrolment handler: refusals change nothing; the good path allocates, replays,
replaces and survives races."""

import json
import threading
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import pytest

from bootstrap import bootstrap
from tinc_hub.enroll import credential_hash, MAX_BODY_BYTES, Enroller
from tinc_hub.hostfiles import reconcile_host_files
from tinc_hub.registry import Registry
from hub_fixtures import (HUB_NAME, HubEnv, dump_registry, ec_public_pem, enrol_answer,  # noqa: F401
                          hub, init_hub, rsa_public_pem, write_registry_sql)


class Prepared(NamedTuple):
    env: HubEnv
    tokens: Dict[str, str]


@pytest.fixture
def prepared(hub: HubEnv) -> Prepared:
    """A hub with one enrolled node and tokens in every state."""
    spent = hub.token().token
    assert hub.enroll(spent, "first", rsa_public_pem(0))[0] == 200
    tokens = {
        "valid": hub.token(uses=5).token,
        "spent": spent,
        "expired": hub.token(ttl=3600, now=time.time() - 7200).token,
        "bound": hub.token(name="bound_node").token,
    }
    return Prepared(hub, tokens)


def body(name="node_a", key: Optional[str] = None, **extra) -> bytes:
    data = {"name": name, "public_key": rsa_public_pem(1) if key is None else key}
    data.update(extra)
    return json.dumps(data).encode()


def forged_token(p: Prepared, **changes) -> str:
    real = bootstrap.decode_token(p.tokens["valid"])
    return bootstrap.encode_token(real._replace(**changes))


PEM = rsa_public_pem(1)
PEM_LINES = PEM.strip().splitlines()
KEY_1024 = rsa_public_pem(90, bits=1024)


# (case id, expected status, (authorization, body) from a Prepared)
Case = Callable[[Prepared], Tuple[Optional[str], bytes]]
BAD: Dict[str, Tuple[int, Case]] = {
    # names
    "name-slash": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("a/b"))),
    "name-dotdot": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(".."))),
    "name-dotdot-path": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("../hub1"))),
    "name-newline": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("a\nSubnet"))),
    "name-trailing-newline": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("node\n"))),
    "name-space": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("a b"))),
    "name-leading-space": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(" node"))),
    "name-unicode": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("nöde"))),
    "name-unicode-digit": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("node\u0663"))),
    "name-too-long": (400, lambda p: (f"Bearer {p.tokens['valid']}", body("x" * 65))),
    "name-empty": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(""))),
    "name-hub": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(HUB_NAME))),
    "name-hub-case": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(HUB_NAME.upper()))),
    "name-int": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(5))),
    "name-null": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(None))),
    "name-list": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(["a"]))),
    # keys
    "key-ec": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key=ec_public_pem()))),
    "key-rsa-1024": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key=KEY_1024))),
    "key-garbage-pem": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key="-----BEGIN RSA PUBLIC KEY-----\nbm90IGEga2V5\n-----END RSA PUBLIC KEY-----\n"))),
    "key-bad-base64": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key="-----BEGIN RSA PUBLIC KEY-----\n!!!!\n-----END RSA PUBLIC KEY-----\n"))),
    "key-text": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key="hello"))),
    "key-empty": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key=""))),
    "key-two-pems": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key=PEM + rsa_public_pem(2)))),
    "key-same-pem-twice": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key=PEM + PEM))),
    "key-subnet-before": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key="Subnet = 0.0.0.0/0\n" + PEM))),
    "key-subnet-after": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key=PEM + "Subnet = 0.0.0.0/0\n"))),
    "key-subnet-inside": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key="\n".join(PEM_LINES[:1] + ["Subnet = 0.0.0.0/0"] + PEM_LINES[1:]) + "\n"))),
    "key-header-inside": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key="\n".join(PEM_LINES[:1] + ["Proc-Type: 4,ENCRYPTED", ""] + PEM_LINES[1:]) + "\n"))),
    "key-mismatched-labels": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key=PEM.replace("-----END RSA PUBLIC KEY-----", "-----END PUBLIC KEY-----")))),
    "key-private": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(
        key="-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))),
    "key-int": (400, lambda p: (f"Bearer {p.tokens['valid']}", body(key=12))),
    # bodies
    "body-not-json": (400, lambda p: (f"Bearer {p.tokens['valid']}", b"name=node_a")),
    "body-binary": (400, lambda p: (f"Bearer {p.tokens['valid']}", b"\xff\xfe\x00{")),
    "body-empty": (400, lambda p: (f"Bearer {p.tokens['valid']}", b"")),
    "body-array": (400, lambda p: (f"Bearer {p.tokens['valid']}", b"[]")),
    "body-string": (400, lambda p: (f"Bearer {p.tokens['valid']}", b'"x"')),
    "body-null": (400, lambda p: (f"Bearer {p.tokens['valid']}", b"null")),
    "body-nested": (400, lambda p: (f"Bearer {p.tokens['valid']}", b"[" * 5000 + b"]" * 5000)),
    "body-missing-name": (400, lambda p: (f"Bearer {p.tokens['valid']}",
                                          json.dumps({"public_key": PEM}).encode())),
    "body-missing-key": (400, lambda p: (f"Bearer {p.tokens['valid']}",
                                         json.dumps({"name": "node_a"}).encode())),
    "body-oversized": (413, lambda p: (f"Bearer {p.tokens['valid']}",
                                       body(pad="x" * MAX_BODY_BYTES))),
    # tokens
    "token-missing": (401, lambda p: (None, body())),
    "token-empty": (401, lambda p: ("", body())),
    "token-no-bearer": (401, lambda p: (p.tokens["valid"], body())),
    "token-basic": (401, lambda p: ("Basic dXNlcjpwYXNz", body())),
    "token-bearer-only": (401, lambda p: ("Bearer ", body())),
    "token-garbage": (401, lambda p: ("Bearer tinc1.!!!notbase64", body())),
    "token-not-json": (401, lambda p: ("Bearer tinc1.bm90IGpzb24", body())),
    "token-huge": (401, lambda p: ("Bearer tinc1." + "A" * 5000, body())),
    "token-forged-secret": (401, lambda p: ("Bearer " + forged_token(p, secret="A" * 43), body())),
    "token-other-net": (401, lambda p: ("Bearer " + forged_token(p, net="othernet"), body())),
    "token-spent": (401, lambda p: (f"Bearer {p.tokens['spent']}", body())),
    "token-expired": (401, lambda p: (f"Bearer {p.tokens['expired']}", body())),
    "token-bound-other-name": (403, lambda p: (f"Bearer {p.tokens['bound']}", body("node_a"))),
    # conflicts
    "key-of-other-node": (409, lambda p: (f"Bearer {p.tokens['valid']}", body("node_a", rsa_public_pem(0)))),
    "name-taken-other-key": (409, lambda p: (f"Bearer {p.tokens['valid']}", body("first"))),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_4xx_and_changes_nothing(prepared: Prepared, case: str) -> None:
    expected, make = BAD[case]
    authorization, raw = make(prepared)
    before = prepared.env.snapshot()
    status, answer = enrol_answer(prepared.env.enroller, authorization, raw)
    assert status == expected, answer
    assert set(answer) == {"error"}
    assert isinstance(answer["error"], str) and answer["error"]
    assert "\n" not in answer["error"] and "\r" not in answer["error"]
    assert prepared.env.snapshot() == before


def test_error_messages_do_not_echo_tokens(prepared: Prepared) -> None:
    secret = bootstrap.decode_token(prepared.tokens["spent"]).secret
    _, answer = enrol_answer(prepared.env.enroller, "Bearer " + prepared.tokens["spent"], body())
    assert secret not in answer["error"]


# -- good path --------------------------------------------------------------------------------

def test_addresses_allocated_in_order_and_unique(hub: HubEnv) -> None:
    token = hub.token(uses=10).token
    addresses = []
    for i in range(5):
        status, answer = hub.enroll(token, f"node{i}", rsa_public_pem(10 + i))
        assert status == 200, answer
        assert answer["net"] == hub.config.net and answer["name"] == f"node{i}"
        assert answer["prefix"] == 24
        assert answer["hub"]["name"] == HUB_NAME
        assert answer["hub"]["host_file"] == hub.config.hub_host_file.read_text()
        addresses.append(answer["address"])
    assert addresses == [f"10.77.0.{i}" for i in range(2, 7)]
    host = (hub.config.hosts_dir / "node0").read_text()
    assert host == "Subnet = 10.77.0.2/32\n\n" + rsa_public_pem(10).strip() + "\n"


def test_spki_key_is_stored_as_pkcs1(hub: HubEnv) -> None:
    status, _ = hub.enroll(hub.token().token, "spki_node", "\n  " + rsa_public_pem(3, fmt="spki") + "\n\n")
    assert status == 200
    text = (hub.config.hosts_dir / "spki_node").read_text()
    assert "-----BEGIN RSA PUBLIC KEY-----" in text and "BEGIN PUBLIC KEY" not in text
    assert text.strip().endswith(rsa_public_pem(3).strip())


def test_replay_same_answer_no_use_spent_even_when_spent_or_expired(hub: HubEnv) -> None:
    token = hub.token(uses=1)
    status, first = hub.enroll(token.token, "node_r", rsa_public_pem(4))
    assert status == 200
    credential = first.pop("credential")  # issued with every new enrolment
    mtime = (hub.config.hosts_dir / "node_r").stat().st_mtime_ns
    # the first replay showing it records that the node has it (once); later ones write nothing
    assert hub.enroll(token.token, "node_r", rsa_public_pem(4), credential) == (200, first)
    with hub.registry.reading() as view:
        assert view.get_node("node_r").credential_used_at is not None
    rows = dump_registry(hub.registry)
    # the node's replay carries its credential: the same answer, nothing written
    assert hub.enroll(token.token, "node_r", rsa_public_pem(4), credential) == (200, first)  # token spent
    assert dump_registry(hub.registry) == rows
    assert (hub.config.hosts_dir / "node_r").stat().st_mtime_ns == mtime
    # Expire the token: the replay still answers the same.
    write_registry_sql(hub, "UPDATE tokens SET expires_at = 1")
    rows = dump_registry(hub.registry)
    assert hub.enroll(token.token, "node_r", rsa_public_pem(4), credential) == (200, first)
    # without the credential, with the (unbound, shared) token: the same answer, no new
    # credential (a holder of a fleet token must not cut its siblings off from sync)
    assert hub.enroll(token.token, "node_r", rsa_public_pem(4)) == (200, first)
    assert dump_registry(hub.registry) == rows
    # with a valid token bound to this name (the admin's answer to a lost credential): a new
    # one, and the old one is worth nothing from then on; no use spent, no host file touched
    bound = hub.token(name="node_r")
    status, again = hub.enroll(bound.token, "node_r", rsa_public_pem(4))
    renewed = again.pop("credential")
    assert status == 200 and renewed != credential and again == first
    assert (hub.config.hosts_dir / "node_r").stat().st_mtime_ns == mtime
    with hub.registry.reading() as view:
        assert sorted(t.uses_left for t in view.list_tokens()) == [0, 1]
        assert view.get_node("node_r").credential_sha256 == credential_hash(renewed)
    # The replay does not let a spent token enrol anything new.
    assert hub.enroll(token.token, "node_s", rsa_public_pem(5))[0] == 401


def test_replay_reports_reload_only_when_host_file_changed(hub: HubEnv) -> None:
    token = hub.token().token
    raw = body("node_h", rsa_public_pem(4))
    assert hub.enroller.process("Bearer " + token, raw).reload_needed
    assert not hub.enroller.process("Bearer " + token, raw).reload_needed
    (hub.config.hosts_dir / "node_h").unlink()
    outcome = hub.enroller.process("Bearer " + token, raw)  # replay repairs a lost host file
    assert outcome.status == 200 and outcome.reload_needed
    assert (hub.config.hosts_dir / "node_h").exists()


def test_different_key_409_then_replace_keeps_address(hub: HubEnv) -> None:
    assert hub.enroll(hub.token().token, "node_k", rsa_public_pem(4))[1]["address"] == "10.77.0.2"
    assert hub.enroll(hub.token().token, "other", rsa_public_pem(5))[0] == 200
    plain = hub.token().token
    status, answer = hub.enroll(plain, "node_k", rsa_public_pem(6))
    assert status == 409 and "--replace" in answer["error"]
    status, answer = hub.enroll(hub.token(name="node_k", replace=True).token, "node_k", rsa_public_pem(6))
    assert status == 200 and answer["address"] == "10.77.0.2"
    assert (hub.config.hosts_dir / "node_k").read_text().strip().endswith(rsa_public_pem(6).strip())
    # The refused token kept its use.
    assert hub.enroll(plain, "node_new", rsa_public_pem(7))[0] == 200


def test_bound_token_accepts_its_name(hub: HubEnv) -> None:
    assert hub.enroll(hub.token(name="web_1").token, "web_1", rsa_public_pem(4))[0] == 200


def test_revoked_node_gets_403_and_address_is_never_reused(hub: HubEnv) -> None:
    token = hub.token(uses=5).token
    assert hub.enroll(token, "gone", rsa_public_pem(4))[1]["address"] == "10.77.0.2"
    with hub.registry.exclusive(), hub.registry.transaction() as tx:
        tx.mark_revoked("gone", int(time.time()))
    assert hub.enroll(token, "gone", rsa_public_pem(4))[0] == 403
    assert hub.enroll(token, "next", rsa_public_pem(5))[1]["address"] == "10.77.0.3"
    with hub.registry.exclusive(), hub.registry.transaction() as tx:
        tx.delete_node("gone")  # what revoke --release does
    assert hub.enroll(token, "again", rsa_public_pem(6))[1]["address"] == "10.77.0.2"


def test_foreign_host_file_is_not_overwritten(hub: HubEnv) -> None:
    (hub.config.hosts_dir / "manual").write_text("Subnet = 10.77.0.99/32\n")
    status, answer = hub.enroll(hub.token().token, "manual", rsa_public_pem(4))
    assert status == 409, answer
    assert (hub.config.hosts_dir / "manual").read_text() == "Subnet = 10.77.0.99/32\n"


def test_subnet_full_is_clean_409(tmp_path) -> None:
    env = init_hub(tmp_path, vpn_subnet="10.88.0.0/29")  # hosts .1-.6, the hub has .1
    token = env.token(uses=10)
    got = [env.enroll(token.token, f"n{i}", rsa_public_pem(20 + i)) for i in range(5)]
    assert [a["address"] for _, a in got] == [f"10.88.0.{i}" for i in range(2, 7)]
    before = env.snapshot()
    status, answer = env.enroll(token.token, "n_full", rsa_public_pem(30))
    assert status == 409 and "full" in answer["error"]
    assert env.snapshot() == before  # no use spent, nothing allocated


# -- races ------------------------------------------------------------------------------------

def race(env: HubEnv, token: str, count: int) -> Dict[int, int]:
    keys = [rsa_public_pem(100 + i) for i in range(count)]  # generated before the start line
    barrier = threading.Barrier(count)
    statuses: Dict[int, int] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        # Half share the fixture's Registry object, half use their own (flock path only).
        registry = env.registry if i % 2 else Registry(env.state.registry_file, env.state.lock_file)
        enroller = Enroller(env.config, registry)
        barrier.wait(timeout=30)
        status, _ = enrol_answer(enroller, "Bearer " + token,
                                 json.dumps({"name": f"racer{i}", "public_key": keys[i]}).encode())
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return statuses


def test_one_off_token_raced_by_50_threads(hub: HubEnv) -> None:
    statuses = race(hub, hub.token(uses=1).token, 50)
    assert statuses == {200: 1, 401: 49}
    assert len([p for p in hub.config.hosts_dir.iterdir() if p.name.startswith("racer")]) == 1


def test_ten_use_token_raced_by_50_threads(hub: HubEnv) -> None:
    statuses = race(hub, hub.token(uses=10).token, 50)
    assert statuses == {200: 10, 401: 40}
    with hub.registry.reading() as view:
        nodes = view.list_nodes()
    addresses = [n.address for n in nodes]
    assert addresses == [f"10.77.0.{i}" for i in range(2, 12)]
    assert sorted(p.name for p in hub.config.hosts_dir.iterdir() if p.name != HUB_NAME) == \
        sorted(n.name for n in nodes)


# -- crash repair -----------------------------------------------------------------------------

def test_reconcile_rewrites_missing_and_removes_revoked(hub: HubEnv) -> None:
    token = hub.token(uses=3).token
    for i, name in enumerate(("keep", "lost", "revoked")):
        assert hub.enroll(token, name, rsa_public_pem(40 + i))[0] == 200
    keep_mtime = (hub.config.hosts_dir / "keep").stat().st_mtime_ns
    (hub.config.hosts_dir / "lost").unlink()  # as if the hub crashed after the commit
    with hub.registry.exclusive(), hub.registry.transaction() as tx:
        tx.mark_revoked("revoked", int(time.time()))
    (hub.config.hosts_dir / "stranger").write_text("Subnet = 10.77.0.200/32\n")
    assert reconcile_host_files(hub.config, hub.registry) == {"written": ["lost"], "removed": ["revoked"]}
    assert (hub.config.hosts_dir / "lost").read_text().startswith("Subnet = 10.77.0.3/32\n")
    assert not (hub.config.hosts_dir / "revoked").exists()
    assert (hub.config.hosts_dir / "keep").stat().st_mtime_ns == keep_mtime
    assert (hub.config.hosts_dir / "stranger").exists()
    assert reconcile_host_files(hub.config, hub.registry) == {"written": [], "removed": []}


def test_a_name_that_differs_only_in_case_is_refused(hub: HubEnv) -> None:
    """Bree and bree would both be bree.NET: a newcomer cannot take an enrolled node's name
    out of /etc/hosts by enrolling its twin; the refused token keeps its use."""
    assert hub.enroll(hub.token().token, "bree", rsa_public_pem(4))[0] == 200
    token = hub.token().token
    for twin in ("Bree", "BREE"):
        status, answer = hub.enroll(token, twin, rsa_public_pem(5))
        assert status == 409 and "differs only in case" in answer["error"], answer
    assert hub.enroll(token, "bree_2", rsa_public_pem(5))[0] == 200
    status, answer = hub.enroll(token, hub.config.name.upper(), rsa_public_pem(6))
    assert status == 400 and "own name" in answer["error"], answer   # the hub: checked before
