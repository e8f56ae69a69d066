"""The node side of "nodes stay in step" (issue 11): the enrolment answer's `hubs`, the sync
credential, hubs.json, `bootstrap.py sync` and its loop started by tinc-up.

First the pure parts against hostile input (hypothesis), then the real thing: a real hub
(`tinc-hub init` + `serve`) and a real node (bootstrap.py, tincd) in network namespaces
(labkit.netlab)."""

import json
import os
import shlex

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub_fixtures import rsa_public_pem
from support import bootstrap

NODE = "hobbiton"
ADDRESS, PREFIX = "10.0.0.5", 24
PIN = "sha256//" + "A" * 43 + "="
PIN2 = "sha256//" + "B" * 43 + "="


def host_file(index: int, extra: str = "") -> str:
    return ("Address = 192.0.2.{0}\nPort = 655\nSubnet = 10.0.0.{0}/32\nSubnet = 10.0.0.0/24\n"
            "{1}\n{2}").format(index, extra, rsa_public_pem(index))


def hub(index: int, name=None, **changes) -> dict:
    entry = {"name": "hub{}".format(index) if name is None else name, "host_file": host_file(index),
             "api": {"host": "192.0.2.{}".format(index), "port": 8655, "pin": PIN}}
    entry.update(changes)
    return entry


def refusal(value) -> str:
    with pytest.raises(ValueError) as err:
        bootstrap.validate_hubs(value, NODE, ADDRESS, PREFIX)
    return str(err.value)


# --------------------------------------------------------------------------- validate_hubs

def test_hubs_accepted_are_rebuilt_and_in_order():
    hubs = bootstrap.validate_hubs([hub(2), hub(1)], NODE, ADDRESS, PREFIX)
    assert [h.name for h in hubs] == ["hub2", "hub1"]
    assert hubs[0].host_file == host_file(2).replace("\n\n\n", "\n\n")
    assert hubs[1].api == bootstrap.HubEndpoint("192.0.2.1", 8655, PIN, "hub1")


@pytest.mark.parametrize("value, why", [
    (None, "list of 1 to"), ({}, "list of 1 to"), ([], "list of 1 to"),
    ("hub1", "list of 1 to"),
    ([hub(1)] * 2, "listed twice"),
    ([hub(1), hub(2, name="HUB1")], "listed twice"),
    ([hub(1, name=NODE)], "this node's name"),
    ([hub(1, name="Hobbiton")], "this node's name"),
    (["hub1"], "not an object"), ([[1, 2]], "not an object"), ([None], "not an object"),
    ([hub(1, name="../etc")], "no valid name"), ([hub(1, name="")], "no valid name"),
    ([hub(1, name=7)], "no valid name"), ([hub(1, name="a" * 65)], "no valid name"),
    ([hub(1, api=None)], "`api` is not an object"),
    ([hub(1, api={"host": "192.0.2.1", "port": 8655, "pin": "sha256//short="})], "pin"),
    ([hub(1, api={"host": "192.0.2.1", "port": 8655, "pin": PIN + "\n"})], "pin"),
    ([hub(1, api={"host": "192.0.2.1", "port": "8655", "pin": PIN})], "pin"),
    ([hub(1, api={"host": "192.0.2.1", "port": True, "pin": PIN})], "pin"),
    ([hub(1, api={"host": "192.0.2.1", "port": 70000, "pin": PIN})], "pin"),
    ([hub(1, api={"host": "127.1", "port": 8655, "pin": PIN})], "pin"),
    ([hub(1, api={"host": "a b", "port": 8655, "pin": PIN})], "pin"),
    ([hub(1, api={"port": 8655, "pin": PIN})], "pin"),
    ([hub(1, host_file=None)], "not a string"),
    ([hub(1, host_file=host_file(1, "PublicKeyFile = /etc/shadow"))], "host file refused"),
    ([hub(1, host_file=host_file(1, "Address = 192.0.2.9\nScript = x"))], "host file refused"),
    ([hub(1, host_file=host_file(1) + "\nPort = 1")], "host file refused"),
    ([hub(1, host_file=host_file(1).replace("10.0.0.1/32", "10.0.0.5/32"))],
     "not another host"),  # the node's own address
    ([hub(1, host_file=host_file(1).replace("10.0.0.1/32", "10.9.0.1/32"))], "not another host"),
    ([hub(1), hub(2, host_file=host_file(1))], "another hub's"),
    ([hub(i) for i in range(1, 34)], "list of 1 to 32"),
])
def test_hostile_hub_lists_are_refused(value, why):
    assert why in refusal(value)


def test_a_thousand_hubs_are_refused_before_any_is_parsed():
    assert "list of 1 to" in refusal([{"name": "h%d" % i} for i in range(1000)])


def test_unknown_keys_of_a_hub_are_ignored():
    assert bootstrap.validate_hubs([hub(1, weight=3, later={"x": 1})], NODE, ADDRESS, PREFIX)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "host_file", "api", "host", "port", "pin", "x"]) | st.text(max_size=5),
        inner, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_any_json_is_a_list_of_hubs_or_a_value_error(value):
    try:
        hubs = bootstrap.validate_hubs(value, NODE, ADDRESS, PREFIX)
    except ValueError:
        return
    assert all(bootstrap.valid_endpoint(h.api) for h in hubs)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 3), field=st.sampled_from(["name", "host", "port", "pin"]),
       junk=st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.integers())))
