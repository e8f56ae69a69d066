"""The hub's wheel, built from the project exactly as the lab's container install copies it:
one real node script inside (no symlink anywhere), served byte for byte as it is in the repo."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from labkit import nspawn
from support import BOOTSTRAP_PY, REPO_ROOT


def test_no_symlink_in_the_product():
    for room in ("hub", "bootstrap", "labkit"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO_ROOT, room)):
            for name in dirnames + filenames:
                assert not os.path.islink(os.path.join(dirpath, name)), (dirpath, name)


def test_wheel_carries_the_node_script_and_serves_it(tmp_path):
    project = tmp_path / "project"
    nspawn.copy_hub_project(project)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w",
                    str(tmp_path / "dist"), str(project)],
                   check=True, stdin=subprocess.DEVNULL, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("tinc_hub-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(
            (".dist-info", ".data"))}
        assert packages == {"tinc_hub", "bootstrap"}
        assert {"bootstrap/__init__.py", "bootstrap/bootstrap.py",
                "tinc_hub/user-data.yaml.in", "tinc_hub/cli.py"} <= names
        assert archive.read("bootstrap/bootstrap.py") == Path(BOOTSTRAP_PY).read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert b"tinc-hub = tinc_hub.cli:main" in archive.read(entry_points)
        archive.extractall(tmp_path / "site")
    # the unpacked wheel alone (isolated mode: not the repo, not the dev venv's editable
    # install) answers with the same bytes through the one reader the hub uses
    code = ("import sys, bootstrap, tinc_hub.cloud_init; "
            "assert bootstrap.__file__.startswith(sys.argv[1]), bootstrap.__file__; "
            "sys.stdout.buffer.write(bootstrap.script_source())")
    out = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          + code, str(tmp_path / "site")],
                         stdout=subprocess.PIPE, check=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "site"))).stdout
    assert out == Path(BOOTSTRAP_PY).read_bytes()
