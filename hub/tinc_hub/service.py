"""The hub's own systemd service, ``tinc-hub.service``: ``tinc-hub serve`` started at boot.

``tinc-hub init`` installs it when the init system is systemd (journald keeps its log:
``journalctl -u tinc-hub``). Re-running init with the same arguments and the same installed
``tinc-hub`` changes nothing; a changed unit file is reloaded and the running service
restarted so that it runs what the unit now says.
"""

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from . import bootstrap
from .errors import HubError
from .state import DEFAULT_STATE_DIR, HubConfig

UNIT_NAME = "tinc-hub.service"
UNIT_DIR = "/etc/systemd/system"


def installed_executable() -> str:
    """Absolute path of the ``tinc-hub`` script of the running installation.

    The console script sits next to the interpreter that runs it (a venv's ``bin/``), also when
    it is reached through a symlink such as ``/usr/local/bin/tinc-hub``.
    """
    beside = Path(sys.executable).parent / "tinc-hub"
    if beside.is_file() and os.access(str(beside), os.X_OK):
        return str(beside)
    found = shutil.which("tinc-hub")
    if found:
        return os.path.realpath(found)
    raise HubError("cannot find the installed 'tinc-hub' executable for tinc-hub.service",
                   "install the hub with pip so that 'tinc-hub' is on PATH")


def render_unit(config: HubConfig, executable: str, state_dir: str, tinc_unit: str) -> str:
    """The unit file text: serve after the hub's tincd unit, restart on failure."""
    command = [executable]
    if os.path.normpath(state_dir) != DEFAULT_STATE_DIR:
        command += ["--state-dir", os.path.normpath(state_dir)]
    command.append("serve")
    return "\n".join([
        "# Written by tinc-hub init; re-running it rewrites this file.",
        "[Unit]",
        f"Description=tinc-hub enrolment API of tinc net {config.net}",
        f"After=network-online.target {tinc_unit}",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={' '.join(shlex.quote(part) for part in command)}",
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=2",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]) + "\n"


def _state(verb: str, unit: str) -> str:
    return bootstrap.run(["systemctl", verb, unit], check=False).stdout.strip()


def install_service(config: HubConfig, state_dir: str, tinc_unit: str,
                    executable: Optional[str] = None, unit_dir: str = UNIT_DIR) -> List[str]:
    """Write, enable and start tinc-hub.service; return what changed (paths and unit names)."""
    path = os.path.join(unit_dir, UNIT_NAME)
    text = render_unit(config, executable or installed_executable(), state_dir, tinc_unit)
    changed: List[str] = []
    unit_changed = bootstrap.write_atomic(path, text, 0o644)
    if unit_changed:
        changed.append(path)
        bootstrap.run(["systemctl", "daemon-reload"])
    if _state("is-enabled", UNIT_NAME) != "enabled":
        bootstrap.run(["systemctl", "enable", UNIT_NAME])
        changed.append(UNIT_NAME)
    if _state("is-active", UNIT_NAME) != "active":
        bootstrap.run(["systemctl", "start", UNIT_NAME])
    elif unit_changed:
        bootstrap.run(["systemctl", "restart", UNIT_NAME])
    return changed
