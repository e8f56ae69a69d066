"""``tinc-hub init --init none`` for real: tincd started inside a network namespace this test
creates (and deletes), our config accepted by tincd, SIGHUP after enrolment and revoke."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootstrap import bootstrap
from tinc_hub.cli import main
from tinc_hub.enroll import Enroller
from tinc_hub.registry import Registry
from tinc_hub.reload import send_sighup
from tinc_hub.state import StateDir
from hub_fixtures import enrol_answer, rsa_public_pem, wait_until


def alive(pid: int) -> bool:
    comm = bootstrap.read_text(f"/proc/{pid}/comm")
    return comm is not None and comm.strip() == "tincd"


@pytest.mark.netlab
def test_init_starts_tincd_and_sighup_reaches_it(tmp_path: Path, capsys) -> None:
    tag = f"{os.getpid() % 100000}"
    ns, net = f"tinchubt{tag}", f"hubt{tag}"
    state_dir, tinc_dir = tmp_path / "state", tmp_path / "tinc"
    argv = ["--state-dir", str(state_dir), "init", "--net", net, "--name", "hub1",
            "--address", "127.0.0.1", "--vpn-subnet", "10.99.0.0/24", "--key-size", "2048",
            "--init", "none", "--tinc-dir", str(tinc_dir)]
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    pid = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        in_ns = ["ip", "netns", "exec", ns, sys.executable, "-m", "tinc_hub.cli"]
        first = subprocess.run(in_ns + argv, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert wait_until(lambda: bootstrap.pid_from_file(net) is not None, 10)
        pid = bootstrap.pid_from_file(net)

        def has_address() -> bool:
            out = subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "dev", net],
                                 capture_output=True, text=True, timeout=10).stdout
            return "10.99.0.1/24" in out
        assert wait_until(has_address, 10)  # tinc-up ran inside the namespace

        snapshot = {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
        second = subprocess.run(in_ns + argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "tincd running" in second.stdout and "changed: nothing" in second.stdout
        assert {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in tmp_path.rglob("*") if p.is_file()} == snapshot
        assert bootstrap.pid_from_file(net) == pid

        state = StateDir(state_dir)
        config = state.load_config()
        registry = Registry(state.registry_file, state.lock_file)
        from tinc_hub.tls import pin_of_cert_file
        from tinc_hub.tokens import create_token

        token = create_token(config, registry, pin_of_cert_file(state.cert_file)).token
        status, answer = enrol_answer(
            Enroller(config, registry), "Bearer " + token, json.dumps({"name": "n1", "public_key": rsa_public_pem(1)}).encode())
        assert status == 200 and answer["address"] == "10.99.0.2"
        assert send_sighup(net, str(tinc_dir))
        time.sleep(0.5)
        assert alive(pid)  # tincd re-read its config and the new host file without dying

        capsys.readouterr()
        assert main(["--state-dir", str(state_dir), "revoke", "n1"]) == 0
        assert "warning" not in capsys.readouterr().err
        time.sleep(0.5)
        assert alive(pid)
    finally:
        pid = pid or bootstrap.pid_from_file(net)
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGTERM)
            if not wait_until(lambda: not alive(pid), 10):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], timeout=10)
