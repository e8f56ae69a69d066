"""`./lab up|status|shell|down` as a user runs them: separate invocations of the real `lab`
script, the lab living between them. Each test uses its own lab name (TINC_LAB_NAME), so a
lab a user has up is never touched, and runs `./lab down` whatever happens.

Namespaces mode is in the regular group; containers mode (booted systemd containers) is in
the slow `boot` group, like tests/test_boot.py.
"""

import json
import os
import re
import secrets
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from labkit import cli as lab_module
from labkit import netlab

pytestmark = pytest.mark.netlab

LAB_SCRIPT = netlab.REPO_ROOT / "lab"


class LabCommand:
    """Runs `./lab ARGS` for one lab name; remembers what the lab said it made."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state_path = lab_module.LabState.path_of(name)
        self.prefix = "tlab-" + name
        self.made: Dict = {}

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(os.environ, TINC_LAB_NAME=self.name)
        return subprocess.run([str(LAB_SCRIPT)] + list(args), env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def remember_state(self) -> Dict:
        """Read the state file; keep the union of what it named (for the cleanup checks)."""
        data = json.loads(self.state_path.read_text())
        for name, entry in data["hosts"].items():
            self.made.setdefault("hosts", {})[name] = entry
        self.made["workdir"] = data["workdir"]
        return data

    def namespaces(self) -> List[str]:
        return lab_module.lab_namespaces(self.prefix)


def table_rows(output: str) -> Dict[str, List[str]]:
    """{node: [LAN address, VPN address, ping hub, ping nodes]} from the lab's table."""
    rows = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 5 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def lab() -> Iterator[LabCommand]:
    command = LabCommand("t" + secrets.token_hex(4))
    try:
        yield command
    finally:
        down = command("down", timeout=180)
        assert down.returncode == 0, down.stdout
        assert command.namespaces() == []


def assert_all_gone(lab: LabCommand) -> None:
    """No namespace, process, container tree, work directory or state file is left."""
    assert lab.namespaces() == []
    assert not lab.state_path.exists()
    pids = [entry["anchor_pid"] for entry in lab.made["hosts"].values()]
    pids += [entry["container"]["nspawn_pid"] for entry in lab.made["hosts"].values()
             if entry.get("container")]
    netlab.wait_until(lambda: not [p for p in pids if netlab.pid_alive(p)], 10, 0.1,
                      what="the lab's processes to exit")
    for entry in lab.made["hosts"].values():
        assert not netlab.netns_exists(entry["netns"])
        if entry.get("container"):
            assert not Path(entry["container"]["layers"]).exists()
    assert not Path(lab.made["workdir"]).exists()
    assert not (lab_module.STATE_DIR / ("%s.lock" % lab.name)).exists()


def lab_lifecycle(lab: LabCommand, mode: str) -> None:
    """up (1 node) -> status -> shell -> up --nodes 2 -> status -> down, each a new process."""
    up = lab("up", "--mode", mode)
    assert up.returncode == 0, up.stdout
    rows = table_rows(up.stdout)
    assert rows["erebor"][1] == "10.0.0.1", up.stdout
    assert rows["hobbiton"][1] == "10.0.0.2" and rows["hobbiton"][2].startswith("ok"), up.stdout
    state = lab.remember_state()
    assert state["mode"] == mode
    assert all(netlab.pid_alive(e["anchor_pid"]) for e in state["hosts"].values())
    if mode == "containers":
        assert {n for n, e in state["hosts"].items() if e["container"]} == \
            {"erebor", "hobbiton"}

    # the lab outlived `lab up`: a new process measures it again
    status = lab("status")
    assert status.returncode == 0, status.stdout
    assert table_rows(status.stdout)["hobbiton"][2].startswith("ok"), status.stdout

    shell = lab("shell", "hobbiton", "--", "ip", "-br", "addr")
    assert shell.returncode == 0, shell.stdout
    assert re.search(r"(?m)^middle-earth\s+\S+\s+10\.0\.0\.2/24", shell.stdout), shell.stdout
    assert "198.51.100.2/24" in shell.stdout
    assert lab("shell", "erebor", "--", "sh", "-c", "exit 7").returncode == 7
    assert lab("shell", "mordor", "--", "true").returncode != 0

    again = lab("up", "--nodes", "2")
    assert again.returncode == 0, again.stdout
    assert "already up" in again.stdout and "adding bree" in again.stdout, again.stdout
    rows = table_rows(again.stdout)
    assert rows["hobbiton"][3] == "bree ok" and rows["bree"][3] == "hobbiton ok", again.stdout
    assert rows["bree"][1] == "10.0.0.3"
    state = lab.remember_state()
    assert state["nodes"] == ["hobbiton", "bree"]
    ping = lab("shell", "bree", "--", "ping", "-n", "-c", "1", "-W", "2", "10.0.0.2")
    assert ping.returncode == 0, ping.stdout
    other_mode = "namespaces" if mode == "containers" else "containers"
    refused = lab("up", "--mode", other_mode)
    assert refused.returncode == 2 and "down first" in refused.stdout, refused.stdout

    down = lab("down", timeout=180)
    assert down.returncode == 0, down.stdout
    assert_all_gone(lab)
    assert lab("status").returncode == 3


def test_lab_in_namespaces(lab):
    lab_lifecycle(lab, "namespaces")


def test_lab_status_reports_a_broken_vpn(lab):
    """status can fail: with hobbiton's tincd stopped, its pings are FAIL and status exits 1."""
    assert lab("up", "--mode", "namespaces").returncode == 0
    lab.remember_state()
    stop = lab("shell", "hobbiton", "--", "sh", "-c",
               "kill $(cat /run/tinc.middle-earth.pid)")
    assert stop.returncode == 0, stop.stdout
    netlab.wait_until(lambda: lab("shell", "hobbiton", "--", "test", "-e",
                                  "/run/tinc.middle-earth.pid").returncode != 0, 10, 0.2,
                      what="hobbiton's tincd to stop")
    status = lab("status")
    assert status.returncode == 1, status.stdout
    assert table_rows(status.stdout)["hobbiton"][2] == "FAIL", status.stdout


def test_lab_demo_still_works():
    demo = subprocess.run([str(LAB_SCRIPT), "demo"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert demo.returncode == 0, demo.stdout
    assert "demo OK" in demo.stdout and "3 received" in demo.stdout, demo.stdout


@pytest.mark.boot
def test_lab_in_containers(lab):
    lab_lifecycle(lab, "containers")
