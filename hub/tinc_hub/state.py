"""The hub state directory: paths and the ``hub.json`` settings file."""

import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import HubError

DEFAULT_STATE_DIR = "/var/lib/tinc-hub"
DEFAULT_TINC_PORT = 655  # tinc 1.0's own default port


@dataclass(frozen=True)
class HubConfig:
    """What ``tinc-hub init`` decided; stored as ``hub.json``."""

    net: str
    name: str
    address: str  # public host name or IP the nodes connect to
    port: int  # tinc port
    api_port: int  # HTTPS enrolment API port
    vpn_subnet: str  # e.g. "10.0.0.0/24"
    hub_address: str  # the hub's own VPN IP, first host of vpn_subnet
    tinc_dir: str
    init: str  # resolved init system: systemd|sysv|rc.local|none
    # the registry URL without password (tinc-hub registry copy records it); absent from
    # hub.json (None): registry.sqlite3 in the state dir. --registry overrides it.
    registry: Optional[str] = None
    # and the file holding its password (never the password itself), if one was given
    registry_password_file: Optional[str] = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.vpn_subnet)

    @property
    def prefix(self) -> int:
        return self.network.prefixlen

    @property
    def net_dir(self) -> Path:
        return Path(self.tinc_dir) / self.net

    @property
    def hosts_dir(self) -> Path:
        return self.net_dir / "hosts"

    @property
    def hub_host_file(self) -> Path:
        return self.hosts_dir / self.name

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("registry", "registry_password_file"):
            if data[key] is None:
                del data[key]  # hub.json of a SQLite hub stays as it always was
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "HubConfig":
        try:
            return cls(
                net=str(data["net"]),
                name=str(data["name"]),
                address=str(data["address"]),
                port=int(data["port"]),
                api_port=int(data["api_port"]),
                vpn_subnet=str(data["vpn_subnet"]),
                hub_address=str(data["hub_address"]),
                tinc_dir=str(data["tinc_dir"]),
                init=str(data["init"]),
                registry=str(data["registry"]) if data.get("registry") is not None else None,
                registry_password_file=(str(data["registry_password_file"])
                                        if data.get("registry_password_file") is not None else None),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HubError(f"hub.json is incomplete or malformed ({exc!r})",
                           "re-run 'tinc-hub init' with the original arguments") from exc


class StateDir:
    """Paths inside the hub state directory."""

    def __init__(self, root: "os.PathLike[str] | str") -> None:
        self.root = Path(root)
        self.config_file = self.root / "hub.json"
        self.registry_file = self.root / "registry.sqlite3"
        self.lock_file = self.root / "registry.lock"
        self.tls_dir = self.root / "tls"
        self.cert_file = self.tls_dir / "cert.pem"
        self.key_file = self.tls_dir / "key.pem"

    def exists(self) -> bool:
        return self.config_file.exists()

    def load_config(self) -> HubConfig:
        """Read hub.json, or fail with a hint to run init."""
        try:
            raw = self.config_file.read_text()
        except FileNotFoundError:
            raise HubError(f"{self.config_file} not found: this hub is not initialised",
                           "run 'tinc-hub init' first or pass the right --state-dir") from None
        except PermissionError:
            raise HubError(f"cannot read {self.config_file}: permission denied",
                           "run as root") from None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise HubError(f"{self.config_file} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise HubError(f"{self.config_file} is not a JSON object")
        return HubConfig.from_dict(data)
