"""`tinc-hub token create --cloud-init`: every rendered variant is valid cloud-config
(Debian's `cloud-init schema`), keeps the token out of runcmd, and fits provider limits."""

import base64
import gzip
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from support import BOOTSTRAP_PY, bootstrap

TINC_HUB = os.path.join(os.path.dirname(sys.executable), "tinc-hub")
VARIANTS = [(os_name, embed) for os_name in ("ubuntu", "debian", "centos")
            for embed in (False, True)]


@pytest.fixture(scope="module")
def hub_state(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    state = str(root / "state")
    subprocess.run([TINC_HUB, "--state-dir", state, "init", "--net", "middle-earth",
                    "--name", "erebor", "--address", "192.0.2.1", "--vpn-subnet",
                    "10.0.0.0/24", "--init", "none", "--key-size", "2048", "--tinc-dir",
                    str(root / "tinc"), "--no-start"], check=True, stdout=subprocess.DEVNULL)
    return state


def render(state, os_name, embed):
    argv = [TINC_HUB, "--state-dir", state, "token", "create", "--cloud-init", "--os", os_name]
    proc = subprocess.run(argv + (["--embed"] if embed else []), check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    return proc.stdout, proc.stderr


def cloud_init_schema(path):
    cloud_init = shutil.which("cloud-init")
    assert cloud_init, "cloud-init is not installed (tests/setup-env installs it)"
    return subprocess.run([cloud_init, "schema", "--config-file", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)


def test_schema_check_rejects_a_broken_config(tmp_path):
    """The check below can fail: a runcmd that is not a list is refused."""
    bad = tmp_path / "bad"
    bad.write_text("#cloud-config\nruncmd: 5\n")
    assert cloud_init_schema(bad).returncode != 0


@pytest.mark.parametrize("os_name,embed", VARIANTS)
def test_rendered_user_data(hub_state, tmp_path, os_name, embed):
    text, note = render(hub_state, os_name, embed)
    path = tmp_path / "user-data"
    path.write_text(text)
    check = cloud_init_schema(path)
    assert check.returncode == 0, check.stdout
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    token_file = data["write_files"][0]
    assert token_file["path"] == "/run/tinc-bootstrap/token"
    assert token_file["permissions"] == "0600"
    # cloud-init writes with the default umask and chmods afterwards: the directory must
    # already be private (bootcmd runs before write_files)
    assert ["install", "-d", "-m", "0700", "-o", "root", "-g", "root",
            "/run/tinc-bootstrap"] in data["bootcmd"]
    token = bootstrap.decode_token(token_file["content"])
    assert token.net == "middle-earth" and token.hub == "erebor"
    runcmd = repr(data["runcmd"])
    assert token_file["content"] not in runcmd and token.secret not in runcmd
    assert "--token-file /run/tinc-bootstrap/token" in runcmd
    assert "rm -f /run/tinc-bootstrap/token" in runcmd
    size = len(text.encode())
    assert "user data: {} bytes".format(size) in note
    if embed:
        (script,) = [f for f in data["write_files"] if f["path"] ==
                     "/usr/local/sbin/tinc-bootstrap"]
        assert script["encoding"] == "gz+b64" and script["permissions"] == "0755"
        with open(BOOTSTRAP_PY, "rb") as handle:
            assert gzip.decompress(base64.b64decode(script["content"])) == handle.read()
        assert "curl" not in runcmd
    else:
        assert size < 4096, "the fetching variant must stay well under EC2's 16 KiB"
        (fetch,) = [c for c in data["runcmd"] if c[0] == "curl"]
        assert fetch[fetch.index("--pinnedpubkey") + 1] == token.pin
        assert fetch[-1] == "https://192.0.2.1:8655/bootstrap.py"
    packages = data.get("packages", [])
    assert packages == (["python3", "curl"] if os_name == "centos" else [])
