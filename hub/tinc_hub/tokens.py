"""Enrolment tokens: creation, listing, revocation, TTL parsing, hashing, and the one-liner
printed for the node."""

import base64
import hashlib
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from bootstrap import bootstrap
from .errors import HubError
from .roster import usable_hubs
from .registry import MIN_TOKEN_ID_PREFIX, Registry, RegistryView, TokenRow, iso_utc, token_id
from .state import HubConfig

_TTL_RE = re.compile(r"(\d+)\s*([smhdw]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> int:
    """``30m``, ``1h``, ``2d``, ``1w``, ``90s`` or plain seconds → seconds (> 0)."""
    match = _TTL_RE.fullmatch(str(text).strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise HubError(f"invalid TTL {text!r}", "use e.g. 30m, 1h, 2d or a number of seconds")
    return int(match.group(1)) * _TTL_UNITS[match.group(2)]


# --ephemeral (the nodes a token enrols are removed once offline that long: ephemeral.py)
MIN_DURATION = 10  # s: below it a node's reconnect after a hub restart could look like an absence
MAX_DURATION = 30 * 86400


def parse_duration(text: str) -> int:
    """``--ephemeral``: 90s, 30m, 2h, 7d, 1w or seconds, MIN_DURATION..MAX_DURATION (HubError)."""
    try:
        seconds = parse_ttl(text)
    except HubError:
        seconds = 0
    if not MIN_DURATION <= seconds <= MAX_DURATION:
        raise HubError(f"invalid --ephemeral duration {text!r}",
                       f"use e.g. 90s, 30m, 2h or 7d, from {MIN_DURATION} s to {MAX_DURATION // 86400} days")
    return seconds


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


def bootstrap_url(host: str, api_port: int) -> str:
    """Where a node fetches the node script: the hub's ``GET /bootstrap.py``."""
    return f"https://{url_host(host)}:{api_port}/bootstrap.py"


PIN_RE = re.compile(r"sha256//[A-Za-z0-9+/]{43}=")
TOKEN_TEXT_RE = re.compile(r"tinc1\.[A-Za-z0-9_-]{1,2042}")
TOKEN_FILE_VAR = "tinc_token_file"  # the sudo form's shell variable: a name no one else uses


def check_printable(config: HubConfig, pin: str) -> None:
    """Refuse (HubError) hub settings that cannot go safely into a shell line, a URL or YAML.

    `tinc-hub init` only stores valid values; this catches a hub.json edited by hand. Called
    before a token is stored, so a refusal writes nothing.
    """
    problem = bootstrap.host_problem(config.address)
    if problem:
        raise HubError(f"hub.json's address {config.address!r} cannot be printed into a command: "
                       f"{problem}", "re-run 'tinc-hub init' with a valid --address")
    if not isinstance(config.api_port, int) or isinstance(config.api_port, bool) \
            or not 0 < config.api_port < 65536:
        raise HubError(f"hub.json's api_port {config.api_port!r} is not a port",
                       "re-run 'tinc-hub init' with a valid --api-port")
    if not bootstrap.NET_RE.fullmatch(config.net) or not bootstrap.valid_node_name(config.name):
        raise HubError(f"hub.json's net {config.net!r} or name {config.name!r} is invalid",
                       "re-run 'tinc-hub init'")
    if not PIN_RE.fullmatch(pin):
        raise HubError(f"the TLS pin {pin!r} is not a sha256// pin", "check the state dir's cert.pem")


def sh_quote(value: str) -> str:
    """value as one POSIX shell word, always in single quotes (copy-paste reads the same)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _command_words(config: HubConfig, pin: str, token: str) -> Tuple[str, str, str]:
    """(curl pipeline start, quoted token, the token's variable) after checking every value."""
    check_printable(config, pin)
    if not TOKEN_TEXT_RE.fullmatch(token):
        raise HubError("the token cannot be printed into a command", "this is a bug: report it")
    url = bootstrap_url(config.address, config.api_port)
    return f"curl -fsS --pinnedpubkey {sh_quote(pin)} -k {sh_quote(url)}", sh_quote(token), \
        "TINC_BOOTSTRAP_TOKEN"


def join_command(config: HubConfig, pin: str, token: str) -> str:
    """The one-liner a node runs as root (token in the environment, not in argv)."""
    curl, quoted_token, variable = _command_words(config, pin, token)
    return f"{curl} | {variable}={quoted_token} python3 -"


def sudo_join_command(config: HubConfig, pin: str, token: str) -> str:
    """The one-liner for a user with sudo rights.

    The token goes through a 0600 file made by mktemp (`printf` is a shell builtin: no argv),
    and sudo only sees `python3 - --token-file PATH`: nothing secret in any argv, in sudo's
    environment (its JSON log format records the whole environment, and --preserve-env=VAR
    records VAR=value even in the default format), or in sudo's log.
    """
    curl, quoted_token, _ = _command_words(config, pin, token)
    var = TOKEN_FILE_VAR
    return (f"{var}=$(mktemp) && printf '%s\\n' {quoted_token} >>\"${var}\" && "
            f"{curl} | sudo python3 - --token-file \"${var}\"; rm -f \"${var}\"")


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: int
    uses: int
    bound_name: Optional[str]
    allow_replace: bool
    command: str
    ephemeral_seconds: Optional[int] = None

    @property
    def expires_at_iso(self) -> str:
        return iso_utc(self.expires_at) or ""

    @property
    def id(self) -> str:
        """The id ``token list`` and ``token revoke`` use (a prefix of the stored hash)."""
        return token_id(hash_secret(bootstrap.decode_token(self.token).secret))


def create_token(config: HubConfig, registry: Registry, pin: str, uses: int = 1, ttl: int = 3600,
                 name: Optional[str] = None, allow_replace: bool = False,
                 now: Optional[float] = None, ephemeral_seconds: Optional[int] = None) -> IssuedToken:
    """Make a token, store only the hash of its secret, and return what to show the admin.
    ``ephemeral_seconds``: nodes it enrols are removed once offline that long (ephemeral.py)."""
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
    if ephemeral_seconds is not None:
        if not MIN_DURATION <= ephemeral_seconds <= MAX_DURATION:
            raise HubError(f"--ephemeral must be {MIN_DURATION} s to {MAX_DURATION} s, not {ephemeral_seconds}")
    created = int(now if now is not None else time.time())
    with registry.exclusive(), registry.transaction() as tx:
        hubs = usable_hubs(tx.list_hubs(), config.network)
        if name is not None and any(h.name.lower() == name.lower() for h in hubs):
            raise HubError(f"{name!r} is the name of a hub of this net")
        for _ in range(8):  # a clash of 40-bit ids is rare; draw another secret
            secret = new_secret()
            row = TokenRow(secret_sha256=hash_secret(secret), uses_total=uses, uses_left=uses,
                           expires_at=created + ttl, bound_name=name, allow_replace=allow_replace,
                           created_at=created, ephemeral_seconds=ephemeral_seconds)
            if not tx.tokens_with_prefix(row.id):
                break
        else:
            raise HubError("could not draw a token with an unused id", "try again")
        # the other hubs, in the order they joined: the node tries them when this one fails
        others = tuple(bootstrap.HubEndpoint(h.public_address, h.api_port, h.tls_pin, h.name)
                       for h in hubs if h.name != config.name)[:bootstrap.MAX_TOKEN_HUBS - 1]
        token = bootstrap.encode_token(bootstrap.Token(config.address, config.api_port, pin, config.net,
                                                       config.name, secret, others))
        if not TOKEN_TEXT_RE.fullmatch(token):
            raise HubError(f"the token naming {1 + len(others)} hubs is too long for a node",
                           "use shorter public host names for the hubs")
        tx.insert_token(row)
    return IssuedToken(token=token, expires_at=row.expires_at, uses=uses, bound_name=name,
                       allow_replace=allow_replace, command=join_command(config, pin, token),
                       ephemeral_seconds=ephemeral_seconds)


def describe_token(token: TokenRow, now: int, nodes: List[str]) -> Dict[str, Any]:
    """What ``token list --json`` shows of a token (never the secret or the full hash)."""
    return {"id": token.id, "status": token.status(now), "created_at": iso_utc(token.created_at),
            "expires_at": iso_utc(token.expires_at), "uses_left": token.uses_left,
            "uses_total": token.uses_total, "name": token.bound_name, "replace": token.allow_replace,
            "revoked_at": iso_utc(token.revoked_at), "ephemeral": token.ephemeral_seconds,
            "nodes": nodes}


def list_tokens(registry: Registry, now: Optional[int] = None) -> List[Dict[str, Any]]:
    """Every token, oldest first, with the nodes it last enrolled or re-keyed."""
    now = int(time.time()) if now is None else now
    with registry.snapshot() as view:
        tokens = view.list_tokens()
        nodes = view.node_names_by_token()
    return [describe_token(t, now, nodes.get(t.secret_sha256, [])) for t in tokens]


def parse_token_id(text: str) -> str:
    """A token id or an unambiguous prefix of one (at least MIN_TOKEN_ID_PREFIX hex digits)."""
    prefix = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_TOKEN_ID_PREFIX, prefix):
        raise ValueError(f"a token id is {MIN_TOKEN_ID_PREFIX} to 64 hex digits, not {text!r}")
    return prefix


def find_token(view: RegistryView, prefix: str) -> TokenRow:
    """The one token whose id starts with ``prefix`` (HubError when none or several)."""
    matches = view.tokens_with_prefix(parse_token_id(prefix))
    if not matches:
        raise HubError(f"no token with id {prefix!r}", "see 'tinc-hub token list'")
    if len(matches) > 1:
        raise HubError(f"token id {prefix!r} is ambiguous ({len(matches)} tokens:"
                       f" {', '.join(t.id for t in matches[:5])})", "give more of the id")
    return matches[0]


def revoke_token(registry: Registry, prefix: str, now: Optional[int] = None) -> Tuple[TokenRow, bool]:
    """Revoke the token ``prefix`` names; returns it and False when it was already revoked.
    The time is read under the write lock: no enrolment it allowed is dated after it."""
    with registry.exclusive(), registry.transaction() as tx:
        now = int(time.time()) if now is None else now
        token = find_token(tx, prefix)
        changed = tx.revoke_token(token.secret_sha256, now)
    return token, changed
