"""tinc-hub.service as `tinc-hub init` writes it under systemd: the unit text, its quoting for
systemd's own syntax (checked by this machine's `systemd-analyze verify`), the refusals and the
sandbox directives. Installing, enabling, the exact argv systemd runs, the sandbox at work and
a reboot are proven for real in booted containers (test_boot.py)."""

import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinc_hub import service
from tinc_hub.app import FD_RESERVE
from tinc_hub.connection_caps import DEFAULT_MAX_CONNECTIONS
from tinc_hub.errors import HubError
from tinc_hub.service import install_service, installed_executable, render_unit
from tinc_hub.state import HubConfig

CONFIG = HubConfig(net="middle-earth", name="erebor", address="192.0.2.1", port=655,
                   api_port=8655, vpn_subnet="10.0.0.0/24", hub_address="10.0.0.1",
                   tinc_dir="/etc/tinc", init="systemd")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# Characters systemd reads specially in a unit file (specifiers, variables, quotes, escapes,
# comments, word separators) and non-ASCII ones; none is a control character.
HOSTILE = " %$\"'\\;#{}*?&|<>`!~=()[]üé日\u00a0" + string.ascii_letters[:6] + string.digits[:3]
NOT_IN_EXECUTABLES = "\"'\\"  # systemd refuses these in ExecStart='s executable


@pytest.fixture(autouse=True)
def installed_like_the_readme(monkeypatch):
    """The tinc_hub package where the README's venv puts it (this checkout may lie in /home)."""
    monkeypatch.setattr(service, "PACKAGE_DIR",
                        "/opt/tinc-hub/lib/python3.11/site-packages/tinc_hub")


def _directives(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line
                and not line.startswith("#"))


def _config(**changes) -> HubConfig:
    return HubConfig(**dict(CONFIG.__dict__, **changes))


def test_unit_serves_after_the_hubs_tincd_and_starts_at_boot():
    unit = _directives(render_unit(CONFIG, "/opt/tinc-hub/bin/tinc-hub", "/var/lib/tinc-hub",
                                   "tinc@middle-earth.service"))
    assert unit["ExecStart"] == "/opt/tinc-hub/bin/tinc-hub serve"
    assert "tinc@middle-earth.service" in unit["After"].split()
    assert unit["Restart"] == "on-failure"
    assert unit["WantedBy"] == "multi-user.target"


def test_unit_passes_a_non_default_state_dir_and_quotes_for_systemd():
    unit = _directives(render_unit(CONFIG, "/srv/my hub/bin/tinc-hub", "/srv/st%h $HOME\\\"/",
                                   "tincd@middle-earth.service"))
    assert unit["ExecStart"] == \
        '"/srv/my hub/bin/tinc-hub" --state-dir "/srv/st%%h $$HOME\\\\\\"" serve'
    assert unit["ReadWritePaths"] == \
        '"/srv/st%%h $HOME\\\\\\"" /etc/tinc/middle-earth/hosts -/etc/tinc/middle-earth/conf.d'
    assert "tincd@middle-earth.service" in unit["After"].split()


