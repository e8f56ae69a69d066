"""The Vagrantfile validates (offline, `vagrant validate`), and the node provisioning script
it runs joins a real node behind the NAT in the namespace lab."""

import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from labkit import netlab
from support import REPO_ROOT, vagrant_validate

VAGRANT_SCRIPTS = [os.path.join(REPO_ROOT, "vagrant", n) for n in ("hub.sh", "router.sh",
                                                                   "node.sh", "hostname.sh")]


def test_vagrantfile_validates(tmp_path):
    proc = vagrant_validate(REPO_ROOT, tmp_path / "dot")
    assert proc.returncode == 0, proc.stdout
    assert "Vagrantfile validated successfully" in proc.stdout
    for name in ("erebor", "gate", "hobbiton", "bree"):
        assert "==> %s:" % name in proc.stdout


def test_validation_can_fail(tmp_path):
    """A Vagrantfile with a wrong setting is refused, so the check above means something."""
    with open(os.path.join(REPO_ROOT, "Vagrantfile")) as handle:
        text = handle.read()
    broken = text.replace("vm.vm.box = node[:box]", "vm.vm.box = node[:box]\n"
                          "      vm.vm.no_such_setting = 1")
    assert broken != text
    (tmp_path / "Vagrantfile").write_text(broken)
    shutil.copytree(os.path.join(REPO_ROOT, "vagrant"), str(tmp_path / "vagrant"))
    proc = vagrant_validate(tmp_path, tmp_path / "dot")
    assert proc.returncode != 0 and "no_such_setting" in proc.stdout


@pytest.mark.parametrize("script", VAGRANT_SCRIPTS, ids=os.path.basename)
def test_provision_scripts_parse(script):
    subprocess.run(["sh", "-n", script], check=True)
    assert os.access(script, os.X_OK)


def test_build_box_parses_and_refuses_a_bad_setting():
    """vagrant/build-box (bash; the vagrant group runs it for real) parses, and refuses a
    mirror URL that could carry shell or mmdebstrap syntax before it builds anything."""
    script = os.path.join(REPO_ROOT, "vagrant", "build-box")
    subprocess.run(["bash", "-n", script], check=True)
    assert os.access(script, os.X_OK)
    if os.geteuid() == 0:
        env = dict(os.environ, TINC_BOX_MIRROR="http://deb.example/debian $(touch /tmp/x)")
        proc = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "TINC_BOX_MIRROR" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script, args, message", [
    ("node.sh", ["/nonexistent/token.json", "198.51.100.254", "192.0.2.0/24", "10.0.0.1"],
     "no token file /nonexistent/token.json; hint: bring the hub up first"),
    ("node.sh", ["/nonexistent/token.json", "198.51.100.254", "192.0.2.0/24", "$(id)"],
     "must be IPv4 addresses"),
    ("hub.sh", ["middle-earth", "erebor", "192.0.2.10", "10.0.0.0/24", "/nonexistent", "4k"],
     "KEY_SIZE '4k' must be a number of bits"),
    ("hostname.sh", ["erebor;id"], "'erebor;id' is not a host name"),
    ("hostname.sh", ["-f"], "'-f' is not a host name"),
], ids=["node-no-token", "node-bad-address", "hub-bad-key-size", "hostname-bad", "hostname-option"])
def test_provision_scripts_refuse_bad_input_before_changing_anything(script, args, message):
    """The checks at the top of the scripts: one line with a hint, exit 1, before any
    route, package or file is touched. Run as nobody (when root here), so that a check gone
    missing could not change this machine's routes or files."""
    isolate = (["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
               if os.geteuid() == 0 else [])
    proc = subprocess.run(isolate + ["sh", os.path.join(REPO_ROOT, "vagrant", script)] + args,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.netlab
def test_node_provisioning_joins_behind_the_nat(tmp_path):
    """vagrant/node.sh with a token file made by `tinc-hub token create --json`, as the
    Vagrantfile runs it, on a node that reaches the hub only through the NAT router."""
    topo = netlab.build_nat_topology(node_names=["hobbiton"], hub_name="erebor")
    try:
        hub = netlab.HubDriver(topo.hub, "middle-earth", "erebor")
        hub.init(key_size=2048, init="none")
        hub.serve()
        node = topo.nodes[0]
        node.write_file("/etc/tinc-lab-token.json",
                        json.dumps(hub.token_create("--name", "hobbiton")), mode=0o600)
        hub_vpn = hub.vpn_address()
        # the hub hands out the lowest free address: the node's own, which node.sh skips
        own = str(ipaddress.ip_address(hub_vpn) + 1)
        assert not node.ping(hub_vpn)
        proc = node.run(["sh", os.path.join(REPO_ROOT, "vagrant", "node.sh"),
                         "/etc/tinc-lab-token.json", netlab.ROUTER_LAN, "192.0.2.0/24",
                         own, hub_vpn], timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("3 received") == 1, proc.stdout
        assert "PING %s " % hub_vpn in proc.stdout and "PING %s " % own not in proc.stdout
        listed = {n["name"]: n for n in hub.nodes()}
        assert listed["hobbiton"]["address"].split("/")[0] == own, listed
        assert topo.hub.wait_ping(own, 10)
    finally:
        topo.close()
