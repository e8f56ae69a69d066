"""Several hubs on one real PostgreSQL registry, the hub side (no tincd, no namespaces: the
end-to-end runs are in test_several_hubs.py): a second hub joins with only --registry, --name
and --address; host files and ConnectTo per viewing hub; the enrol answer's hubs and
credential; POST /v1/sync's refusals; tokens naming every hub; a change made on one hub
reaching the other's hosts/ through LISTEN/NOTIFY; `hubs` and `hub remove`."""

import json
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from bootstrap import bootstrap
from tinc_hub.cli import main
from tinc_hub.enroll import Enroller
from tinc_hub.node_sync import SyncHandler
from tinc_hub.registry import Registry
from tinc_hub.registry_follower import RegistryFollower, mirror_registry
from tinc_hub.state import StateDir
from tinc_hub.tls import pin_of_cert_file
from hub_fixtures import enrol_answer, rsa_public_pem, wait_until
from labkit import postgres

PASSWORD = "pw-" + uuid.uuid4().hex
SUBNET = "10.78.0.0/24"

pytestmark = pytest.mark.skipif(postgres.unavailable_reason() is not None,
                                reason=str(postgres.unavailable_reason()))


class Hub:
    """One hub's state and tinc dirs under a test directory, driven through the CLI."""

    def __init__(self, root: Path, name: str, address: str) -> None:
        self.root, self.name, self.address = root, name, address
        self.state = StateDir(root / "state")

    def cli(self, capsys, *argv: str) -> Tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--state-dir", str(self.state.root)] + list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    def init(self, capsys, url: str, password_file: Path, *extra: str) -> Tuple[int, str, str]:
        return self.cli(capsys, "init", "--no-start", "--name", self.name, "--address", self.address,
                        "--tinc-dir", str(self.root / "tinc"), "--init", "none", "--key-size", "2048",
                        "--registry", url, "--registry-password-file", str(password_file), *extra)

    @property
    def config(self):
        return self.state.load_config()

    def registry(self) -> Registry:
        return Registry.for_state(self.state, keep_connections=True)

    def file(self, relative: str) -> str:
        return (self.config.net_dir / relative).read_text()


@pytest.fixture
def net(pg: postgres.ThrowawayPostgres, tmp_path: Path, capsys) -> Iterator[Dict]:
    """erebor (first hub: --net and --vpn-subnet) and rivendell (joins with the registry only)."""
    name = "roster_" + uuid.uuid4().hex[:10]
    url = pg.create_database(name, user="hub", password=PASSWORD)
    password_file = tmp_path / "pgpassword"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    erebor = Hub(tmp_path / "erebor", "erebor", "192.0.2.1")
    code, out, err = erebor.init(capsys, url, password_file, "--net", "pgnet", "--vpn-subnet", SUBNET)
    assert code == 0, err
    rivendell = Hub(tmp_path / "rivendell", "rivendell", "192.0.2.2")
    code, out, err = rivendell.init(capsys, url, password_file)
    assert code == 0, err
    yield {"url": url, "password_file": password_file, "erebor": erebor, "rivendell": rivendell,
           "joined_output": out}
    pg.drop_database(name)


def weights(host_file: str) -> List[str]:
    return [line for line in host_file.splitlines() if line.startswith("Subnet = ")]


