"""Cloud-init first boot, for real: a booted bookworm container with Debian's `cloud-init`
and a NoCloud seed holding the user data `tinc-hub token create --cloud-init --os debian`
printed on the hub joins the VPN at its first boot with nobody logging in, and a second
boot neither enrols again nor re-runs the runcmd, and the VPN comes back by itself.

The hub is a netlab host running the real `tinc-hub init` + `tinc-hub serve` (its access
log counts the node's requests); the node container sits behind the NAT with no other
network: the debian variant installs no packages, so the first boot needs nothing but the
hub. Cloud-init may only use NoCloud (then None), so it waits on no metadata service.

Group: marker `boot` (like tests/test_boot.py).
"""

import os
import re
import time
from typing import Dict, NamedTuple

import pytest

from labkit import netlab, nspawn

pytestmark = [pytest.mark.netlab, pytest.mark.boot]

NET = "middle-earth"
HUB_NAME = "erebor"
NODE = "hobbiton"
VPN_SUBNET = "10.0.0.0/24"
HUB_VPN = "10.0.0.1"
TOKEN_FILE = "/run/tinc-bootstrap/token"
FIRST_BOOT_DEADLINE = 180.0  # boot start -> cloud-init done and the hub answers over the VPN
REBOOT_DEADLINE = 60.0

# Only NoCloud (seed directory), then None: no probing of EC2/OpenStack/... metadata
# services. The namespace already configured eth0, as a cloud's network would have.
CLOUD_CFG = {
    "/etc/cloud/cloud.cfg.d/90_dpkg.cfg": "datasource_list: [ NoCloud, None ]\n",
    "/etc/cloud/cloud.cfg.d/99-lab-network.cfg": "network: {config: disabled}\n",
}


def cloud_init_node_spec() -> nspawn.RootfsSpec:
    """A systemd node tree with Debian's cloud-init and the en_US.UTF-8 locale."""
    hooks = tuple("printf '%s\\n' '{}' > \"$1{}\"".format(text.rstrip("\n"), path)
                  for path, text in sorted(CLOUD_CFG.items()))
    # cloud-init's locale module sets en_US.UTF-8 (Debian's cloud images have it generated;
    # locale-gen builds only what /etc/locale.gen enables, and update-locale refuses others)
    hooks += (r'sed -i "s/^# *\(en_US.UTF-8 UTF-8\)/\1/" "$1/etc/locale.gen"',
              'chroot "$1" locale-gen')
    return nspawn.RootfsSpec(
        "systemd-cloud-init-node", "systemd",
        nspawn.SYSTEMD_PACKAGES + nspawn.NODE_PACKAGES + ("cloud-init", "locales"), hooks)


class FirstBoot(NamedTuple):
    topo: "netlab.NatTopology"
    hub: netlab.HubDriver
    node: nspawn.Container
    user_data: str
    token: str
    state: Dict[str, object]  # what earlier tests learnt (address, request counts)

    def netlab_diagnostics(self) -> str:
        cloud = self.node.run("tail -n 60 /var/log/cloud-init-output.log; cloud-init status "
                              "--long", check=False, timeout=30) if self.node.running() else None
        return "\n".join([self.node.diagnostics(),
                          "--- cloud-init ---\n" + (cloud.stdout + cloud.stderr if cloud else ""),
                          self.topo.diagnostics()])


def api_requests(hub: netlab.HubDriver) -> Dict[str, int]:
    """How often the hub's API served the bootstrap script and enrolments (its access log)."""
    log = hub.serve_proc.output()
    return {"bootstrap": len(re.findall(r"tinc_hub\.access .* GET /bootstrap\.py 200 ", log)),
            "enroll": len(re.findall(r"tinc_hub\.access .* POST /v1/enroll 200 ", log))}


def wait_cloud_init(node: nspawn.Container, timeout: float) -> str:
    """`cloud-init status --wait`: its one-line answer once cloud-init finished (the last
    line: while it waits, it prints a line of progress dots first)."""
    proc = node.run(["cloud-init", "status", "--wait"], check=False, timeout=timeout)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def first_boot():
    topo = netlab.build_nat_topology(node_names=[NODE], hub_name="hub")
    node = None
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB_NAME, vpn_subnet=VPN_SUBNET)
        hub.init(key_size=2048)
        hub.serve()
        proc = hub.cli("token", "create", "--cloud-init", "--os", "debian")
        user_data = proc.stdout
        token = re.search(r"(?m)^    content: \"(tinc1\.[\w-]+)\"$", user_data).group(1)
        node = nspawn.Container(topo.prefix + "-ci", cloud_init_node_spec(), topo.nodes[0],
                                topo.workdir, hostname=NODE)
        node.create()
        seed = "/var/lib/cloud/seed/nocloud/"
        node.write_file(seed + "meta-data", "instance-id: iid-%s\nlocal-hostname: %s\n"
                        % (topo.prefix, NODE))
        node.write_file(seed + "user-data", user_data)
        yield FirstBoot(topo, hub, node, user_data, token, {})
    finally:
        try:
            if node is not None:
                node.destroy()
        finally:
            topo.close()