def test_a_mutated_hub_is_refused_or_still_valid(index, field, junk):
    hubs = [hub(i + 1) for i in range(4)]
    if field == "name":
        hubs[index]["name"] = junk
    else:
        hubs[index]["api"][field] = junk
    try:
        accepted = bootstrap.validate_hubs(hubs, NODE, ADDRESS, PREFIX)
    except ValueError:
        return
    for h in accepted:  # whatever passed is exactly what the strict checks allow
        assert bootstrap.valid_endpoint(h.api) and bootstrap.valid_node_name(h.name)
        assert "/" not in h.name and "\n" not in h.api.host


# --------------------------------------------------------------------------- hubs.json

@settings(max_examples=100, deadline=None)
@given(count=st.integers(1, 5), port=st.integers(1, 65535))
def test_hubs_record_round_trip(count, port):
    hubs = [bootstrap.HubEndpoint("192.0.2.%d" % i, port, PIN, "h%d" % i) for i in range(count)]
    text = bootstrap.render_hubs_record("middle-earth", hubs)
    assert bootstrap.parse_hubs_record(text) == ("middle-earth", hubs)


@pytest.mark.parametrize("record", [
    "", "[]", "{", '{"net": "n", "hubs": []}', '{"net": "../x", "hubs": [{}]}',
    json.dumps({"net": "n", "hubs": [{"name": "../../etc/passwd", "host": "h", "port": 1,
                                      "pin": PIN}]}),
    json.dumps({"net": "n", "hubs": [{"name": "a", "host": "h", "port": 1, "pin": PIN,
                                      "extra": 1}]}),
    json.dumps({"net": "n", "hubs": [{"name": "a", "host": "h", "port": 1, "pin": PIN}] * 2}),
    "[" * 100000,
])
def test_damaged_hubs_record_is_refused(record):
    with pytest.raises(ValueError):
        bootstrap.parse_hubs_record(record)


# --------------------------------------------------------------------------- files and plans

def test_tinc_up_and_down_quote_every_word_and_the_hub_output_is_unchanged():
    hub_up = bootstrap.render_tinc_up("10.0.0.5", 24)
    assert hub_up == ("#!/bin/sh\n# Written by tinc-bootstrap: give the VPN interface its "
                      "address.\nip addr replace 10.0.0.5/24 dev \"$INTERFACE\"\n"
                      "ip link set \"$INTERFACE\" up\n")  # the hub's bytes, as before
    cmd = bootstrap.sync_script_command("/usr/bin/python3", "/etc/tinc/it's net/bootstrap.py",
                                        "net", "/etc/tinc/it's net/..", "--daemon")
    up = bootstrap.render_tinc_up("10.0.0.5", 24, cmd)
    assert up.startswith(hub_up)
    line = up.splitlines()[-1]
    assert line.endswith(" || :") and shlex.split(line[:-len(" || :")]) == cmd
    assert bootstrap.render_tinc_down("10.0.0.5", 24, cmd[:-1] + ["--stop"]).startswith(
        bootstrap.render_tinc_down("10.0.0.5", 24))
    for bad in ("a\nb", "a\rb", "", "a\x00b"):
        with pytest.raises(ValueError):
            bootstrap.render_tinc_up("10.0.0.5", 24, ["python3", bad])


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")),
                              min_size=1, max_size=30), min_size=1, max_size=5))
def test_script_line_round_trips_through_the_shell_parser(words):
    up = bootstrap.render_tinc_up("10.0.0.5", 24, words)
    assert shlex.split(up.splitlines()[-1][:-len(" || :")]) == words


def conf(hubs):
    return bootstrap.render_node_tinc_conf(NODE, "net", hubs)


def test_node_tinc_conf_names_every_hub_sorted_with_keepalive():
    text = conf(["rivendell", "erebor"])
    assert text.splitlines()[1:] == [
        "Name = hobbiton", "AddressFamily = ipv4", "Interface = net", "PingInterval = 5",
        "PingTimeout = 3", "MinTimeout = 6", "MaxTimeout = 6", "ConnectTo = erebor",
        "ConnectTo = rivendell"]  # hobbiton retries a lost hub every 6 s (5..14 by name)
    assert conf(["erebor", "rivendell"]) == text  # the bytes do not depend on who answered