def test_a_second_hub_joins_with_registry_name_and_address(net: Dict, capsys) -> None:
    erebor, rivendell = net["erebor"], net["rivendell"]
    assert "hub 'rivendell' of net 'pgnet': VPN 10.78.0.0/24, hub address 10.78.0.2" in net["joined_output"]
    config = rivendell.config
    assert (config.net, config.vpn_subnet, config.hub_address) == ("pgnet", SUBNET, "10.78.0.2")
    assert config.registry == net["url"] and PASSWORD not in rivendell.state.config_file.read_text()
    # its files as it sees the net: a ConnectTo erebor, keepalives, the relay weights
    assert "ConnectTo" not in rivendell.file("tinc.conf")  # init's file; the API keeps conf.d/
    conf = rivendell.file("conf.d/hubs.conf")
    assert "ConnectTo = erebor\n" in conf and "PingInterval = 5\n" in conf and "PingTimeout = 3\n" in conf
    # no 0.0.0.0/0 claim: nothing is exposed (tests/test_expose*.py)
    assert weights(rivendell.file("hosts/rivendell")) == ["Subnet = 10.78.0.2/32", f"Subnet = {SUBNET}#20"]
    assert weights(rivendell.file("hosts/erebor")) == ["Subnet = 10.78.0.1/32", f"Subnet = {SUBNET}#10"]
    assert "Address = 192.0.2.1\nPort = 655\n" in rivendell.file("hosts/erebor")
    assert "10.78.0.2/24" in rivendell.file("tinc-up")

    code, out, _ = rivendell.cli(capsys, "hubs", "--json")
    hubs = {h["name"]: h for h in json.loads(out)}
    assert code == 0 and set(hubs) == {"erebor", "rivendell"}
    assert hubs["erebor"]["pin"] == pin_of_cert_file(erebor.state.cert_file)
    assert hubs["rivendell"]["pin"] == pin_of_cert_file(rivendell.state.cert_file)
    assert (hubs["rivendell"]["address"], hubs["rivendell"]["public_address"]) == ("10.78.0.2", "192.0.2.2")
    assert hubs["erebor"]["pin"] != hubs["rivendell"]["pin"]

    # re-running the join changes nothing; erebor learns of rivendell by following the registry
    before = {p: p.stat().st_mtime_ns for p in (rivendell.root / "tinc").rglob("*") if p.is_file()}
    code, out, err = rivendell.init(capsys, net["url"], net["password_file"])
    assert code == 0 and "changed: nothing" in out, err
    assert {p: p.stat().st_mtime_ns for p in (rivendell.root / "tinc").rglob("*") if p.is_file()} == before
    assert not (erebor.config.net_dir / "conf.d/hubs.conf").exists()
    done = mirror_registry(erebor.config, erebor.registry())
    assert sorted(done["written"]) == ["conf.d/hubs.conf", "erebor", "rivendell"] and not done["removed"]
    assert "ConnectTo = rivendell\n" in erebor.file("conf.d/hubs.conf")
    assert weights(erebor.file("hosts/erebor"))[1] == f"Subnet = {SUBNET}#20"
    assert weights(erebor.file("hosts/rivendell"))[1] == f"Subnet = {SUBNET}#10"
    assert mirror_registry(erebor.config, erebor.registry()) == {"written": [], "removed": []}


def test_a_hub_of_another_net_or_subnet_is_refused(net: Dict, tmp_path: Path, capsys) -> None:
    other = Hub(tmp_path / "other", "moria", "192.0.2.3")
    code, _, err = other.init(capsys, net["url"], net["password_file"], "--net", "othernet")
    assert code == 1 and "belongs to net 'pgnet'" in err and err.count("\n") == 1
    code, _, err = other.init(capsys, net["url"], net["password_file"], "--vpn-subnet", "10.99.0.0/24")
    assert code == 1 and "belongs to net 'pgnet' with VPN 10.78.0.0/24" in err
    # a dry run of a joining hub names the address it would take and records nothing
    code, out, err = other.init(capsys, net["url"], net["password_file"], "--dry-run")
    assert code == 0 and "the lowest free VPN address (now 10.78.0.3)" in out, err
    with net["erebor"].registry().reading() as view:
        assert [h.name for h in view.list_hubs()] == ["erebor", "rivendell"]


def enrol(enroller: Enroller, token: str, name: str, key: str, credential=None) -> Tuple[int, dict]:
    fields = {"name": name, "public_key": key}
    if credential:
        fields["credential"] = credential
    return enrol_answer(enroller, "Bearer " + token, json.dumps(fields).encode())


def token_of(hub: Hub, capsys, *extra: str) -> str:
    code, out, err = hub.cli(capsys, "token", "create", "--json", *extra)
    assert code == 0, err
    return json.loads(out)["token"]