def test_first_boot_joins_the_vpn_by_itself(first_boot):
    node, hub = first_boot.node, first_boot.hub
    assert api_requests(hub) == {"bootstrap": 0, "enroll": 0}
    node.start()
    seconds = node.wait_ping(HUB_VPN, FIRST_BOOT_DEADLINE)
    assert seconds is not None, "hub not reached over the VPN %ss after boot start" % (
        FIRST_BOOT_DEADLINE)
    netlab.record_timing("cloud-init: first boot start -> hub answers over the VPN", seconds)
    status = wait_cloud_init(node, FIRST_BOOT_DEADLINE)
    netlab.record_timing("cloud-init: first boot start -> cloud-init done",
                         time.monotonic() - node.boot_started)
    assert status == "status: done", status
    (row,) = hub.nodes()
    assert row["name"] == NODE
    first_boot.state["address"] = row["address"]
    assert hub.host.ping(row["address"])
    assert api_requests(hub) == {"bootstrap": 1, "enroll": 1}
    assert node.unit_state("is-enabled", "tinc@%s.service" % NET) == "enabled"


def test_token_leaves_no_trace(first_boot):
    node, token = first_boot.node, first_boot.token
    assert node.run(["test", "-e", TOKEN_FILE], check=False).returncode != 0
    # the token was written into a directory no other user can enter (bootcmd made it 0700
    # before write_files wrote the token with the default umask and then chmodded it)
    mode = node.run(["stat", "-c", "%a %U", os.path.dirname(TOKEN_FILE)]).stdout.split()
    assert mode == ["700", "root"], mode
    secret = netlab.decode_token(token)["s"]
    places = "/var/log/cloud-init.log /var/log/cloud-init-output.log " \
             "/var/lib/cloud/instance/scripts/"
    body = token[len("tinc1."):]  # the token, with or without its prefix
    for needle in (body, secret):
        found = node.run(["sh", "-c", "grep -rlF -e \"$0\" " + places + "; true", needle])
        assert found.stdout.strip() == "", "token found in: " + found.stdout
    # the search itself works: cloud-init keeps the user data (root only), token included
    kept = node.run(["grep", "-lF", "-e", body, "/var/lib/cloud/instance/user-data.txt"],
                    check=False)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    scripts = node.run(["ls", "/var/lib/cloud/instance/scripts/"]).stdout.split()
    assert "runcmd" in scripts, scripts
    assert "tinc-bootstrap --token-file" in node.run(
        ["cat", "/var/lib/cloud/instance/scripts/runcmd"]).stdout


def test_second_boot_does_not_enrol_again(first_boot):
    node, hub = first_boot.node, first_boot.hub
    address = first_boot.state["address"]
    before = api_requests(hub)
    node.poweroff()
    assert not hub.host.ping(address)
    node.start()
    seconds = node.wait_ping(HUB_VPN, REBOOT_DEADLINE)
    assert seconds is not None, "VPN not back %ss after the second boot" % REBOOT_DEADLINE
    netlab.record_timing("cloud-init: second boot start -> hub answers over the VPN", seconds)
    assert wait_cloud_init(node, REBOOT_DEADLINE) == "status: done"
    assert hub.host.ping(address)
    assert api_requests(hub) == before
    assert [(r["name"], r["address"]) for r in hub.nodes()] == [(NODE, address)]
    log = node.run(["cat", "/var/log/tinc-bootstrap.log"]).stdout
    assert len(re.findall(r"joined: %s is " % NODE, log)) == 1, log
    boots = node.run(["sh", "-c", "grep -c 'Cloud-init v. .* running .init-local' "
                      "/var/log/cloud-init.log"]).stdout.strip()
    assert boots == "2", "cloud-init ran %s times, not once per boot" % boots
    runs = node.run(["grep", "-cF", "Running command ['/var/lib/cloud/instance/scripts/runcmd']",
                     "/var/log/cloud-init.log"], check=False).stdout.strip()
    assert runs == "1", "the runcmd script ran %s times" % runs
