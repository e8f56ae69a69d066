"""``tinc-hub`` commands in-process: init (--no-start) is idempotent to the mtime, refuses
unsafe changes; token create, nodes, revoke; one-line errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tinc_hub.cli import main
from tinc_hub.registry import Registry
from tinc_hub.state import StateDir
from hub_fixtures import enrol_answer, rsa_public_pem


def init_args(root: Path, **over: str) -> List[str]:
    opts = {"--net": f"clit{os.getpid() % 100000}", "--name": "hub1", "--address": "127.0.0.1",
            "--vpn-subnet": "10.66.0.0/24", "--key-size": "2048", "--init": "none",
            "--tinc-dir": str(root / "tinc")}
    opts.update(over)
    argv = ["--state-dir", str(root / "state"), "init", "--no-start"]
    for key, value in opts.items():
        argv += [key, value]
    return argv


def tree(root: Path) -> Dict[str, Tuple[bytes, int, int]]:
    """Every file and directory under root: content, mtime, mode."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path)] = (path.read_bytes() if path.is_file() else b"", st.st_mtime_ns, st.st_mode)
    return out


def test_init_writes_the_specified_files(tmp_path: Path, capsys) -> None:
    assert main(init_args(tmp_path)) == 0
    net = f"clit{os.getpid() % 100000}"
    net_dir = tmp_path / "tinc" / net
    assert (net_dir / "tinc.conf").read_text().splitlines()[1:] == [
        "Name = hub1", "AddressFamily = ipv4", f"Interface = {net[:15]}", "Port = 655",
        "TunnelServer = yes", "UDPRcvBuf = 8388608"]
    host = (net_dir / "hosts" / "hub1").read_text()
    head, _, key = host.partition("\n\n")
    assert head.splitlines() == ["Address = 127.0.0.1", "Port = 655", "Subnet = 10.66.0.1/32",
                                 "Subnet = 10.66.0.0/24"]  # no 0.0.0.0/0: nothing exposed
    assert key.startswith("-----BEGIN RSA PUBLIC KEY-----") and key.count("BEGIN") == 1
    assert (net_dir / "rsa_key.priv").stat().st_mode & 0o777 == 0o600
    for script in ("tinc-up", "tinc-down"):
        assert (net_dir / script).stat().st_mode & 0o777 == 0o755
        assert "10.66.0.1/24" in (net_dir / script).read_text()
    state = StateDir(tmp_path / "state")
    config = json.loads(state.config_file.read_text())
    assert config == {"net": net, "name": "hub1", "address": "127.0.0.1", "port": 655,
                      "api_port": 8655, "vpn_subnet": "10.66.0.0/24", "hub_address": "10.66.0.1",
                      "tinc_dir": str(tmp_path / "tinc"), "init": "none"}
    assert state.registry_file.exists() and state.cert_file.exists()
    assert state.key_file.stat().st_mode & 0o777 == 0o600
    assert "sha256//" in capsys.readouterr().out


def test_init_twice_changes_nothing(tmp_path: Path, capsys) -> None:
    assert main(init_args(tmp_path)) == 0
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(init_args(tmp_path)) == 0
    assert "changed: nothing" in capsys.readouterr().out
    assert tree(tmp_path) == before


def files(root: Path) -> Dict[str, Tuple[bytes, int, int]]:
    """Like tree() without directories (a refused init may read the registry, and SQLite's
    transient side files touch the directory mtime)."""
    return {k: v for k, v in tree(root).items() if Path(k).is_file()}


