"""Tokens that list several hubs: strict parsing of the others (`x`), and a real join through the
second hub when the first one does not answer (issue 11: a token made before a hub died)."""

import json
import os

import pytest

from labkit import netlab
from support import BOOTSTRAP_PY, bootstrap

PIN = "sha256//" + "A" * 43 + "="
FIRST = bootstrap.Token("192.0.2.1", 8655, PIN, "middle-earth", "erebor", "s" * 43)
OTHER = bootstrap.HubEndpoint("192.0.2.2", 8655, "sha256//" + "B" * 43 + "=", "isengard")


def _with_x(x) -> str:
    """A token whose `x` field is whatever JSON value x is (to feed the parser hostile input)."""
    fields = json.loads(bootstrap._b64url_decode(bootstrap.encode_token(FIRST)[6:]))
    fields["x"] = x
    body = json.dumps(fields, separators=(",", ":")).encode()
    return "tinc1." + bootstrap.base64.urlsafe_b64encode(body).decode().rstrip("=")


def test_round_trip_and_old_tokens_unchanged():
    token = FIRST._replace(others=(OTHER,))
    assert bootstrap.decode_token(bootstrap.encode_token(token)) == token
    assert [h.name for h in token.endpoints()] == ["erebor", "isengard"]
    # a one-hub token is byte for byte what the code before several hubs made
    assert '"x"' not in json.dumps(json.loads(bootstrap._b64url_decode(
        bootstrap.encode_token(FIRST)[6:])))
    assert bootstrap.decode_token(bootstrap.encode_token(FIRST)).others == ()


@pytest.mark.parametrize("x", [
    "isengard", {"a": 1}, [["192.0.2.2", 8655, PIN]], [["192.0.2.2", 8655, PIN, "isengard", 1]],
    [["192.0.2.2", "8655", PIN, "isengard"]], [["192.0.2.2", True, PIN, "isengard"]],
    [["192.0.2.2", 0, PIN, "isengard"]], [["192.0.2.2", 65536, PIN, "isengard"]],
    [["192.0.2.2", 8655, "sha256//short=", "isengard"]], [["192.0.2.2", 8655, PIN, "isen-gard"]],
    [["192.0.2.2", 8655, PIN, "erebor"]],  # the first hub's name again
    [["192.0.2.2", 8655, PIN, "h1"], ["192.0.2.3", 8655, PIN, "h1"]],  # a name twice
    [["bad host!", 8655, PIN, "isengard"]], [["127.1", 8655, PIN, "isengard"]],
    [["192.0.2.%d" % i, 8655, PIN, "h%d" % i] for i in range(8)],  # 9 hubs in all
    [None], [[]],
])
def test_hostile_hub_lists_are_malformed(x):
    with pytest.raises(bootstrap.BootstrapError, match="malformed"):
        bootstrap.decode_token(_with_x(x))


def test_seven_other_hubs_are_accepted():
    x = [["192.0.2.%d" % (i + 2), 8655, PIN, "h%d" % i] for i in range(7)]
    assert len(bootstrap.decode_token(_with_x(x)).endpoints()) == bootstrap.MAX_TOKEN_HUBS


@pytest.mark.netlab
def test_join_through_the_second_hub_when_the_first_does_not_answer():
    """The token's first hub is an address where nothing answers; the node enrols through the
    second (the real hub), connects to it, and a re-run with the same token changes nothing."""
    topo = netlab.build_nat_topology(node_names=["hobbiton"], hub_name="erebor")
    try:
        hub = netlab.HubDriver(topo.hub, "middle-earth", "erebor")
        hub.init(key_size=2048, init="none")
        hub.serve()
        real = bootstrap.decode_token(hub.token_create("--name", "hobbiton")["token"])
        dead = bootstrap.HubEndpoint("192.0.2.77", real.port, real.pin, "isengard")
        token = real._replace(host=dead.host, hub=dead.name,
                              others=(bootstrap.HubEndpoint(real.host, real.port, real.pin,
                                                            real.hub),))
        text = bootstrap.encode_token(token)
        node = topo.nodes[0]
        argv = netlab.bootstrap_argv(name="hobbiton", timeout=60)
        proc = node.run(argv, env={"TINC_BOOTSTRAP_TOKEN": text}, check=False, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "or one of 1 more hubs" in proc.stderr
        address = netlab.printed_address(proc.stdout)
        assert address, proc.stdout
        conf = node.read_file("/etc/tinc/middle-earth/tinc.conf")
        assert "ConnectTo = erebor" in conf and "isengard" not in conf, conf
        assert node.exists("/etc/tinc/middle-earth/hosts/erebor")
        assert not node.exists("/etc/tinc/middle-earth/hosts/isengard")
        state = json.loads(node.read_file("/etc/tinc/middle-earth/bootstrap.json"))
        assert (state["hub_name"], state["hub_host"]) == ("erebor", real.host)
        assert node.ping(hub.vpn_address())
        pid = netlab.tincd_pid(node, "middle-earth")
        again = node.run(argv, env={"TINC_BOOTSTRAP_TOKEN": text}, check=False, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert netlab.printed_address(again.stdout) == address
        assert netlab.tincd_pid(node, "middle-earth") == pid
    finally:
        topo.close()


def test_script_is_the_module_tested():
    assert os.path.samefile(bootstrap.__file__, BOOTSTRAP_PY)
