"""tinc-hub.service as `tinc-hub init` writes it under systemd (the unit text; installing,
enabling and a reboot are proven for real in test_boot.py)."""

import sys
from pathlib import Path

from tinc_hub.service import installed_executable, render_unit
from tinc_hub.state import HubConfig

CONFIG = HubConfig(net="middle-earth", name="erebor", address="192.0.2.1", port=655,
                   api_port=8655, vpn_subnet="10.0.0.0/24", hub_address="10.0.0.1",
                   tinc_dir="/etc/tinc", init="systemd")


def _directives(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line
                and not line.startswith("#"))


def test_unit_serves_after_the_hubs_tincd_and_starts_at_boot():
    unit = _directives(render_unit(CONFIG, "/opt/tinc-hub/bin/tinc-hub", "/var/lib/tinc-hub",
                                   "tinc@middle-earth.service"))
    assert unit["ExecStart"] == "/opt/tinc-hub/bin/tinc-hub serve"
    assert "tinc@middle-earth.service" in unit["After"].split()
    assert unit["Restart"] == "on-failure"
    assert unit["WantedBy"] == "multi-user.target"


def test_unit_passes_a_non_default_state_dir_and_quotes_paths():
    unit = _directives(render_unit(CONFIG, "/srv/my hub/bin/tinc-hub", "/srv/state/",
                                   "tincd@middle-earth.service"))
    assert unit["ExecStart"] == "'/srv/my hub/bin/tinc-hub' --state-dir /srv/state serve"
    assert "tincd@middle-earth.service" in unit["After"].split()


def test_installed_executable_is_the_one_beside_the_running_python():
    assert installed_executable() == str(Path(sys.executable).parent / "tinc-hub")