def test_sync_plan_writes_only_what_changed_removes_only_recorded_hubs_and_hups():
    hubs = bootstrap.validate_hubs([hub(1), hub(2)], NODE, ADDRESS, PREFIX)
    record = bootstrap.NodeRecord("net", NODE, ADDRESS, PREFIX, "net",
                                  tuple(h.api for h in hubs), ("hub1", "old", "hub2"), "0" * 64)
    answer = bootstrap.SyncAnswer(hubs[0].api, hubs, 30)
    base = "/etc/tinc/net"
    same = {os.path.join(base, "hosts", h.name): h.host_file for h in hubs}
    same[base + "/tinc.conf"] = conf(["hub1", "hub2"])
    same[base + "/hubs.json"] = bootstrap.render_hubs_record("net", [h.api for h in hubs])
    assert bootstrap.plan_sync("/etc/tinc", record, answer, same, True) == bootstrap.Plan()
    # a recorded hub gone: its file removed, tincd HUPed; a stranger's file is never touched
    gone = dict(same, **{base + "/hosts/old": "x", base + "/hosts/stranger": "y"})
    plan = bootstrap.plan_sync("/etc/tinc", record, answer, gone, True)
    assert plan.files == () and plan.commands == (
        ("rm", "-f", "--", base + "/hosts/old"), ("tincd", "-n", "net", "-kHUP"))
    # an address changed: that file only; no HUP when tincd does not run
    moved = dict(same, **{base + "/hosts/hub2": "Address = 192.0.2.99\n"})
    plan = bootstrap.plan_sync("/etc/tinc", record, answer, moved, False)
    assert [f.path for f in plan.files] == [base + "/hosts/hub2"] and plan.commands == ()
    # only hubs.json changed (a new API port): written, no HUP
    record_only = dict(same, **{base + "/hubs.json": "{}"})
    plan = bootstrap.plan_sync("/etc/tinc", record, answer, record_only, True)
    assert [(f.path, f.mode) for f in plan.files] == [(base + "/hubs.json", 0o600)]
    assert plan.commands == ()
    # a recorded name that is the node's own, or not a tinc name, is never removed
    record = record._replace(known=(NODE, "../../passwd", "hub1"))
    plan = bootstrap.plan_sync("/etc/tinc", record, answer,
                               dict(same, **{base + "/hosts/" + NODE: "mine"}), True)
    assert plan == bootstrap.Plan()


def sync_answer(**changes) -> dict:
    answer = {"net": "net", "name": NODE, "address": ADDRESS, "prefix": PREFIX,
              "hubs": [hub(1), hub(2)], "interval": 30}
    answer.update(changes)
    return answer


RECORD = bootstrap.NodeRecord("net", NODE, ADDRESS, PREFIX, "net", (), (), "0" * 64)


@pytest.mark.parametrize("changes, why", [
    ({"name": "other"}, "not about this node"), ({"net": "other"}, "not about this node"),
    ({"address": "10.0.0.6"}, "another VPN address"), ({"prefix": 16}, "another VPN address"),
    ({"interval": "30"}, "interval"), ({"interval": True}, "interval"), ({"interval": 0}, "interval"),
    ({"interval": None}, "interval"), ({"hubs": [hub(2)]}, "not in its list"),
    ({"hubs": [hub(1)] * 2}, "listed twice"),
])
def test_sync_answer_is_checked_like_an_enrolment_answer(changes, why):
    with pytest.raises(ValueError) as err:
        bootstrap.validate_sync_answer(sync_answer(**changes), RECORD, "hub1")
    assert why in str(err.value)


def test_sync_interval_is_bounded():
    for sent, kept in ((1, 10), (30, 30), (10 ** 9, 3600)):
        assert bootstrap.validate_sync_answer(sync_answer(interval=sent), RECORD, "hub1")[1] == kept


def test_sleep_until_due_stops_early_when_the_wall_clock_jumped(monkeypatch):
    """After a suspend, time.time() is past the due time while the monotonic clock stood
    still: the next round runs at once instead of after the whole interval."""
    naps = []
    real_time = bootstrap.time.time

    def nap(seconds):
        naps.append(seconds)
        monkeypatch.setattr(bootstrap.time, "time", lambda: real_time() + 86400)

    bootstrap.sleep_until_due(3600, nap)
    assert naps == [5.0]


def test_check_script_source():
    assert bootstrap.own_script_source() is not None  # the tests import it from its file
    with open(bootstrap.__file__, "rb") as handle:
        assert bootstrap.check_script_source(handle.read())
    for bad in (b"", b"<html>", bootstrap.SCRIPT_SHEBANG + b"def (:\n",
                bootstrap.SCRIPT_SHEBANG + b"\xff\n", bootstrap.SCRIPT_SHEBANG + b"#" * (1 << 20)):
        with pytest.raises(ValueError):
            bootstrap.check_script_source(bad)


def test_status_pings_every_known_hub_the_joined_one_first(tmp_path):
    hubs = bootstrap.validate_hubs([hub(3), hub(2)], NODE, ADDRESS, PREFIX)
    base = tmp_path / "net"
    (base / "hosts").mkdir(parents=True)
    (base / "hubs.json").write_text(bootstrap.render_hubs_record("net", [h.api for h in hubs]))
    for h in hubs:
        (base / "hosts" / h.name).write_text(h.host_file)
    state = {"hub_vpn_address": "10.0.0.2"}
    assert bootstrap.hub_vpn_addresses(str(tmp_path), "net", state) == [
        "10.0.0.2", "10.0.0.3"]
    (base / "hubs.json").write_text("damaged")
    assert bootstrap.hub_vpn_addresses(str(tmp_path), "net", state) == ["10.0.0.2"]


