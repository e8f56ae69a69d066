"""NAME.NET of every hub and node (issue 12): the `names` of the hub's answers, checked by the
node, and the managed block of /etc/hosts that bootstrap.py writes on nodes and hubs.

First the pure parts against hostile input (hypothesis), then the writer on real files (mode,
owner, symlink, a bind-mounted file where rename fails), then the hub's answers from a real
registry. The namespaces test (getent, ping, a join and a revocation) is test_names_netlab.py.
"""

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub_fixtures import hub, rsa_public_pem  # noqa: F401 (hub: a fixture)
from support import bootstrap
from tinc_hub.cli import main as hub_main
from tinc_hub.names import MAX_NAMES_BYTES, sendable, vpn_names
from tinc_hub.node_sync import SyncHandler

ADDRESS, PREFIX = "10.0.0.5", 24
NET = "middle-earth"
# every line the block may hold: a canonical IPv4 address, one space, one host name
BLOCK_LINE_RE = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                           r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]) "
                           r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.middle-earth")


def refused(value) -> str:
    with pytest.raises(ValueError) as err:
        bootstrap.validate_names(value, ADDRESS, PREFIX)
    return str(err.value)


# --------------------------------------------------------------------------- validate_names

def test_names_accepted():
    names = {"erebor": "10.0.0.1", "bree": "10.0.0.3", "Hob_biton": "10.0.0.254"}
    assert bootstrap.validate_names(names, ADDRESS, PREFIX) == names
    assert bootstrap.validate_names({}, ADDRESS, PREFIX) == {}


