"""The Vagrantfile validates (offline, `vagrant validate`), and the node provisioning script
it runs joins a real node behind the NAT in the namespace lab."""

import json
import os
import shutil
import subprocess

import pytest

from labkit import netlab
from support import REPO_ROOT, vagrant_validate

VAGRANT_SCRIPTS = [os.path.join(REPO_ROOT, "vagrant", n) for n in ("hub.sh", "router.sh",
                                                                   "node.sh")]


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
        assert not node.ping(hub_vpn)
        proc = node.run(["sh", os.path.join(REPO_ROOT, "vagrant", "node.sh"),
                         "/etc/tinc-lab-token.json", netlab.ROUTER_LAN, "192.0.2.0/24",
                         hub_vpn], timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "3 received" in proc.stdout
        listed = {n["name"]: n for n in hub.nodes()}
        assert topo.hub.wait_ping(listed["hobbiton"]["address"], 10)
    finally:
        topo.close()