class LoopbackHub:
    """A real HTTPS server on 127.0.0.1 (self-signed key) that records every request body
    and answers POST /v1/sync with a given status and JSON."""

    def __init__(self, directory, status=200, answer=None):
        import http.server
        import ssl
        import threading

        from support import make_self_signed_cert
        cert, key = make_self_signed_cert(directory)
        self.bodies, self.status, self.answer = [], status, answer or {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                data = json.dumps(outer.answer).encode()
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        self.pin = bootstrap.spki_pin_from_cert_der(der)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def closed_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sync_request_goes_only_to_pinned_hubs_in_order(tmp_path):
    """A hub whose key does not match its pin never sees the credential; a closed port and a
    429 pass to the next hub; the first valid answer wins; 401 and 403 end the round."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    impostor = LoopbackHub(tmp_path / "a", answer={"hubs": []})
    busy = LoopbackHub(tmp_path / "b", status=429, answer={"error": "slow down"})
    good = LoopbackHub(tmp_path / "c")
    try:
        endpoints = (bootstrap.HubEndpoint("127.0.0.1", closed_port(), PIN, "hub1"),
                     bootstrap.HubEndpoint("127.0.0.1", impostor.port, busy.pin, "hub2"),
                     bootstrap.HubEndpoint("127.0.0.1", busy.port, busy.pin, "hub3"),
                     bootstrap.HubEndpoint("127.0.0.1", good.port, good.pin, "hub4"))
        credential = "ab" * 32
        record = bootstrap.NodeRecord("net", NODE, ADDRESS, PREFIX, "net", endpoints, (),
                                      credential)
        good.answer = sync_answer(hubs=[hub(4), hub(1)])
        answer = bootstrap.request_sync(record, timeout=5)
        assert answer.hub.name == "hub4" and [h.name for h in answer.hubs] == ["hub4", "hub1"]
        assert impostor.bodies == []  # the pin is checked before a byte is sent
        assert [json.loads(b) for b in busy.bodies + good.bodies] == [
            {"name": NODE, "credential": credential}] * 2
        good.answer = sync_answer(hubs=[hub(1)])  # the answering hub not listed: refused
        with pytest.raises(bootstrap.SyncUnreachable) as err:
            bootstrap.request_sync(record, timeout=5)
        assert "does not match the pin" in str(err.value) and "hub4: answer refused" in str(err.value)
        for status, word in ((401, "re-run the one-liner"), (403, "revoked")):
            good.status, good.answer = status, {"error": "no\x1b[31m"}
            with pytest.raises(bootstrap.SyncRefused) as refused:
                bootstrap.request_sync(record, timeout=5)
            assert refused.value.status == status and word in refused.value.hint
            assert "\x1b" not in str(refused.value)
    finally:
        for server in (impostor, busy, good):
            server.close()


def test_credential_form():
    assert bootstrap.valid_credential("0123456789abcdef" * 4)
    for bad in ("0123456789ABCDEF" * 4, "0" * 63, "0" * 65, "0" * 63 + "\n", 7, None, "g" * 64):
        assert not bootstrap.valid_credential(bad)


# =========================================================================================
# The real thing: a real hub and real nodes in namespaces (labkit.netlab), in file order.

from labkit import netlab  # noqa: E402

NET = "syncnet"
HUB = "erebor"
SHIRE, BREE = "shire", "bree"  # shire runs bootstrap.py from its file, bree from a pipe
DALE = "dale"  # joined by the bootstrap.py of before issue 11, then re-runs today's
ESGAROTH = "esgaroth"  # joined by the previous release's bootstrap.py, then re-runs today's
NETDIR = "/etc/tinc/" + NET
PIDFILE = "/run/tinc-bootstrap-sync.%s.pid" % NET
LOG = "/var/log/tinc-bootstrap.log"


class Lab:
    def __init__(self, topo, hub):
        self.topo, self.hub = topo, hub
        self.nodes = {n.name: n for n in topo.nodes}
        self.tokens = {}

    def netlab_diagnostics(self):
        return self.topo.diagnostics()


@pytest.fixture(scope="module")
def lab():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    topo = netlab.build_nat_topology(node_names=[SHIRE, BREE, DALE, ESGAROTH], hub_name="hub")
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.serve()
        yield Lab(topo, hub)
    finally:
        topo.close()


def sync_loop_pids(node):
    """Pids of the node's sync loops (processes running `bootstrap.py sync --net NET`)."""
    found = []
    for pid in node.pids():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                words = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "sync" in words and NET in words and "--daemon" not in words and "--stop" not in words:
            found.append(pid)
    return found


def loop_locked(node):
    """True when the sync pid file is locked (util-linux flock, from outside the loop)."""
    return node.run(["flock", "-n", "-s", PIDFILE, "true"], check=False).returncode == 1


def node_story(node):
    """The node's log and processes, for a failure message."""
    ps = node.run(["ps", "-eo", "pid,ppid,stat,args"], check=False).stdout
    return "log:\n%s\nprocesses:\n%s" % (node.run(["cat", LOG], check=False).stdout, ps)


def snapshot(node):
    """Every file under the net dir: bytes and mtime (ns)."""
    return node.snapshot(NETDIR)


def join(lab, name, piped=False, source=None, **kw):
    token = lab.tokens.setdefault(name, lab.hub.token_create("--name", name)["token"])
    argv = netlab.bootstrap_argv(name=name, key_size=2048, init="none", timeout=60,
                                 python="/usr/bin/python3")
    env = {"TINC_BOOTSTRAP_TOKEN": token}
    node = lab.nodes[name]
    if piped:  # as `curl ... | python3 -`: the script has no file
        if source is None:
            with open(netlab.BOOTSTRAP_PY) as handle:
                source = handle.read()
        return node.run(["/usr/bin/python3", "-"] + argv[2:], env=env, input=source,
                        timeout=180, check=False, **kw)
    return node.run(argv, env=env, timeout=180, check=False, **kw)


def sync_once(node):
    return node.run(["/usr/bin/python3", NETDIR + "/bootstrap.py", "sync", "--once"],
                    check=False, timeout=60)


@pytest.mark.netlab
def test_join_gets_a_credential_every_hub_file_and_a_running_sync_loop(lab):
    node = lab.nodes[SHIRE]
    done = join(lab, SHIRE)
    assert done.returncode == 0, done.stdout + done.stderr
    credential = node.read_file(NETDIR + "/credential").strip()
    assert bootstrap.valid_credential(credential)
    mode = lambda path: int(node.run(["stat", "-c", "%a %U", path]).stdout.split()[0], 8)  # noqa
    assert mode(NETDIR + "/credential") == 0o600 and mode(NETDIR + "/hubs.json") == 0o600
    hub_net, hubs = bootstrap.parse_hubs_record(node.read_file(NETDIR + "/hubs.json"))
    assert hub_net == NET and [h.name for h in hubs] == [HUB]
    assert hubs[0].host == netlab.HUB_PUBLIC and hubs[0].pin == netlab.decode_token(
        lab.tokens[SHIRE])["k"]
    conf = node.read_file(NETDIR + "/tinc.conf")
    retry = bootstrap.node_retry_seconds(SHIRE)
    for line in ("ConnectTo = " + HUB, "PingInterval = 5", "PingTimeout = 3",
                 "MinTimeout = %d" % retry, "MaxTimeout = %d" % retry):
        assert line + "\n" in conf, conf
    assert node.read_bytes(NETDIR + "/bootstrap.py") == netlab.BOOTSTRAP_PY.read_bytes()
    assert mode(NETDIR + "/bootstrap.py") == 0o755
    up = node.read_file(NETDIR + "/tinc-up").splitlines()[-1]
    assert shlex.split(up[:-len(" || :")]) == [  # not while rotate-key's restart holds it
        "[", "-e", "/run/tinc-bootstrap-sync.%s.hold" % NET, "]", "||",
        "/usr/bin/python3", NETDIR + "/bootstrap.py", "sync", "--net", NET, "--daemon"]
    # started by tinc-up, detached: wait for it (tinc-up returns before the loop locks)
    assert netlab.wait_until(lambda: loop_locked(node) and sync_loop_pids(node), 10), \
        node.run(["cat", LOG], check=False).stdout
    pid = sync_loop_pids(node)[0]
    assert int(node.read_file(PIDFILE).strip()) == pid
    assert os.getsid(pid) == pid  # its own session: nothing ties it to tincd's terminal
    fds = os.listdir("/proc/%d/fd" % pid)
    targets = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in fds]
    assert not any("tun" in t for t in targets), targets  # holds no fd of tincd's
    sigterm = 1 << (15 - 1)

    def sigterm_masks() -> "tuple[int, int]":
        with open("/proc/%d/status" % pid) as handle:
            masks = dict(line.split(":\t", 1) for line in handle.read().splitlines() if ":\t" in line)
        return int(masks["SigBlk"], 16) & sigterm, int(masks["SigIgn"], 16) & sigterm

    # not inherited from tincd: between rounds neither blocked nor ignored (a round that writes
    # files blocks SIGTERM for its writes: bootstrap._SigtermDeferred)
    assert netlab.wait_until(lambda: sigterm_masks() == (0, 0), 10), sigterm_masks()
    assert credential not in node.read_file(LOG)
    status = node.run(["/usr/bin/python3", NETDIR + "/bootstrap.py", "status", "--json"])
    assert json.loads(status.stdout)["sync"] == "running"


