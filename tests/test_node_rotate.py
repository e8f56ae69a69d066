"""Node key rotation (issue 13): `bootstrap.py rotate-key` and `POST /v1/rotate-key`.

First the hub's handler on a real registry and hosts/ (no sockets), then the real thing in
network namespaces (labkit.netlab): a real hub (`tinc-hub init` + `serve`), real tincd, the
node script run as root; the ping gap from another node measured at 0.2 s intervals; a
tincd holding the old key refused; a lost answer; refusals; Python 3.6; and with two hubs on
one PostgreSQL registry (labkit.multihub), the other hub following.
"""

import json
import re
import time

import pytest

from hub_fixtures import HubEnv, hub, rsa_public_pem  # noqa: F401 (the hub fixture)
from support import bootstrap
from tinc_hub.node_rotate import RotateKeyHandler
from tinc_hub.registry_follower import read_public_key
from tinc_hub.roster import hub_row, register_hub
from tinc_hub.tls import pin_of_cert_file


# =========================================================================================
# The hub's handler (pure: a real SQLite registry and hosts/ in a temp dir)

def enrolled(hub: HubEnv, name: str, index: int) -> str:
    """Enrol `name` with key `index`; its credential."""
    status, answer = hub.enroll(hub.token().token, name, rsa_public_pem(index))
    assert status == 200, answer
    return answer["credential"]


def rotate(hub: HubEnv, body) -> "tuple[int, dict, bool]":
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    outcome = RotateKeyHandler(hub.config, hub.registry).process(raw, "192.0.2.9")
    return outcome.status, outcome.body, outcome.reload_needed


def host_key(hub: HubEnv, name: str) -> str:
    return bootstrap.public_key_block((hub.config.hosts_dir / name).read_text())


def test_rotation_replaces_the_key_in_registry_and_host_file_and_a_replay_changes_nothing(
        hub: HubEnv, caplog) -> None:
    credential = enrolled(hub, "shire", 201)
    caplog.set_level("INFO", logger="tinc_hub.audit")
    new = rsa_public_pem(202, fmt="spki")  # SPKI is accepted and kept as PKCS#1
    status, answer, reload_needed = rotate(hub, {"name": "shire", "credential": credential,
                                                 "public_key": new})
    assert status == 200 and reload_needed, answer
    assert answer == {"net": hub.config.net, "name": "shire", "address": "10.77.0.2",
                      "prefix": 24, "rotated": True}
    assert host_key(hub, "shire") == rsa_public_pem(202).strip()
    with hub.registry.snapshot() as view:
        node = view.get_node("shire")
        assert node.public_key == rsa_public_pem(202) and node.address == "10.77.0.2"
    assert "rotate-key result=rotated status=200 name=shire client=192.0.2.9" in caplog.text
    before = hub.snapshot()
    for key in (new, rsa_public_pem(202)):  # the same key again, in either form
        status, answer, reload_needed = rotate(hub, {"name": "shire", "credential": credential,
                                                     "public_key": key})
        assert (status, answer["rotated"], reload_needed) == (200, False, False)
    assert hub.snapshot() == before  # registry rows, host files: bytes and mtimes
    assert "rotate-key result=replay" in caplog.text
    # the sync credential and the enrolment's token stay the node's
    status, answer = hub.enroll(hub.token().token, "shire", rsa_public_pem(201))
    assert status == 409  # the old key cannot come back through an enrolment either


def test_a_replay_whose_host_file_was_lost_writes_it_again(hub: HubEnv) -> None:
    credential = enrolled(hub, "shire", 203)
    body = {"name": "shire", "credential": credential, "public_key": rsa_public_pem(204)}
    assert rotate(hub, body)[0] == 200
    (hub.config.hosts_dir / "shire").unlink()
    status, answer, reload_needed = rotate(hub, body)
    assert (status, answer["rotated"], reload_needed) == (200, False, True)
    assert host_key(hub, "shire") == rsa_public_pem(204).strip()


def test_refusals_change_nothing(hub: HubEnv, caplog) -> None:
    credential = enrolled(hub, "shire", 205)
    enrolled(hub, "bree", 206)
    # the hub as serve records it at start (a row of nodes, kind hub, with its key)
    register_hub(hub.registry, hub_row(hub.config, read_public_key(hub.config.net_dir),
                                       pin_of_cert_file(hub.state.cert_file)),
                 hub.config.net, hub.config.vpn_subnet)
    hub_key = bootstrap.public_key_block(hub.config.hub_host_file.read_text())
    caplog.set_level("INFO", logger="tinc_hub.audit")
    before = hub.snapshot()
    good = {"name": "shire", "credential": credential, "public_key": rsa_public_pem(207)}
    unknown = ("unknown node name or wrong credential (re-run the one-liner with a token to get"
               " a new credential)")
    cases = [
        (dict(good, credential="0" * 64), 401, unknown),
        (dict(good, name="nobody"), 401, unknown),  # the same answer: no oracle of names
        (dict(good, name=hub.config.name), 401, unknown),
        (dict(good, public_key=rsa_public_pem(206)), 409, "another node or hub"),  # bree's
        (dict(good, public_key=hub_key), 409, "another node or hub"),
        (dict(good, public_key=rsa_public_pem(208, bits=1024)), 400, "too small"),
        (dict(good, public_key=rsa_public_pem(207) + rsa_public_pem(208)), 400, "one PEM block"),
        (dict(good, public_key="Subnet = 0.0.0.0/0\n" + rsa_public_pem(207)), 400, "nothing else"),
        (dict(good, credential=credential.upper()), 400, "64 lowercase hex"),
        (dict(good, name="../shire"), 400, "node name"),
        ({"name": "shire", "credential": credential}, 400, "public_key"),
        (b"[]", 400, "JSON object"), (b"\xff", 400, "JSON object"),
        (b"{" * 20000, 413, "larger than"),
    ]
    for body, status, words in cases:
        got, answer, reload_needed = rotate(hub, body)
        assert (got, reload_needed) == (status, False) and words in answer["error"], (body, answer)
    assert hub.snapshot() == before
    assert "rotate-key result=refused status=401 name=nobody" in caplog.text
    with hub.registry.exclusive(), hub.registry.transaction() as tx:
        tx.mark_revoked("shire", int(time.time()))
    status, answer, _ = rotate(hub, good)
    assert status == 403 and "revoked" in answer["error"]
    assert rotate(hub, dict(good, credential="0" * 64))[0] == 401  # no oracle of revocations


def test_rsa_modulus_bits_reads_both_pem_forms_strictly() -> None:
    assert bootstrap.rsa_modulus_bits(rsa_public_pem(201)) == 2048
    assert bootstrap.rsa_modulus_bits(rsa_public_pem(201, fmt="spki")) == 2048
    for bad in ("", "junk", rsa_public_pem(201).replace("MII", "MI!"), rsa_public_pem(201) * 2):
        with pytest.raises(ValueError):
            bootstrap.rsa_modulus_bits(bad)