def test_unit_is_sandboxed():
    unit = _directives(render_unit(CONFIG, "/opt/tinc-hub/bin/tinc-hub", "/var/lib/tinc-hub",
                                   "tinc@middle-earth.service"))
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"] == \
        "/var/lib/tinc-hub /etc/tinc/middle-earth/hosts -/etc/tinc/middle-earth/conf.d"
    assert unit["PrivateTmp"] == "yes"
    assert unit["ProtectHome"] == "yes"
    assert unit["CapabilityBoundingSet"] == ""  # root signalling root's tincd needs none
    assert unit["PrivateUsers"] == "yes"
    assert unit["ReadOnlyPaths"] == "/run"  # ProtectSystem=strict leaves /run writable
    assert unit["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert unit["UMask"] == "0077"
    # serve's default connection caps fit, whatever systemd's DefaultLimitNOFILE is
    assert int(unit["LimitNOFILE"]) >= DEFAULT_MAX_CONNECTIONS + FD_RESERVE


def test_a_privileged_api_port_keeps_only_the_bind_capability():
    unit = _directives(render_unit(_config(api_port=443), "/opt/tinc-hub/bin/tinc-hub",
                                   "/var/lib/tinc-hub", "tinc@middle-earth.service"))
    assert unit["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert "PrivateUsers" not in unit  # in a user namespace the capability would not count


@pytest.mark.parametrize("executable, state_dir, tinc_dir", [
    ("/root/venv/bin/tinc-hub", "/var/lib/tinc-hub", "/etc/tinc"),
    ("/home/ops/venv/bin/tinc-hub", "/var/lib/tinc-hub", "/etc/tinc"),
    ("/opt/tinc-hub/bin/tinc-hub", "/root/hub-state", "/etc/tinc"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/tinc-hub", "/home/ops/tinc"),
])
def test_home_is_read_only_not_hidden_when_the_service_needs_something_there(
        executable, state_dir, tinc_dir):
    unit = _directives(render_unit(_config(tinc_dir=tinc_dir), executable, state_dir,
                                   "tinc@middle-earth.service"))
    assert unit["ProtectHome"] == "read-only"


def test_home_is_read_only_when_the_package_lives_there(monkeypatch):
    """e.g. `pip install --user`: /usr/local/bin/tinc-hub, the code in /root/.local."""
    monkeypatch.setattr(service, "PACKAGE_DIR",
                        "/root/.local/lib/python3.11/site-packages/tinc_hub")
    unit = _directives(render_unit(CONFIG, "/usr/local/bin/tinc-hub", "/var/lib/tinc-hub",
                                   "tinc@middle-earth.service"))
    assert unit["ProtectHome"] == "read-only"


@pytest.mark.parametrize("executable, state_dir, tinc_unit, message", [
    ("/opt/hub\n/tinc-hub", "/var/lib/tinc-hub", "tinc@n.service", "control characters"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/x\nExecStartPre=/bin/sh", "tinc@n.service",
     "control characters"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/x\x1b[2J", "tinc@n.service", "control characters"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/x\u2028y", "tinc@n.service", "control characters"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/x\udcff", "tinc@n.service", "control characters"),
    ("opt/tinc-hub", "/var/lib/tinc-hub", "tinc@n.service", "absolute"),
    ("/opt/it's/tinc-hub", "/var/lib/tinc-hub", "tinc@n.service", "quote or backslash"),
    ("/opt/a\\b/tinc-hub", "/var/lib/tinc-hub", "tinc@n.service", "quote or backslash"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/tinc-hub", "tinc@%n.service", "tinc unit name"),
    ("/opt/tinc-hub/bin/tinc-hub", "/var/lib/tinc-hub", "a.service b.service",
     "tinc unit name"),
])
def test_unquotable_values_are_refused_and_nothing_is_written(tmp_path, executable, state_dir,
                                                              tinc_unit, message):
    with pytest.raises(HubError) as caught:
        install_service(CONFIG, state_dir, tinc_unit, executable=executable,
                        unit_dir=str(tmp_path))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_net_name_that_is_no_tinc_net_name_is_refused():
    with pytest.raises(HubError, match="net name"):
        render_unit(_config(net="x%i\nExecStartPre=/bin/true"), "/opt/tinc-hub/bin/tinc-hub",
                    "/var/lib/tinc-hub", "tinc@x.service")


def _verify(unit_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no",
                           str(unit_dir / "tinc-hub.service")],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (package systemd)")
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(exe_dir=st.text(alphabet="".join(c for c in HOSTILE if c not in NOT_IN_EXECUTABLES),
                       min_size=1, max_size=12),
       state_dir=st.text(alphabet=HOSTILE, min_size=1, max_size=12),
       tinc_dir=st.text(alphabet=HOSTILE, min_size=1, max_size=12))
def test_systemd_reads_hostile_paths_back_exactly(tmp_path_factory, exe_dir, state_dir,
                                                  tinc_dir):
    """systemd-analyze verify loads the unit with no warning and finds the executable at the
    exact path (it must exist and be executable), so quoting, %-specifiers and $ in it are
    right; the argv and ReadWritePaths= systemd derives are compared in a booted container."""
    work = tmp_path_factory.mktemp("unit")
    directory = work / exe_dir.strip("/") / "bin"
    directory.mkdir(parents=True, exist_ok=True)
    executable = directory / "tinc-hub"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    text = render_unit(_config(tinc_dir=str(work / tinc_dir)), str(executable),
                       str(work / state_dir), "tinc@middle-earth.service")
    (work / "tinc-hub.service").write_text(text)
    proc = _verify(work)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", (
        text, proc.stdout, proc.stderr)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (package systemd)")
def test_verify_catches_a_wrong_executable_path(tmp_path):
    """Control for the property above: systemd-analyze verify does fail when the executable
    systemd reads is not the file (here an unescaped % expands to something else)."""
    directory = tmp_path / "a%Hb"
    directory.mkdir()
    (directory / "tinc-hub").write_text("#!/bin/sh\n")
    (directory / "tinc-hub").chmod(0o755)
    text = render_unit(CONFIG, str(directory / "tinc-hub"), "/var/lib/tinc-hub",
                       "tinc@middle-earth.service")
    (tmp_path / "tinc-hub.service").write_text(text.replace("%%", "%"))
    proc = _verify(tmp_path)
    assert "is not executable" in proc.stderr, proc.stderr


def test_installed_executable_is_the_one_beside_the_running_python():
    assert installed_executable() == str(Path(sys.executable).parent / "tinc-hub")


def test_expose_units_run_apply_as_root_after_tincd_and_watch_the_stamp(tmp_path):
    """tinc-hub-expose.service: a oneshot with capabilities (nftables), after the net's tincd,
    bounded; tinc-hub-expose.path starts it when the API touches the stamp; systemd reads
    both back without a warning."""
    from tinc_hub.service import EXPOSE_NFT_UNIT, EXPOSE_PATH_UNIT, EXPOSE_UNIT, render_expose_units

    units = render_expose_units(CONFIG, "/opt/tinc hub/bin/tinc-hub", "/srv/hub state",
                                "tinc@middle-earth.service")
    service = _directives(units[EXPOSE_UNIT])
    assert service["ExecStart"] == '"/opt/tinc hub/bin/tinc-hub" --state-dir "/srv/hub state" expose apply'
    assert service["Type"] == "oneshot" and "CapabilityBoundingSet" not in service
    assert "tinc@middle-earth.service" in service["After"] and int(service["TimeoutStartSec"]) <= 300
    path = _directives(units[EXPOSE_PATH_UNIT])
    assert path["PathChanged"] == '"/srv/hub state/expose-changed"' and path["Unit"] == EXPOSE_UNIT
    # after nftables.service (re)loads its ruleset (a flush of every table): the same apply
    nft = _directives(units[EXPOSE_NFT_UNIT])
    assert nft["ExecStart"] == nft["ExecReload"] == service["ExecStart"]
    assert (nft["Type"], nft["RemainAfterExit"]) == ("oneshot", "yes")  # active: gets the propagation
    assert nft["PartOf"] == nft["ReloadPropagatedFrom"] == "nftables.service"
    assert "nftables.service" in nft["After"].split() and "nftables.service" in nft["WantedBy"].split()
    if SYSTEMD_ANALYZE is None:
        return
    (tmp_path / "opt").mkdir()
    exe = tmp_path / "tinc-hub"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    for name, text in render_expose_units(CONFIG, str(exe), str(tmp_path), "tinc@x.service").items():
        (tmp_path / name).write_text(text)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no",
                           str(tmp_path / EXPOSE_PATH_UNIT), str(tmp_path / EXPOSE_UNIT),
                           str(tmp_path / EXPOSE_NFT_UNIT)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "tinc-hub-expose" not in done.stderr, done.stderr