def test_init_refuses_other_name_or_net_and_subnet_change_with_nodes(tmp_path: Path, capsys) -> None:
    assert main(init_args(tmp_path)) == 0
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(init_args(tmp_path, **{"--name": "other"})) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinc-hub: error: ") and "(hint: " in err and err.count("\n") == 1
    assert main(init_args(tmp_path, **{"--net": "othernet"})) == 1
    assert tree(tmp_path) == before
    # Safe while no node is enrolled: the subnet may change.
    assert main(init_args(tmp_path, **{"--vpn-subnet": "10.67.0.0/24"})) == 0
    assert main(["--state-dir", str(tmp_path / "state"), "token", "create", "--json"]) == 0
    token = json.loads(capsys.readouterr().out.splitlines()[-1])["token"]
    from tinc_hub.enroll import Enroller
    from tinc_hub.state import StateDir as SD

    state = SD(tmp_path / "state")
    enroller = Enroller(state.load_config(), Registry(state.registry_file, state.lock_file))
    status, _ = enrol_answer(enroller, "Bearer " + token, json.dumps(
        {"name": "n1", "public_key": rsa_public_pem(0)}).encode())
    assert status == 200
    before = files(tmp_path)
    assert main(init_args(tmp_path, **{"--vpn-subnet": "10.67.0.0/24"})) == 0  # same again: fine
    assert main(init_args(tmp_path, **{"--vpn-subnet": "10.68.0.0/24"})) == 1
    assert main(init_args(tmp_path, **{"--tinc-port": "656", "--vpn-subnet": "10.67.0.0/24"})) == 1
    assert "enrolled" in capsys.readouterr().err
    assert files(tmp_path) == before


def test_init_refuses_foreign_tinc_conf(tmp_path: Path, capsys) -> None:
    net = f"clit{os.getpid() % 100000}"
    conf = tmp_path / "tinc" / net / "tinc.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("Name = someone\n")
    assert main(init_args(tmp_path)) == 1
    assert "not written by tinc-hub" in capsys.readouterr().err
    assert conf.read_text() == "Name = someone\n"


@pytest.mark.parametrize("over", [{"--vpn-subnet": "10.0.0.0/31"}, {"--vpn-subnet": "nonsense"},
                                  {"--name": "hub-1"}, {"--address": "2001:db8::1"},
                                  {"--key-size": "1024"}, {"--net": "bad/net"}])
def test_init_argument_errors_are_one_line(tmp_path: Path, capsys, over) -> None:
    assert main(init_args(tmp_path, **over)) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinc-hub: error: ") and err.count("\n") == 1
    assert not (tmp_path / "state").exists()


def test_usage_error_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["--state-dir", str(tmp_path), "init"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinc-hub: error: the following arguments are required") and err.count("\n") == 1
    assert main(["--state-dir", str(tmp_path), "nodes"]) == 1
    err = capsys.readouterr().err
    assert "not initialised" in err and "(hint: " in err and err.count("\n") == 1


def test_env_twins(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TINC_HUB_STATE_DIR", str(tmp_path / "state"))
    for flag, value in (("NET", "envnet"), ("NAME", "hub1"), ("ADDRESS", "127.0.0.1"),
                        ("VPN_SUBNET", "10.69.0.0/24"), ("KEY_SIZE", "2048"), ("INIT", "none"),
                        ("TINC_DIR", str(tmp_path / "tinc")), ("NO_START", "1"),
                        ("API_PORT", "9443")):
        monkeypatch.setenv("TINC_HUB_" + flag, value)
    assert main(["init"]) == 0
    assert json.loads((tmp_path / "state" / "hub.json").read_text())["api_port"] == 9443
    monkeypatch.setenv("TINC_HUB_TOKEN_USES", "4")
    monkeypatch.setenv("TINC_HUB_JSON", "yes")
    capsys.readouterr()
    assert main(["token", "create"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"token", "expires_at", "command", "sudo_command"}
    assert ":9443/bootstrap.py" in out["command"]


def test_init_tinc_port_and_its_env_twin(tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(init_args(tmp_path / "flag", **{"--tinc-port": "656"})) == 0
    assert json.loads((tmp_path / "flag" / "state" / "hub.json").read_text())["port"] == 656
    monkeypatch.setenv("TINC_HUB_TINC_PORT", "657")
    assert main(init_args(tmp_path / "env")) == 0
    assert json.loads((tmp_path / "env" / "state" / "hub.json").read_text())["port"] == 657
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_init_old_port_spelling_still_works_and_warns(tmp_path: Path, capsys, monkeypatch,
                                                       how) -> None:
    """`init --port` / $TINC_HUB_PORT (deprecated) still set the tinc port, with one warning
    line naming --tinc-port and its twin; the result is what --tinc-port makes."""
    capsys.readouterr()
    if how == "flag":
        assert main(init_args(tmp_path / "old", **{"--port": "656"})) == 0
    else:
        monkeypatch.setenv("TINC_HUB_PORT", "656")
        assert main(init_args(tmp_path / "old")) == 0
        monkeypatch.delenv("TINC_HUB_PORT")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("tinc-hub: warning: ")
    assert "deprecated" in warnings[0] and "--tinc-port" in warnings[0]
    assert "TINC_HUB_TINC_PORT" in warnings[0] and "TINC_HUB_PORT" in warnings[0]
    assert main(init_args(tmp_path / "new", **{"--tinc-port": "656"})) == 0
    old, new = (json.loads((tmp_path / d / "state" / "hub.json").read_text()) for d in ("old", "new"))
    assert old["port"] == new["port"] == 656
    assert {k: v for k, v in old.items() if k != "tinc_dir"} == \
        {k: v for k, v in new.items() if k != "tinc_dir"}


@pytest.mark.parametrize("flag", ["--api-port", "--port"])
def test_serve_api_port_and_its_old_spelling(tmp_path: Path, capsys, flag) -> None:
    """`serve --port` (deprecated) still picks the API port, with one warning line naming
    --api-port; both spellings reach the real listen (here: a port this test holds)."""
    assert main(init_args(tmp_path)) == 0
    capsys.readouterr()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        code = main(["--state-dir", str(tmp_path / "state"), "serve", "--listen", "127.0.0.1",
                     flag, str(port)])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    if flag == "--port":
        assert len(warnings) == 1 and "deprecated" in warnings[0], warnings
        assert "--api-port" in warnings[0] and "TINC_HUB_API_PORT" in warnings[0]
    else:
        assert warnings == []
    assert "--api-port" in err.splitlines()[-1]  # the hint names the new spelling


def test_old_spellings_are_hidden_from_help(capsys) -> None:
    for command in ("init", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--port" not in out.replace("--tinc-port", "").replace("--api-port", "")


def test_token_nodes_revoke(tmp_path: Path, capsys) -> None:
    sd = ["--state-dir", str(tmp_path / "state")]
    assert main(init_args(tmp_path)) == 0
    capsys.readouterr()
    assert main(sd + ["token", "create", "--uses", "3", "--ttl", "30m", "--name", "n1"]) == 0
    out = capsys.readouterr().out
    token = next(line for line in out.splitlines() if line.startswith("tinc1."))
    assert f"TINC_BOOTSTRAP_TOKEN='{token}' python3 -" in out
    assert "3 uses" in out and "only for node 'n1'" in out
    assert main(sd + ["token", "create", "--json"]) == 0
    token2 = json.loads(capsys.readouterr().out)["token"]

    state = StateDir(tmp_path / "state")
    config = state.load_config()
    from tinc_hub.enroll import Enroller

    enroller = Enroller(config, Registry(state.registry_file, state.lock_file))
    for tok, name, i in ((token, "n1", 1), (token2, "n2", 2)):
        status, _ = enrol_answer(enroller, "Bearer " + tok, json.dumps(
            {"name": name, "public_key": rsa_public_pem(i)}).encode())
        assert status == 200

    assert main(sd + ["nodes", "--json"]) == 0
    nodes = json.loads(capsys.readouterr().out)
    assert [(n["name"], n["address"], n["revoked"]) for n in nodes] == [
        ("n1", "10.66.0.2", False), ("n2", "10.66.0.3", False)]
    assert main(sd + ["nodes"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "ADDRESS", "ENROLLED", "REVOKED", "ONLINE", "LAST", "SEEN",
                                "EPHEMERAL"]
    assert len(table) == 3 and table[1].split()[-3:] == ["no", "never", "-"]

    assert main(sd + ["revoke", "n1"]) == 0  # no tincd running: a warning, still exit 0
    captured = capsys.readouterr()
    assert "revoked" in captured.out and "warning" in captured.err
    assert not (config.hosts_dir / "n1").exists()
    assert main(sd + ["nodes", "--json"]) == 0
    nodes = json.loads(capsys.readouterr().out)
    assert nodes[0]["revoked"] and nodes[0]["revoked_at"]

    assert main(sd + ["revoke", "n2", "--release"]) == 0
    assert "released" in capsys.readouterr().out
    assert main(sd + ["nodes", "--json"]) == 0
    assert [n["name"] for n in json.loads(capsys.readouterr().out)] == ["n1"]
    assert main(sd + ["revoke", "nobody"]) == 1
    assert "no enrolled node" in capsys.readouterr().err


ADMIN_COMMANDS_SCRIPT = """
import json, sys
from tinc_hub.cli import main
state_dir, commands = sys.argv[1], json.loads(sys.argv[2])
codes = [main(["--state-dir", state_dir] + argv) for argv in commands]
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_admin_commands_do_not_import_the_web_server(tmp_path: Path, capsys) -> None:
    """``nodes``, ``token list`` and the other admin commands run without starlette/uvicorn
    (a fresh interpreter: the test process itself has imported them)."""
    assert main(init_args(tmp_path)) == 0
    assert main(["--state-dir", str(tmp_path / "state"), "token", "create", "--json"]) == 0
    commands = [["nodes", "--json"], ["nodes"], ["token", "list", "--json"], ["token", "list"],
                ["token", "create", "--json", "--name", "n1"], ["-v", "revoke", "nobody"]]
    done = subprocess.run([sys.executable, "-c", ADMIN_COMMANDS_SCRIPT, str(tmp_path / "state"),
                           json.dumps(commands)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["codes"] == [0, 0, 0, 0, 0, 1], done.stderr  # revoke nobody: a clean error
    assert "no enrolled node" in done.stderr
    assert '"nodes": []' in done.stdout and "tinc1." in done.stdout  # the commands ran
    assert "tinc_hub.cli" in report["modules"] and "tinc_hub.registry" in report["modules"]
    web = [m for m in report["modules"] if m.split(".")[0] in ("starlette", "uvicorn")
           or m in ("tinc_hub.app", "tinc_hub.http_timeouts")]
    assert web == []
