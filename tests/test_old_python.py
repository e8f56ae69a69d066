"""bootstrap.py under the oldest Python it claims (3.6): a dry run, and a real join of a node
(netlab namespaces, the real hub) with that interpreter.

The interpreter is found by glob (pyenv installs, /usr/bin/python3.N, /usr/local/bin) or
named by TINC_TEST_OLD_PYTHON; without a Python 3.6 these tests fail and say how to get one.
"""

import glob
import os
import subprocess
from typing import List, Optional, Tuple

import pytest

from labkit import netlab
from support import BOOTSTRAP_PY, bootstrap

FLOOR = (3, 6)
CANDIDATE_GLOBS = (
    os.path.join(os.environ.get("PYENV_ROOT", "/root/.pyenv"), "versions", "3.*", "bin",
                 "python3"),
    "/root/.pyenv/versions/3.*/bin/python3",
    "/usr/bin/python3.*", "/usr/local/bin/python3.*", "/opt/python*/bin/python3",
)


def _version(python: str) -> Optional[Tuple[int, int]]:
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (int(out[0]), int(out[1])) if len(out) == 2 else None


def oldest_python() -> Tuple[str, Tuple[int, int]]:
    """(path, version) of the oldest Python >= 3.6 on this machine."""
    named = os.environ.get("TINC_TEST_OLD_PYTHON")
    paths: List[str] = [named] if named else sorted(
        {p for pattern in CANDIDATE_GLOBS for p in glob.glob(pattern)
         if os.access(p, os.X_OK) and not p.endswith("-config")})
    found = [(v, p) for p, v in ((p, _version(p)) for p in paths) if v and v >= FLOOR]
    if not found:
        pytest.fail("no Python >= 3.6 besides the system one found (looked at %s); install "
                    "one (e.g. `pyenv install 3.6.15`) or set TINC_TEST_OLD_PYTHON"
                    % ", ".join(CANDIDATE_GLOBS))
    version, path = min(found)
    return path, version


@pytest.fixture(scope="module")
def old_python() -> str:
    path, version = oldest_python()
    assert version == FLOOR, "the oldest Python here is %d.%d (%s); bootstrap.py claims 3.6: " \
        "install 3.6 (pyenv install 3.6.15) or set TINC_TEST_OLD_PYTHON" % (version + (path,))
    return path


def test_dry_run_under_python36(old_python, tmp_path):
    token = bootstrap.encode_token(bootstrap.Token(
        "192.0.2.1", 8655, "sha256//" + "A" * 43 + "=", "middle-earth", "erebor", "s" * 43))
    tinc_dir = tmp_path / "tinc"
    env = dict(os.environ, TINC_BOOTSTRAP_TOKEN=token)
    proc = subprocess.run([old_python, BOOTSTRAP_PY, "--dry-run", "--name", "hobbiton",
                           "--tinc-dir", str(tinc_dir), "--init", "rc.local"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Name = hobbiton" in proc.stdout and "tincd -n middle-earth" in proc.stdout
    assert "dry run: nothing was changed" in proc.stderr
    assert not tinc_dir.exists()


@pytest.mark.netlab
def test_real_join_under_python36(old_python, make_topology):
    topo = make_topology(node_names=["shire"], hub_name="hub")
    hub = netlab.HubDriver(topo.hub, "oldpy", "erebor")
    hub.init(key_size=2048, init="none")
    hub.serve()
    node = topo.nodes[0]
    proc = netlab.start_bootstrap(node, hub.token_create()["token"], name="shire",
                                  key_size=2048, init="none", timeout=60, python=old_python)
    rc = proc.wait(timeout=120)
    output = proc.output()
    assert rc == 0, output + topo.diagnostics()
    address = netlab.printed_address(output)
    assert address and node.ping(hub.vpn_address()) and topo.hub.ping(address), output
    version = node.run([old_python, "-V"])
    assert "Python 3.6" in version.stdout + version.stderr