@pytest.mark.netlab
def test_a_replay_with_the_credential_gets_none_and_changes_nothing(lab):
    node = lab.nodes[SHIRE]
    before, tincd, loops = snapshot(node), lab.nodes[SHIRE].read_pidfile(
        bootstrap.pid_file_paths(NET)[0]), sync_loop_pids(node)
    done = join(lab, SHIRE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert snapshot(node) == before  # the same credential (no new one), same bytes and mtimes
    assert node.read_pidfile(bootstrap.pid_file_paths(NET)[0]) == tincd
    assert sync_loop_pids(node) == loops and len(loops) == 1


@pytest.mark.netlab
def test_sync_once_changes_nothing_when_nothing_changed(lab):
    node = lab.nodes[SHIRE]
    before, tincd = snapshot(node), node.read_pidfile(bootstrap.pid_file_paths(NET)[0])
    done = sync_once(node)
    assert done.returncode == 0 and "nothing changed" in done.stderr, done.stderr
    assert snapshot(node) == before
    assert node.read_pidfile(bootstrap.pid_file_paths(NET)[0]) == tincd


@pytest.mark.netlab
def test_sync_once_repairs_a_hub_file_and_removes_only_hubs_it_recorded(lab):
    node = lab.nodes[SHIRE]
    hub_file = node.read_file(NETDIR + "/hosts/" + HUB)
    record = json.loads(node.read_file(NETDIR + "/hubs.json"))
    record["hubs"].append({"name": "oldhub", "host": "192.0.2.77", "port": 8655,
                           "pin": record["hubs"][0]["pin"]})
    node.write_file(NETDIR + "/hubs.json", json.dumps(record), mode=0o600)
    node.write_file(NETDIR + "/hosts/oldhub", "Address = 192.0.2.77\n")
    node.write_file(NETDIR + "/hosts/stranger", "Address = 192.0.2.78\n")
    node.write_file(NETDIR + "/hosts/" + HUB, hub_file.replace(netlab.HUB_PUBLIC, "192.0.2.99"))
    tincd = node.read_pidfile(bootstrap.pid_file_paths(NET)[0])
    done = sync_once(node)
    assert done.returncode == 0, done.stderr
    assert "SIGHUP tincd" in done.stderr and "oldhub" in done.stderr, done.stderr
    assert node.read_file(NETDIR + "/hosts/" + HUB) == hub_file
    assert not node.exists(NETDIR + "/hosts/oldhub")
    assert node.read_file(NETDIR + "/hosts/stranger") == "Address = 192.0.2.78\n"
    assert [h["name"] for h in json.loads(node.read_file(NETDIR + "/hubs.json"))["hubs"]] == [HUB]
    assert node.read_pidfile(bootstrap.pid_file_paths(NET)[0]) == tincd  # HUP, no restart
    hub_vpn = lab.hub.vpn_address()
    assert node.wait_ping(hub_vpn, 30), "the VPN did not come back after the SIGHUP"
    node.run(["rm", "-f", NETDIR + "/hosts/stranger"])


@pytest.mark.netlab
def test_a_piped_join_installs_the_hubs_script(lab):
    node = lab.nodes[BREE]
    done = join(lab, BREE, piped=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert node.read_bytes(NETDIR + "/bootstrap.py") == netlab.BOOTSTRAP_PY.read_bytes()
    assert netlab.wait_until(lambda: loop_locked(node), 10), node_story(node)


# bootstrap.py as main had it before the node side of issue 11 (commit 000bee2)
OLD_SCRIPT = os.path.join(os.path.dirname(__file__), "fixtures", "node", "bootstrap-000bee2.py")


@pytest.mark.netlab
def test_a_node_joined_before_gets_sync_by_re_running_the_one_liner_with_its_old_token(lab):
    node = lab.nodes[DALE]
    with open(OLD_SCRIPT) as handle:
        old = handle.read()
    assert "def sync_loop" not in old
    done = join(lab, DALE, piped=True, source=old)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not node.exists(NETDIR + "/credential") and "sync" not in node.read_file(NETDIR + "/tinc-up")
    tincd = netlab.tincd_pid(node, NET)
    done = join(lab, DALE, piped=True)  # the same (spent) token: a replay
    assert done.returncode == 0, done.stdout + done.stderr
    assert bootstrap.valid_credential(node.read_file(NETDIR + "/credential").strip())
    assert "PingInterval = 5" in node.read_file(NETDIR + "/tinc.conf")
    assert netlab.tincd_pid(node, NET) != tincd  # tinc.conf gained the keepalive: restarted
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10)
    assert sync_once(node).returncode == 0


# bootstrap.py of the previous release (commit 6563dec, tinc-hub 0.1.0)
RELEASE_SCRIPT = os.path.join(os.path.dirname(__file__), "fixtures", "node", "bootstrap-6563dec.py")


@pytest.mark.netlab
def test_a_node_of_the_previous_release_re_runs_todays_script_and_again_changes_nothing(lab):
    """The node joined with the release's script run from its file (which installs itself);
    today's hub script, re-run with the same token, takes over its configuration; a second
    re-run changes no file, no process."""
    node = lab.nodes[ESGAROTH]
    token = lab.tokens.setdefault(ESGAROTH, lab.hub.token_create("--name", ESGAROTH)["token"])
    argv = netlab.bootstrap_argv(name=ESGAROTH, key_size=2048, init="none", timeout=60,
                                 python="/usr/bin/python3")
    argv[1] = RELEASE_SCRIPT
    done = node.run(argv, env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(RELEASE_SCRIPT, "rb") as handle:
        assert node.read_bytes(NETDIR + "/bootstrap.py") == handle.read()
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10), node_story(node)
    address = netlab.printed_address(done.stdout)

    done = join(lab, ESGAROTH, piped=True)  # today's script, from the hub; the same (spent) token
    assert done.returncode == 0, done.stdout + done.stderr
    assert netlab.printed_address(done.stdout) == address
    assert node.read_bytes(NETDIR + "/bootstrap.py") == netlab.BOOTSTRAP_PY.read_bytes()
    assert bootstrap.valid_credential(node.read_file(NETDIR + "/credential").strip())
    assert node.wait_ping(lab.hub.vpn_address(), 30)
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10), node_story(node)
    assert sync_once(node).returncode == 0
    before, tincd, loops = snapshot(node), netlab.tincd_pid(node, NET), sync_loop_pids(node)

    done = join(lab, ESGAROTH, piped=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert snapshot(node) == before
    assert (netlab.tincd_pid(node, NET), sync_loop_pids(node)) == (tincd, loops)
    assert node.wait_ping(lab.hub.vpn_address(), 10)


@pytest.mark.netlab
def test_the_loop_stops_with_tincd_and_comes_back_once(lab):
    node = lab.nodes[SHIRE]
    loops = sync_loop_pids(node)
    assert len(loops) == 1
    tincd = netlab.tincd_pid(node, NET)
    node.run(["tincd", "-n", NET, "-k"])
    assert netlab.wait_until(lambda: not sync_loop_pids(node) and not loop_locked(node), 10), \
        "the sync loop outlived tincd -k (tinc-down)"
    assert netlab.wait_until(lambda: not netlab.pid_alive(tincd), 10)
    netlab.start_tincd(node, NET, port=0)
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10)
    first = sync_loop_pids(node)
    # tincd killed hard (no tinc-down) and started again, the launcher run by hand twice:
    # tinc-up finds the loop running and starts no second one
    tincd = netlab.tincd_pid(node, NET)
    os.kill(tincd, 9)
    assert netlab.wait_until(lambda: not netlab.pid_alive(tincd), 10)
    # a zombie until its reaper runs: tincd's kill(pid, 0) would take it for a running tincd
    node.run(["rm", "-f", bootstrap.pid_file_paths(NET)[0]])
    netlab.start_tincd(node, NET, port=0)
    for _ in range(2):
        node.run(["/usr/bin/python3", NETDIR + "/bootstrap.py", "sync", "--net", NET, "--daemon"])
    assert sync_loop_pids(node) == first
    # tincd writes its pidfile before it handles SIGTERM (a SIGTERM then kills it without
    # tinc-down): stop it only once it is up, i.e. the hub answers over the VPN
    assert node.wait_ping(lab.hub.vpn_address(), 30)
    netlab.stop_tincd(node, NET)
    assert netlab.wait_until(lambda: not sync_loop_pids(node), 10)
    netlab.start_tincd(node, NET, port=0)
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10)