def test_answers_name_every_hub_and_sync_checks_the_credential(net: Dict, capsys) -> None:
    erebor, rivendell = net["erebor"], net["rivendell"]
    token = token_of(rivendell, capsys, "--uses", "3")
    decoded = bootstrap.decode_token(token)
    assert decoded.hub == "rivendell" and [h.name for h in decoded.others] == ["erebor"]
    assert decoded.others[0] == bootstrap.HubEndpoint("192.0.2.1", 8655, pin_of_cert_file(erebor.state.cert_file),
                                                      "erebor")

    enroller = Enroller(rivendell.config, rivendell.registry())
    status, answer = enrol(enroller, token, "bree", rsa_public_pem(1))
    assert status == 200 and answer["address"] == "10.78.0.3"  # after both hubs' addresses
    assert [h["name"] for h in answer["hubs"]] == ["rivendell", "erebor"]  # the answering hub first
    for hub in answer["hubs"]:  # what nodes keep: no weight, accepted by the node as it is
        assert bootstrap.rebuild_hub_host_file(hub["host_file"]) == hub["host_file"]
        assert "#" not in hub["host_file"]
    assert answer["hub"]["host_file"] == answer["hubs"][0]["host_file"]
    assert bootstrap.validate_answer(answer, "bree")[:3] == ("10.78.0.3", 24, "rivendell")
    credential = answer["credential"]
    assert len(credential) == 64 and credential not in json.dumps(_registry_rows(rivendell))

    # a node may not take a hub's name; a hub is not a node to revoke
    assert enrol(enroller, token, "erebor", rsa_public_pem(2))[0] == 409
    code, _, err = rivendell.cli(capsys, "revoke", "erebor")
    assert code == 1 and "is a hub" in err

    # sync, asked of the OTHER hub: the same hubs, that hub first
    sync = SyncHandler(erebor.config, erebor.registry())
    ok = sync.process(json.dumps({"name": "bree", "credential": credential}).encode(), "192.0.2.9")
    assert ok.status == 200 and ok.body["address"] == "10.78.0.3" and ok.body["prefix"] == 24
    assert [h["name"] for h in ok.body["hubs"]] == ["erebor", "rivendell"] and ok.body["interval"] > 0
    wrong = sync.process(json.dumps({"name": "bree", "credential": "0" * 64}).encode())
    unknown = sync.process(json.dumps({"name": "nobody", "credential": credential}).encode())
    assert wrong.status == unknown.status == 401 and wrong.body == unknown.body  # no name oracle
    for bad in (b"", b"[]", b'{"name": "bree"}', json.dumps({"name": "bree", "credential": credential.upper()}).encode(),
                json.dumps({"name": "a b", "credential": credential}).encode(), b"{" * 5000):
        assert sync.process(bad).status in (400, 413), bad
    # a replay with the credential gets none back, nor one with the shared token without it;
    # with a token bound to the name a new one, and the old is void
    status, again = enrol(enroller, token, "bree", rsa_public_pem(1), credential)
    assert status == 200 and "credential" not in again
    status, again = enrol(enroller, token, "bree", rsa_public_pem(1))
    assert status == 200 and "credential" not in again
    status, renewed = enrol(enroller, token_of(erebor, capsys, "--name", "bree"), "bree", rsa_public_pem(1))
    assert sync.process(json.dumps({"name": "bree", "credential": credential}).encode()).status == 401
    assert sync.process(json.dumps({"name": "bree", "credential": renewed["credential"]}).encode()).status == 200

    code, _, err = rivendell.cli(capsys, "revoke", "bree")
    assert code == 0, err
    revoked = sync.process(json.dumps({"name": "bree", "credential": renewed["credential"]}).encode())
    assert revoked.status == 403 and "revoked" in revoked.body["error"]


def _registry_rows(hub: Hub) -> List[str]:
    with hub.registry().reading() as view:
        return [repr(n) for n in view.list_nodes()]


