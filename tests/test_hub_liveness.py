"""Node liveness: the host-up/host-down scripts `tinc-hub init` writes (run for real with the
environment tincd gives them), the records they leave, and what `tinc-hub nodes` makes of them."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tinc_hub.cli import main
from tinc_hub.liveness import (Seen, liveness_dir, node_status, parse_record, read_liveness,
                               render_host_script)
from bootstrap import bootstrap
from hub_fixtures import init_hub


def run_script(path: Path, node: str, remote: str = "198.51.100.7") -> None:
    env = {"PATH": "/usr/bin:/bin", "NODE": node, "REMOTEADDRESS": remote, "REMOTEPORT": "655",
           "NETNAME": "x", "NAME": "hub1", "DEVICE": "/dev/net/tun", "INTERFACE": "x"}
    subprocess.run([str(path)], env=env, check=True, timeout=10)


def test_init_writes_executable_event_scripts(tmp_path: Path) -> None:
    env = init_hub(tmp_path)
    for event in ("up", "down"):
        path = env.config.net_dir / f"host-{event}"
        assert path.read_text() == render_host_script(env.state.root, event)
        assert os.stat(path).st_mode & 0o777 == 0o755


def test_scripts_record_up_and_down(tmp_path: Path) -> None:
    env = init_hub(tmp_path)
    up, down = env.config.net_dir / "host-up", env.config.net_dir / "host-down"
    run_script(up, "node_1")
    seen = read_liveness(env.state.root)
    assert set(seen) == {"node_1"} and seen["node_1"].up and seen["node_1"].remote == "198.51.100.7"
    run_script(down, "node_1")
    assert not read_liveness(env.state.root)["node_1"].up
    assert sorted(os.listdir(liveness_dir(env.state.root))) == ["node_1"]  # no temp files left


@pytest.mark.parametrize("node", ["", "../../etc/passwd", "a b", "x;touch /tmp/pwned", ".hidden"])
def test_scripts_ignore_names_tinc_would_not_give(tmp_path: Path, node: str) -> None:
    env = init_hub(tmp_path)
    run_script(env.config.net_dir / "host-up", node)
    directory = liveness_dir(env.state.root)
    assert not directory.exists() or os.listdir(directory) == []
    assert not Path("/tmp/pwned").exists()


def test_state_dir_with_spaces_and_quotes(tmp_path: Path) -> None:
    root = tmp_path / "it's a dir"
    env = init_hub(root)
    run_script(env.config.net_dir / "host-up", "n1")
    assert read_liveness(env.state.root)["n1"].up


@pytest.mark.parametrize("text,expected", [
    ("up 1700000000 1.2.3.4\n", Seen(True, 1700000000, "1.2.3.4")),
    ("down 1700000000 \n", Seen(False, 1700000000, "")),
    ("", None), ("up\n", None), ("sideways 1 x", None), ("up soon", None),
])
def test_parse_record(text: str, expected) -> None:
    assert parse_record(text) == expected


def test_node_status() -> None:
    up, down = Seen(True, 100, "x"), Seen(False, 200, "x")
    assert node_status(None, True, 500) == {"online": False, "last_seen": None}
    assert node_status(up, True, 500) == {"online": True, "last_seen": 500}
    assert node_status(up, False, 500) == {"online": False, "last_seen": 100}  # hub tincd gone
    assert node_status(down, True, 500) == {"online": False, "last_seen": 200}


def test_nodes_json_shows_online_and_last_seen(tmp_path: Path, capsys) -> None:
    env = init_hub(tmp_path)
    token = env.token(uses=2).token
    from hub_fixtures import rsa_public_pem
    assert env.enroll(token, "n1", rsa_public_pem(1))[0] == 200
    assert env.enroll(token, "n2", rsa_public_pem(2))[0] == 200
    run_script(env.config.net_dir / "host-up", "n1")
    run_script(env.config.net_dir / "host-down", "n1")
    assert main(["--state-dir", str(env.state.root), "nodes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["n1"]["online"] is False and rows["n1"]["last_seen"].endswith("Z")
    assert rows["n2"]["online"] is False and rows["n2"]["last_seen"] is None
    # no hub tincd runs here (--no-start): an "up" record alone does not make a node online
    assert bootstrap.pid_from_file(env.config.net) is None
    run_script(env.config.net_dir / "host-up", "n2")
    assert main(["--state-dir", str(env.state.root), "nodes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["n2"]["online"] is False and rows["n2"]["last_seen"] is not None