@pytest.mark.netlab
def test_a_probe_of_the_lock_does_not_make_a_starting_loop_give_up(lab):
    """status and tinc-up's launcher look at the pid file's lock (a shared flock for an
    instant): a loop starting at that moment waits for it instead of taking it for a loop."""
    node = lab.nodes[SHIRE]
    script = NETDIR + "/bootstrap.py"
    node.run(["/usr/bin/python3", script, "sync", "--net", NET, "--stop"])
    assert netlab.wait_until(lambda: not sync_loop_pids(node), 10)
    node.run(["sh", "-c", "flock -s %s sleep 1 & sleep 0.3; /usr/bin/python3 %s sync --net %s "
              "--daemon; wait" % (PIDFILE, script, NET)])
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10), \
        node_story(node)


@pytest.mark.netlab
def test_sync_and_its_loop_run_under_python36(lab):
    """The installed script as a node with only Python 3.6 runs it: one round, and the loop
    launched by `--daemon` (what tinc-up runs) keeps running."""
    from test_old_python import FLOOR, oldest_python

    python, version = oldest_python()
    assert version == FLOOR, "no Python 3.6 here (%s is %d.%d)" % ((python,) + version)
    node = lab.nodes[SHIRE]
    script = NETDIR + "/bootstrap.py"
    done = node.run([python, script, "sync", "--once"], check=False, timeout=60)
    assert done.returncode == 0 and "nothing changed" in done.stderr, done.stderr
    node.run([python, script, "sync", "--net", NET, "--stop"])
    assert netlab.wait_until(lambda: not sync_loop_pids(node), 10)
    hub_file = node.read_file(NETDIR + "/hosts/" + HUB)
    node.write_file(NETDIR + "/hosts/" + HUB, hub_file.replace("Port = ", "Port = 1"))
    node.run([python, script, "sync", "--net", NET, "--daemon"])
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1 and loop_locked(node), 10)
    pid = sync_loop_pids(node)[0]
    assert os.readlink("/proc/%d/exe" % pid) == os.path.realpath(python)
    # its first round, at once, repairs the hub's file and SIGHUPs tincd
    assert netlab.wait_until(lambda: node.read_file(NETDIR + "/hosts/" + HUB) == hub_file, 20), \
        node.read_file(LOG)
    assert netlab.wait_until(lambda: "changed %s/hosts/%s, SIGHUP tincd" % (NETDIR, HUB)
                             in node.read_file(LOG), 10), node.read_file(LOG)
    assert netlab.pid_alive(pid)