def test_a_change_on_one_hub_reaches_the_other_within_5_s_by_notify(net: Dict, capsys) -> None:
    erebor, rivendell = net["erebor"], net["rivendell"]
    sighups: List[float] = []
    follower = RegistryFollower(erebor.config, erebor.registry(), lambda: sighups.append(time.monotonic()) or True,
                                poll_interval=60)  # only a notification can make it quick
    follower.catch_up()
    follower.start()
    try:
        time.sleep(0.5)  # the listener is up (LISTEN runs when the first wait starts)
        enroller = Enroller(rivendell.config, rivendell.registry())
        started = time.monotonic()
        assert enrol(enroller, token_of(rivendell, capsys), "hobbiton", rsa_public_pem(3))[0] == 200
        path = erebor.config.hosts_dir / "hobbiton"
        deadline = started + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        arrived = time.monotonic() - started
        assert path.exists(), "the enrolment on rivendell did not reach erebor's hosts/ within 5 s"
        with capsys.disabled():
            print(f"\nenrolment on rivendell -> erebor's hosts/: {arrived:.2f} s")
        assert path.read_text().startswith("Subnet = 10.78.0.3/32\n")
        # the SIGHUP follows the last file of the round: wait for it (bounded)
        assert wait_until(lambda: bool(sighups) and sighups[-1] >= started, 5), sighups
        # revoked on rivendell: gone from erebor's hosts/ as quickly
        started = time.monotonic()
        assert rivendell.cli(capsys, "revoke", "hobbiton")[0] == 0
        while path.exists() and time.monotonic() < started + 5:
            time.sleep(0.05)
        assert not path.exists(), "the revocation on rivendell did not reach erebor within 5 s"
        with capsys.disabled():
            print(f"\nrevocation on rivendell -> erebor's hosts/: {time.monotonic() - started:.2f} s")
    finally:
        follower.stop()


def test_hub_remove_retires_a_hub_everywhere(net: Dict, capsys) -> None:
    erebor, rivendell = net["erebor"], net["rivendell"]
    mirror_registry(erebor.config, erebor.registry())
    code, _, err = rivendell.cli(capsys, "hub", "remove", "rivendell")
    assert code == 1 and "is this hub" in err
    code, _, err = rivendell.cli(capsys, "hub", "remove", "nowhere")
    assert code == 1 and "no hub named" in err
    code, out, err = rivendell.cli(capsys, "hub", "remove", "erebor")
    assert code == 0 and "hub erebor (10.78.0.1, 192.0.2.1) removed" in out, err
    code, out, _ = rivendell.cli(capsys, "hubs", "--json")
    assert {h["name"]: h["removed"] for h in json.loads(out)} == {"erebor": True, "rivendell": False}
    assert rivendell.cli(capsys, "hub", "remove", "erebor")[2].count("already removed") == 1
    # rivendell alone again: no ConnectTo, no weights, erebor's file gone
    done = mirror_registry(rivendell.config, rivendell.registry())
    assert done["removed"] == ["erebor", "conf.d/hubs.conf"]
    assert not (rivendell.config.net_dir / "conf.d/hubs.conf").exists()
    assert weights(rivendell.file("hosts/rivendell"))[1] == f"Subnet = {SUBNET}"
    assert not (rivendell.config.hosts_dir / "erebor").exists()
    # the last hub cannot be removed; a token names no removed hub; nodes never get erebor
    code, _, err = erebor.cli(capsys, "hub", "remove", "rivendell")
    assert code == 1 and "last hub" in err
    assert bootstrap.decode_token(token_of(rivendell, capsys)).others == ()
    status, answer = enrol(Enroller(rivendell.config, rivendell.registry()), token_of(rivendell, capsys),
                           "shire", rsa_public_pem(4))
    assert status == 200 and [h["name"] for h in answer["hubs"]] == ["rivendell"]
    # its name and address stay taken
    assert answer["address"] == "10.78.0.3"
    assert enrol(Enroller(rivendell.config, rivendell.registry()), token_of(rivendell, capsys),
                 "erebor", rsa_public_pem(5))[0] == 409


def test_a_hub_may_move_when_another_hub_can_tell_the_nodes(net: Dict, capsys) -> None:
    erebor, rivendell = net["erebor"], net["rivendell"]
    enroller = Enroller(rivendell.config, rivendell.registry())
    status, answer = enrol(enroller, token_of(rivendell, capsys), "bree", rsa_public_pem(6))
    assert status == 200
    code, out, err = rivendell.init(capsys, net["url"], net["password_file"], "--address", "198.51.100.7")
    assert code == 0 and "follow the new address and port by themselves" in out, err
    assert rivendell.config.address == "198.51.100.7"
    mirror_registry(erebor.config, erebor.registry())
    assert "Address = 198.51.100.7\n" in erebor.file("hosts/rivendell")
    synced = SyncHandler(erebor.config, erebor.registry()).process(
        json.dumps({"name": "bree", "credential": answer["credential"]}).encode())
    moved = {h["name"]: h for h in synced.body["hubs"]}["rivendell"]
    assert moved["api"]["host"] == "198.51.100.7" and "Address = 198.51.100.7\n" in moved["host_file"]
    assert moved["api"]["pin"] == pin_of_cert_file(rivendell.state.cert_file)  # same TLS key