@pytest.mark.parametrize("value, why", [
    (None, "an object"), ([], "an object"), ("bree", "an object"), ([["bree", "10.0.0.3"]], "an object"),
    ({"bree\n10.0.0.9": "10.0.0.3"}, "not a tinc name"),
    ({"bree evil": "10.0.0.3"}, "not a tinc name"),
    ({"bree.evil": "10.0.0.3"}, "not a tinc name"),
    ({"": "10.0.0.3"}, "not a tinc name"),
    ({"a" * 65: "10.0.0.3"}, "not a tinc name"),
    ({"b\u00e9e": "10.0.0.3"}, "not a tinc name"),
    ({"bree": "10.0.0.3 evil.example"}, "not a host address"),
    ({"bree": "10.0.0.3\n1.2.3.4 bank.example"}, "not a host address"),
    ({"bree": "10.0.0.03"}, "not a host address"),
    ({"bree": "10.0.1.3"}, "not a host address"),  # outside 10.0.0.0/24
    ({"bree": "192.0.2.1"}, "not a host address"),
    ({"bree": "10.0.0.0"}, "not a host address"),
    ({"bree": "10.0.0.255"}, "not a host address"),
    ({"bree": "::1"}, "not a host address"),
    ({"bree": 167772163}, "not a host address"),
    ({"bree": None}, "not a host address"),
    ({"bree": ["10.0.0.3"]}, "not a host address"),
    ({"bree": "10.0.0.3", "dale": "10.0.0.3"}, "listed twice"),
    ({"n%d" % i: "10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255) for i in range(1, 16386)},
     "at most 16384"),
])
def test_hostile_names_are_refused(value, why):
    assert why in refused(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.sampled_from(["10.0.0.3", "10.0.0.9", "10.0.1.1", " 10.0.0.4", "10.0.0.4\n"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["bree", "Bree", "dale_1", "a b", "x\n"]) | st.text(max_size=6),
        inner, max_size=6),
    max_leaves=25)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_any_json_is_names_or_a_value_error_and_names_make_only_block_lines(value):
    try:
        names = bootstrap.validate_names(value, ADDRESS, PREFIX)
    except ValueError:
        return
    entries, _ = bootstrap.hosts_entries(names, NET)
    block = bootstrap.render_hosts_block(NET, entries)
    lines = block.splitlines()
    assert all(BLOCK_LINE_RE.fullmatch(line) for line in lines[1:-1]), block
    for address, _fqdn in entries:
        assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("10.0.0.0/24")


# --------------------------------------------------------------------------- DNS names

def test_dns_names_are_lower_case_with_dashes_and_collisions_are_left_out():
    names = {"erebor": "10.0.0.1", "Hob_biton": "10.0.0.2", "bree": "10.0.0.3", "Bree": "10.0.0.4",
             "_edge": "10.0.0.5", "edge_": "10.0.0.6", "dale": "10.0.0.7"}
    entries, problems = bootstrap.hosts_entries(names, "Middle_Earth")
    assert entries == [("10.0.0.1", "erebor.middle-earth"), ("10.0.0.2", "hob-biton.middle-earth"),
                       ("10.0.0.7", "dale.middle-earth")]
    assert any("Bree, bree" in p and "bree.middle-earth" in p for p in problems), problems
    assert any("'_edge'" in p for p in problems) and any("'edge_'" in p for p in problems)


@pytest.mark.parametrize("net", ["42", "1.2", "a..b", "-x", "x-", "_x", "a." * 127 + "a"])
def test_a_net_that_is_no_dns_name_gives_no_entries(net):
    entries, problems = bootstrap.hosts_entries({"bree": "10.0.0.3"}, net)
    assert entries == [] and "no DNS name" in problems[0]


def test_a_dotted_net_is_a_dotted_domain():
    entries, _ = bootstrap.hosts_entries({"bree": "10.0.0.3"}, "vpn.Example")
    assert entries == [("10.0.0.3", "bree.vpn.example")]


# --------------------------------------------------------------------------- the block

ENTRIES = [("10.0.0.1", "erebor.middle-earth"), ("10.0.0.3", "bree.middle-earth")]
BLOCK = ("# BEGIN tinc-bootstrap middle-earth (managed by bootstrap.py; do not edit)\n"
         "10.0.0.1 erebor.middle-earth\n10.0.0.3 bree.middle-earth\n"
         "# END tinc-bootstrap middle-earth\n")


def test_the_block_is_appended_replaced_in_place_and_removed():
    original = "127.0.0.1 localhost\n::1 localhost\n"
    added = bootstrap.replace_hosts_block(original, NET, BLOCK)
    assert added == original + BLOCK
    moved = added + "192.0.2.7 after\n"
    fewer = bootstrap.render_hosts_block(NET, ENTRIES[:1])
    assert bootstrap.replace_hosts_block(moved, NET, fewer) == original + fewer + "192.0.2.7 after\n"
    assert bootstrap.replace_hosts_block(moved, NET, "") == original + "192.0.2.7 after\n"
    assert bootstrap.replace_hosts_block(added, NET, "") == original
    assert bootstrap.replace_hosts_block("x", NET, BLOCK) == "x\n" + BLOCK  # no final newline
    assert bootstrap.replace_hosts_block(original, NET, "") == original
    assert bootstrap.replace_hosts_block(BLOCK, NET, BLOCK) == BLOCK
    other = BLOCK.replace("middle-earth", "shire")  # another net's block is not ours
    assert bootstrap.replace_hosts_block(other, NET, BLOCK) == other + BLOCK


@pytest.mark.parametrize("damaged", [
    BLOCK.splitlines(True)[0],  # BEGIN without END
    "".join(BLOCK.splitlines(True)[1:]),  # END without BEGIN
    BLOCK + BLOCK,
    "".join(reversed(BLOCK.splitlines(True))),
])
def test_damaged_markers_are_refused_not_guessed(damaged):
    with pytest.raises(ValueError, match="damaged"):
        bootstrap.replace_hosts_block("127.0.0.1 localhost\n" + damaged, NET, BLOCK)


outside_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200).filter(
    lambda t: "tinc-bootstrap" not in t)


@settings(max_examples=300, deadline=None)
@given(before=outside_text, after=outside_text, count=st.integers(0, 3))
def test_lines_outside_the_block_stay_byte_identical(before, after, count):
    text = bootstrap.replace_hosts_block(before, NET, BLOCK) + after
    block = bootstrap.render_hosts_block(NET, ENTRIES[:count])
    new = bootstrap.replace_hosts_block(text, NET, block)
    start = new.find("# BEGIN tinc-bootstrap")
    if block:
        assert new[start:start + len(block)] == block
        rest = new[:start] + new[start + len(block):]
    else:
        rest = new
    assert rest == text.replace(BLOCK, "")
    assert bootstrap.replace_hosts_block(new, NET, block) == new  # idempotent


# --------------------------------------------------------------------------- writing the file