@pytest.mark.netlab
def test_a_wrong_credential_gets_401_with_the_hint(lab):
    node = lab.nodes[SHIRE]
    good = node.read_file(NETDIR + "/credential")
    node.write_file(NETDIR + "/credential", "0" * 64 + "\n", mode=0o600)
    try:
        done = sync_once(node)
        assert done.returncode == bootstrap.EXIT_REFUSED, done.stderr
        assert "re-run the one-liner" in done.stderr and "0" * 64 not in done.stderr, done.stderr
    finally:
        node.write_file(NETDIR + "/credential", good, mode=0o600)
    assert sync_once(node).returncode == 0


@pytest.mark.netlab
def test_a_revoked_nodes_sync_stops_with_403(lab):
    node = lab.nodes[BREE]
    assert netlab.wait_until(lambda: len(sync_loop_pids(node)) == 1, 10)
    lab.hub.cli("revoke", BREE)
    done = sync_once(node)
    assert done.returncode == bootstrap.EXIT_REFUSED and "revoked" in done.stderr, done.stderr
    # a loop asks at once when it starts (tincd restarted): it meets the 403 and stops
    netlab.stop_tincd(node, NET)  # tincd is long up: it runs tinc-down
    assert netlab.wait_until(lambda: not sync_loop_pids(node), 10)
    netlab.start_tincd(node, NET, port=0)
    assert netlab.wait_until(lambda: "stopping" in node.read_file(LOG), 30), node.read_file(LOG)
    assert netlab.wait_until(lambda: not sync_loop_pids(node) and not loop_locked(node), 10)
    assert "revoked" in node.read_file(LOG)
    status = node.run(["/usr/bin/python3", NETDIR + "/bootstrap.py", "status", "--json"],
                      check=False)
    assert json.loads(status.stdout)["sync"] == "stopped"


