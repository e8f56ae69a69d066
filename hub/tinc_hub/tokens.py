"""Enrolment tokens: creation, TTL parsing, hashing, and the one-liner printed for the node."""

import base64
import hashlib
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from typing import Optional

from . import bootstrap
from .errors import HubError
from .registry import Registry, TokenRow, iso_utc
from .state import HubConfig

_TTL_RE = re.compile(r"(\d+)\s*([smhdw]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> int:
    """``30m``, ``1h``, ``2d``, ``1w``, ``90s`` or plain seconds → seconds (> 0)."""
    match = _TTL_RE.fullmatch(str(text).strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise HubError(f"invalid TTL {text!r}", "use e.g. 30m, 1h, 2d or a number of seconds")
    return int(match.group(1)) * _TTL_UNITS[match.group(2)]


def hash_secret(secret: str) -> str:
    """What the registry stores for a token: sha256 hex of its secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    """32 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def url_host(host: str) -> str:
    """Host part for a URL: IPv6 literals get brackets."""
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]"
    except ValueError:
        pass
    return host


def join_command(config: HubConfig, pin: str, token: str) -> str:
    """The one-liner a node runs as root (token in the environment, not in argv)."""
    url = f"https://{url_host(config.address)}:{config.api_port}/bootstrap.py"
    return (f"curl -fsS --pinnedpubkey '{pin}' -k {url}"
            f" | TINC_BOOTSTRAP_TOKEN='{token}' python3 -")


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: int
    uses: int
    bound_name: Optional[str]
    allow_replace: bool
    command: str

    @property
    def expires_at_iso(self) -> str:
        return iso_utc(self.expires_at) or ""


def create_token(config: HubConfig, registry: Registry, pin: str, uses: int = 1, ttl: int = 3600,
                 name: Optional[str] = None, allow_replace: bool = False,
                 now: Optional[float] = None) -> IssuedToken:
    """Make a token, store only the hash of its secret, and return what to show the admin."""
    if uses < 1:
        raise HubError(f"--uses must be at least 1, not {uses}")
    if ttl < 1:
        raise HubError(f"--ttl must be positive, not {ttl}")
    if name is not None and not bootstrap.valid_node_name(name):
        raise HubError(f"invalid node name {name!r}",
                       "tinc names may contain only A-Z, a-z, 0-9 and _ (at most 64)")
    if name is not None and name == config.name:
        raise HubError(f"{name!r} is the hub's own name")
    created = int(now if now is not None else time.time())
    secret = new_secret()
    token = bootstrap.encode_token(bootstrap.Token(config.address, config.api_port, pin, config.net,
                                                   config.name, secret))
    row = TokenRow(secret_sha256=hash_secret(secret), uses_total=uses, uses_left=uses,
                   expires_at=created + ttl, bound_name=name, allow_replace=allow_replace,
                   created_at=created)
    with registry.exclusive(), registry.transaction() as conn:
        registry.insert_token(conn, row)
    return IssuedToken(token=token, expires_at=row.expires_at, uses=uses, bound_name=name,
                       allow_replace=allow_replace, command=join_command(config, pin, token))