def test_a_second_machine_with_a_hubs_name_cannot_take_its_place(net: Dict, tmp_path: Path, capsys) -> None:
    impostor = Hub(tmp_path / "impostor", "erebor", "192.0.2.66")
    code, _, err = impostor.init(capsys, net["url"], net["password_file"])
    assert code == 1 and "recorded" in err and "with another tinc key" in err, err
    with net["erebor"].registry().reading() as view:
        assert {h.name: h.public_address for h in view.list_hubs()} == {"erebor": "192.0.2.1",
                                                                      "rivendell": "192.0.2.2"}


def test_an_unsound_hub_row_never_reaches_a_tinc_file_or_a_node(net: Dict, capsys) -> None:
    """The registry is shared: a row written by hand (or by a broken hub) with a newline in its
    public address would add lines to every hub's host file. It is left out, with a warning."""
    erebor = net["erebor"]
    registry = erebor.registry()
    with registry.exclusive(), registry.transaction() as tx:
        tx._db.driver.execute("UPDATE hubs SET public_address = %s WHERE name = 'rivendell'",
                              ("192.0.2.2\nSubnet = 203.0.113.0/24",))
    done = mirror_registry(erebor.config, registry)
    assert "rivendell" not in done["written"] and not (erebor.config.hosts_dir / "rivendell").exists()
    assert not (erebor.config.net_dir / "conf.d/hubs.conf").exists()
    assert "203.0.113.0/24" not in erebor.file("hosts/erebor")
    assert bootstrap.decode_token(token_of(erebor, capsys)).others == ()
    status, answer = enrol(Enroller(erebor.config, registry), token_of(erebor, capsys), "bree", rsa_public_pem(7))
    assert status == 200 and [h["name"] for h in answer["hubs"]] == ["erebor"]
    assert bootstrap.validate_answer(answer, "bree")


def test_a_hostile_registry_row_never_writes_or_removes_outside_hosts(net: Dict, capsys) -> None:
    """A node row named like a path (written into the shared registry by anyone but a hub,
    which checks every name) is left out: nothing is written or removed outside hosts/."""
    erebor = net["erebor"]
    registry = erebor.registry()
    victim = erebor.config.net_dir / "tinc-up"
    before = victim.read_bytes()
    with registry.exclusive(), registry.transaction() as tx:
        for i, (name, revoked) in enumerate((("../tinc-up", None), ("../../escape", None),
                                             ("../tinc-down", 1))):
            tx._db.driver.execute(
                "INSERT INTO nodes (name, address, address_int, public_key, token_sha256, enrolled_at,"
                " updated_at, revoked_at, kind) VALUES (%s, %s, %s, %s, '', 0, 0, %s, 'node')",
                (name, f"10.78.0.{50 + i}", 172883456 + 50 + i, rsa_public_pem(30 + i), revoked))
    done = mirror_registry(erebor.config, registry)
    assert not any(".." in name for name in done["written"] + done["removed"]), done
    assert victim.read_bytes() == before and (erebor.config.net_dir / "tinc-down").exists()
    assert not (erebor.config.net_dir.parent / "escape").exists()


def test_the_sync_interval_a_hub_answers_is_its_serve_setting_within_the_nodes_bounds(net: Dict, capsys) -> None:
    rivendell = net["rivendell"]
    status, answer = enrol(Enroller(rivendell.config, rivendell.registry()),
                           token_of(rivendell, capsys), "lake", rsa_public_pem(9))
    assert status == 200
    request = json.dumps({"name": "lake", "credential": answer["credential"]}).encode()
    for interval in (10, 45, 3600):
        synced = SyncHandler(rivendell.config, rivendell.registry(), interval).process(request)
        assert synced.status == 200 and synced.body["interval"] == interval
    assert SyncHandler(rivendell.config, rivendell.registry()).process(request).body["interval"] == 30
    for wrong in (9, 3601):  # what the node would clamp is refused at the hub's start instead
        with pytest.raises(ValueError):
            SyncHandler(rivendell.config, rivendell.registry(), wrong)
        assert main(["serve", "--sync-interval", str(wrong)]) == 2  # and by serve's command line
        assert "--sync-interval" in capsys.readouterr().err
