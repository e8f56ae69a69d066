"""Enrolment tokens: creation, listing, revocation, TTL parsing, hashing, and the one-liner
printed for the node."""

import base64
import hashlib
import ipaddress
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from . import bootstrap
from .errors import HubError
from .registry import MIN_TOKEN_ID_PREFIX, Registry, TokenRow, iso_utc, token_id
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

    @property
    def id(self) -> str:
        """The id ``token list`` and ``token revoke`` use (a prefix of the stored hash)."""
        return token_id(hash_secret(bootstrap.decode_token(self.token).secret))


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
    if name is not None and name.lower() == config.name.lower():
        raise HubError(f"{name!r} is the hub's own name")
    if allow_replace and name is None:
        raise HubError("--replace needs --name", "a replace token re-keys only the one node it names")
    created = int(now if now is not None else time.time())
    with registry.exclusive(), registry.transaction() as conn:
        for _ in range(8):  # a clash of 40-bit ids is rare; draw another secret
            secret = new_secret()
            row = TokenRow(secret_sha256=hash_secret(secret), uses_total=uses, uses_left=uses,
                           expires_at=created + ttl, bound_name=name, allow_replace=allow_replace,
                           created_at=created)
            if not registry.tokens_with_prefix(conn, row.id):
                break
        else:
            raise HubError("could not draw a token with an unused id", "try again")
        registry.insert_token(conn, row)
    token = bootstrap.encode_token(bootstrap.Token(config.address, config.api_port, pin, config.net,
                                                   config.name, secret))
    return IssuedToken(token=token, expires_at=row.expires_at, uses=uses, bound_name=name,
                       allow_replace=allow_replace, command=join_command(config, pin, token))


def describe_token(token: TokenRow, now: int, nodes: List[str]) -> Dict[str, Any]:
    """What ``token list --json`` shows of a token (never the secret or the full hash)."""
    return {"id": token.id, "status": token.status(now), "created_at": iso_utc(token.created_at),
            "expires_at": iso_utc(token.expires_at), "uses_left": token.uses_left,
            "uses_total": token.uses_total, "name": token.bound_name, "replace": token.allow_replace,
            "revoked_at": iso_utc(token.revoked_at), "nodes": nodes}


def list_tokens(registry: Registry, now: Optional[int] = None) -> List[Dict[str, Any]]:
    """Every token, oldest first, with the nodes it last enrolled or re-keyed."""
    now = int(time.time()) if now is None else now
    with registry.snapshot() as conn:
        tokens = registry.list_tokens(conn)
        nodes = registry.node_names_by_token(conn)
    return [describe_token(t, now, nodes.get(t.secret_sha256, [])) for t in tokens]


def parse_token_id(text: str) -> str:
    """A token id or an unambiguous prefix of one (at least MIN_TOKEN_ID_PREFIX hex digits)."""
    prefix = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_TOKEN_ID_PREFIX, prefix):
        raise ValueError(f"a token id is {MIN_TOKEN_ID_PREFIX} to 64 hex digits, not {text!r}")
    return prefix


def find_token(conn: sqlite3.Connection, registry: Registry, prefix: str) -> TokenRow:
    """The one token whose id starts with ``prefix`` (HubError when none or several)."""
    matches = registry.tokens_with_prefix(conn, parse_token_id(prefix))
    if not matches:
        raise HubError(f"no token with id {prefix!r}", "see 'tinc-hub token list'")
    if len(matches) > 1:
        raise HubError(f"token id {prefix!r} is ambiguous ({len(matches)} tokens:"
                       f" {', '.join(t.id for t in matches[:5])})", "give more of the id")
    return matches[0]


def revoke_token(registry: Registry, prefix: str, now: Optional[int] = None) -> Tuple[TokenRow, bool]:
    """Revoke the token ``prefix`` names; returns it and False when it was already revoked."""
    now = int(time.time()) if now is None else now
    with registry.exclusive(), registry.transaction() as conn:
        token = find_token(conn, registry, prefix)
        changed = registry.revoke_token(conn, token.secret_sha256, now)
    return token, changed