# =========================================================================================
# Booted machines (labkit.nspawn, group `boot`): the loop under systemd and SysV init, and
# across a reboot, with the installed hub and the printed one-liner.

from labkit import nspawn  # noqa: E402

BOOT_NET = "middle-earth"
BOOT_HUB, BOOT_SYSTEMD, BOOT_SYSV = "erebor", "hobbiton", "bree"
BOOT_UNIT = "tinc@%s.service" % BOOT_NET
BOOT_NETDIR = "/etc/tinc/" + BOOT_NET


@pytest.fixture(scope="module")
def booted():
    topo = netlab.build_nat_topology(node_names=[BOOT_SYSTEMD, BOOT_SYSV], hub_name="hub")
    try:
        work = topo.workdir
        hub = nspawn.Container(topo.prefix + "-hub", nspawn.systemd_hub_spec(work), topo.hub,
                               work, hostname=BOOT_HUB)
        sd_node = nspawn.Container(topo.prefix + "-sd", nspawn.systemd_node_spec(),
                                   topo.nodes[0], work)
        sv_node = nspawn.Container(topo.prefix + "-sv", nspawn.sysv_node_spec(),
                                   topo.nodes[1], work)
        with nspawn.booted([hub, sd_node, sv_node], hub=hub):
            nspawn.install_hub(hub, timeout=180)
            hub.run(["tinc-hub", "init", "--net", BOOT_NET, "--name", BOOT_HUB, "--address",
                     netlab.HUB_PUBLIC, "--vpn-subnet", "10.0.0.0/24", "--key-size", "2048"],
                    timeout=180)
            netlab.wait_until(lambda: hub.run(["curl", "-fsk", "https://127.0.0.1:8655/healthz"],
                                              check=False).returncode == 0, 30, 0.2,
                              what="tinc-hub.service answering /healthz")
            yield {"hub": hub, "systemd": sd_node, "sysv": sv_node}
    finally:
        topo.close()


def container_loops(node):
    """Pids of the sync loop of BOOT_NET in a container."""
    out = node.run(["pgrep", "-f", "bootstrap.py sync --net %s --log" % BOOT_NET],
                   check=False).stdout
    return [int(pid) for pid in out.split()]


def one_liner(hub, extra=""):
    out = hub.run(["tinc-hub", "token", "create"]).stdout.splitlines()
    return out[out.index("run on the node as root:") + 1] + " --key-size 2048" + extra


@pytest.mark.netlab
@pytest.mark.boot
@pytest.mark.parametrize("which, extra", [("systemd", ""), ("sysv", " --init rc.local")])
def test_the_loop_runs_under_each_init_and_repairs_after_a_reboot(booted, which, extra):
    node = booted[which]
    proc = node.run(["sh", "-c", one_liner(booted["hub"], extra)], check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert netlab.wait_until(lambda: len(container_loops(node)) == 1, 20), \
        node.run(["cat", LOG], check=False).stdout
    pid = container_loops(node)[0]
    if which == "systemd":  # started by tinc-up: in tincd's unit, stopped with it
        cgroup = node.run(["cat", "/proc/%d/cgroup" % pid]).stdout
        assert BOOT_UNIT in cgroup, cgroup
    # stopped with tinc-down, a hub file damaged while the machine is off: after the reboot
    # the loop, started again by tinc-up, repairs it and the VPN comes back by itself
    hub_file = node.run(["cat", BOOT_NETDIR + "/hosts/" + BOOT_HUB]).stdout
    node.poweroff()
    node.write_file(BOOT_NETDIR + "/hosts/" + BOOT_HUB,
                    hub_file.replace("Port = 655", "Port = 1655"))
    node.start()
    seconds = node.wait_ping("10.0.0.1", 90)
    assert seconds is not None, node.run(["cat", LOG], check=False).stdout
    netlab.record_timing("node sync: reboot with a damaged hub file -> VPN back (%s)" % which,
                         seconds)
    assert node.run(["cat", BOOT_NETDIR + "/hosts/" + BOOT_HUB]).stdout == hub_file
    assert netlab.wait_until(lambda: len(container_loops(node)) == 1, 20)
    assert "changed %s/hosts/%s, SIGHUP tincd" % (BOOT_NETDIR, BOOT_HUB) in node.run(
        ["cat", LOG]).stdout