def test_the_file_keeps_mode_owner_and_is_untouched_when_unchanged(tmp_path: Path):
    hosts = tmp_path / "hosts"
    hosts.write_bytes(b"127.0.0.1 localhost\n# caf\xe9 latin-1 comment\n")
    os.chmod(hosts, 0o640)
    if os.geteuid() == 0:
        os.chown(hosts, 1234, 5678)
    assert bootstrap.update_hosts_block(NET, ENTRIES, str(hosts)) is True
    assert hosts.read_bytes() == b"127.0.0.1 localhost\n# caf\xe9 latin-1 comment\n" + BLOCK.encode()
    st_ = hosts.stat()
    assert st_.st_mode & 0o7777 == 0o640
    if os.geteuid() == 0:
        assert (st_.st_uid, st_.st_gid) == (1234, 5678)
    assert bootstrap.update_hosts_block(NET, ENTRIES, str(hosts)) is False
    assert hosts.stat().st_ino == st_.st_ino and hosts.stat().st_mtime_ns == st_.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["hosts"]  # no temp file left
    assert bootstrap.update_hosts_block(NET, [], str(hosts)) is True
    assert hosts.read_bytes() == b"127.0.0.1 localhost\n# caf\xe9 latin-1 comment\n"


def test_a_symlinked_hosts_file_stays_a_symlink(tmp_path: Path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "hosts"
    target.write_text("127.0.0.1 localhost\n")
    link = tmp_path / "hosts"
    link.symlink_to(target)
    assert bootstrap.update_hosts_block(NET, ENTRIES, str(link)) is True
    assert link.is_symlink() and target.read_text() == "127.0.0.1 localhost\n" + BLOCK


def test_a_damaged_block_is_a_problem_and_nothing_is_written(tmp_path: Path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + BLOCK.splitlines(True)[0])
    before = hosts.read_bytes()
    changed, problems = bootstrap.apply_names(NET, NET, {"bree": "10.0.0.3"}, str(hosts))
    assert changed is None and "damaged" in problems[-1]
    assert hosts.read_bytes() == before


_BIND_SCRIPT = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from bootstrap import bootstrap
mount_dir, source = sys.argv[2], sys.argv[3]
subprocess.run(["mount", "--bind", source, mount_dir + "/hosts"], check=True)
inode = os.stat(mount_dir + "/hosts").st_ino
assert bootstrap.update_hosts_block("middle-earth", [("10.0.0.3", "bree.middle-earth")],
                                    mount_dir + "/hosts") is True
assert os.stat(mount_dir + "/hosts").st_ino == inode, "not rewritten in place"
assert sorted(os.listdir(mount_dir)) == ["hosts"], os.listdir(mount_dir)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root (a private mount namespace)")
def test_a_bind_mounted_hosts_file_is_rewritten_in_place(tmp_path: Path):
    """As /etc/hosts in a container (docker, nspawn): rename over it fails with EBUSY."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("")
    source = tmp_path / "outside-hosts"
    source.write_text("127.0.0.1 localhost\n")
    repo = str(Path(bootstrap.__file__).parent.parent)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                           _BIND_SCRIPT, repo, str(tmp_path / "etc"), str(source)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert source.read_text() == "127.0.0.1 localhost\n" + bootstrap.render_hosts_block(
        NET, [("10.0.0.3", "bree.middle-earth")])


# --------------------------------------------------------------------------- the hub's answers

def test_the_hub_sends_names_of_hubs_and_live_nodes_and_only_when_they_changed(hub):
    """Enrolment answers carry every name (the new node's too); a sync answer leaves them out
    when the node's names_tag says it has them; a revoked node's name goes."""
    token = hub.token(uses=3).token
    status, bree = hub.enroll(token, "bree", rsa_public_pem(1))
    assert status == 200
    assert bree["names"] == {hub.config.name: hub.config.hub_address, "bree": bree["address"]}
    status, dale = hub.enroll(token, "Dale_2", rsa_public_pem(2))
    assert dale["names"] == dict(bree["names"], Dale_2=dale["address"])
    # what the node checks it with accepts it
    assert bootstrap.validate_names(dale["names"], dale["address"], dale["prefix"]) == dale["names"]

    sync = SyncHandler(hub.config, hub.registry)
    ask = lambda tag=None: sync.process(json.dumps(  # noqa: E731
        dict({"name": "bree", "credential": bree["credential"]},
             **({"names_tag": tag} if tag else {}))).encode())
    first = ask()
    assert first.status == 200 and first.body["names"] == dale["names"]
    tag = bootstrap.names_tag(first.body["names"])  # as the node computes it
    again = ask(tag)
    assert again.status == 200 and "names" not in again.body
    assert ask("0" * 64).body["names"] == dale["names"]
    assert sync.process(json.dumps({"name": "bree", "credential": bree["credential"],
                                    "names_tag": "X" * 64}).encode()).status == 400

    assert hub_main(["--state-dir", str(hub.state.root), "revoke", "Dale_2"]) == 0
    after = ask(tag)
    assert after.body["names"] == bree["names"]  # changed: sent again, without Dale_2


def test_too_many_names_are_not_sent():
    many = {"n%d" % i: "10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255) for i in range(1, 30000)}
    assert sendable(many).names is None
    assert sendable({"bree": "10.0.0.3"}).names == {"bree": "10.0.0.3"}
    size = sum(len(k) + len(v) + 6 for k, v in many.items())
    assert size > MAX_NAMES_BYTES


def test_unsound_and_revoked_rows_are_left_out_of_the_names(hub):
    from tinc_hub.registry import NodeRow

    row = lambda name, address, revoked=None: NodeRow(  # noqa: E731
        name, address, int(ipaddress.IPv4Address(address)), rsa_public_pem(1), "x", 0, 0, revoked)
    names = vpn_names(hub.config, [], [row("bree", "10.77.0.3"), row("gone", "10.77.0.4", 5),
                                       row("../x", "10.77.0.5"), row("far", "192.0.2.9")])
    assert names == {hub.config.name: hub.config.hub_address, "bree": "10.77.0.3"}


# --------------------------------------------------------------------------- the hub's root side

def test_the_root_side_checks_names_json_again(tmp_path: Path):
    """`tinc-hub names apply` writes names.json (made by the sandboxed API) as the block, with
    net and subnet from its command line: a file naming an address outside the VPN, a symlink,
    or no JSON is refused and nothing is written."""
    from tinc_hub.names import NAMES_FILE, apply_names_file, write_names_file

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    assert apply_names_file(tmp_path, NET, "10.0.0.0/24", str(hosts)) == (False, [])  # no file
    assert write_names_file(tmp_path, {"erebor": "10.0.0.1", "bree": "10.0.0.3"})
    assert not write_names_file(tmp_path, {"erebor": "10.0.0.1", "bree": "10.0.0.3"})
    assert (tmp_path / NAMES_FILE).stat().st_mode & 0o777 == 0o600
    assert apply_names_file(tmp_path, NET, "10.0.0.0/24", str(hosts)) == (True, [])
    assert hosts.read_text() == "127.0.0.1 localhost\n" + BLOCK
    for hostile in ('{"bank": "192.0.2.66"}', '{"bree": "10.0.0.3\\n192.0.2.66 bank"}',
                    "not json", '["bree"]', "\xff"):
        (tmp_path / NAMES_FILE).write_text(hostile, errors="surrogateescape")
        with pytest.raises(ValueError):
            apply_names_file(tmp_path, NET, "10.0.0.0/24", str(hosts))
        assert hosts.read_text() == "127.0.0.1 localhost\n" + BLOCK
    (tmp_path / NAMES_FILE).unlink()
    (tmp_path / "elsewhere.json").write_text('{"bree": "10.0.0.3"}')
    (tmp_path / NAMES_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(OSError):
        apply_names_file(tmp_path, NET, "10.0.0.0/24", str(hosts))
    assert hosts.read_text() == "127.0.0.1 localhost\n" + BLOCK


def test_the_names_units_carry_net_and_subnet_and_a_sandbox(hub):
    from tinc_hub.service import plan_names_units, render_names_units

    units = render_names_units(hub.config, "/opt/tinc-hub/bin/tinc-hub", str(hub.state.root))
    path_unit, service = units["tinc-hub-names.path"], units["tinc-hub-names.service"]
    assert "PathChanged=%s/names.json\n" % hub.state.root in path_unit
    assert ("ExecStart=/opt/tinc-hub/bin/tinc-hub --state-dir %s names apply --net %s "
            "--vpn-subnet 10.77.0.0/24\n" % (hub.state.root, hub.config.net)) in service
    for line in ("Type=oneshot", "CapabilityBoundingSet=", "ProtectSystem=strict",
                 "ReadWritePaths=/etc", "PrivateNetwork=yes", "NoNewPrivileges=yes"):
        assert line + "\n" in service
    plan = plan_names_units(units, dict(units), True, True)  # in place, running
    assert plan.commands == (("systemctl", "start", "tinc-hub-names.service"),)
    plan = plan_names_units(units, {}, False, False)
    assert plan.commands[:3] == (("systemctl", "daemon-reload"),
                                 ("systemctl", "enable", "tinc-hub-names.path"),
                                 ("systemctl", "restart", "tinc-hub-names.path"))


# --------------------------------------------------------------------------- sync against a hub

def test_sync_takes_names_refuses_hostile_ones_and_sends_its_tag(tmp_path: Path):
    """A real HTTPS hub on loopback: an answer without `names` (an older hub) gives None
    (nothing written), hostile names make the answer refused like a bad `hubs`, and a node
    that wrote names sends their tag."""
    from test_node_sync import NODE as SYNC_NODE, LoopbackHub, hub as hub_entry, sync_answer

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = LoopbackHub(tmp_path / "a"), LoopbackHub(tmp_path / "b")
    try:
        endpoints = (bootstrap.HubEndpoint("127.0.0.1", first.port, first.pin, "hub1"),
                     bootstrap.HubEndpoint("127.0.0.1", second.port, second.pin, "hub2"))
        record = bootstrap.NodeRecord("net", SYNC_NODE, ADDRESS, PREFIX, "net", endpoints, (),
                                      "ab" * 32)
        first.answer = sync_answer(hubs=[hub_entry(1)])
        second.answer = sync_answer(hubs=[hub_entry(2)])
        assert bootstrap.request_sync(record, timeout=5).names is None  # an older hub
        first.answer["names"] = {"hub1": "10.0.0.1", SYNC_NODE: ADDRESS, "evil": "192.0.2.66"}
        second.answer["names"] = {"hub2": "10.0.0.2", SYNC_NODE: ADDRESS}
        answer = bootstrap.request_sync(record, timeout=5)
        assert answer.hub.name == "hub2" and answer.names == second.answer["names"]
        assert "names_tag" not in json.loads(first.bodies[-1])
        bootstrap._NAMES_WRITTEN["net"] = bootstrap.names_tag(answer.names)
        bootstrap.request_sync(record, timeout=5)
        assert json.loads(first.bodies[-1])["names_tag"] == bootstrap.names_tag(answer.names)
    finally:
        bootstrap._NAMES_WRITTEN.pop("net", None)
        first.close(), second.close()


def test_a_lock_held_by_another_process_never_hangs_the_names_or_the_net(tmp_path):
    """Any user who can open /etc (or a net dir) can flock it: the names give up after their
    wait (a problem line, nothing written) and the net lock ends in a one-line error."""
    import fcntl
    import multiprocessing

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold(directory):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        ready.set()
        release.wait(30)

    holder = multiprocessing.Process(target=hold, args=(str(tmp_path),))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with shorter_lock_waits(0.5):
            changed, problems = bootstrap.apply_names("mynet", "mynet", {"bree": "10.0.0.3"},
                                                      str(hosts))
            assert changed is None and any("held the lock" in p for p in problems), problems
            with pytest.raises(bootstrap.BootstrapError, match="cannot lock"):
                with bootstrap.net_lock(str(tmp_path)):
                    pass
        assert time.monotonic() - started < 5
        assert hosts.read_text() == "127.0.0.1 localhost\n"
    finally:
        release.set()
        holder.join(10)
    # and once the other process let go, the names are written
    changed, problems = bootstrap.apply_names("mynet", "mynet", {"bree": "10.0.0.3"}, str(hosts))
    assert changed and "bree.mynet" in hosts.read_text(), problems


class shorter_lock_waits:
    """The lock waits shortened for a test (module constants, put back on exit)."""

    def __init__(self, seconds):
        self.seconds, self.saved = seconds, None

    def __enter__(self):
        self.saved = bootstrap.HOSTS_LOCK_WAIT, bootstrap.LOCK_WAIT
        bootstrap.HOSTS_LOCK_WAIT = bootstrap.LOCK_WAIT = self.seconds

    def __exit__(self, *exc):
        bootstrap.HOSTS_LOCK_WAIT, bootstrap.LOCK_WAIT = self.saved
