"""The ``tinc-hub`` command line. Every option has a TINC_HUB_* environment twin."""

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from . import __version__
from bootstrap.bootstrap import (DEFAULT_API_PORT, DEFAULT_KEY_SIZE, DEFAULT_SYNC_INTERVAL,
                                 DEFAULT_TINC_DIR, INIT_CHOICES, SYNC_INTERVAL_MAX,
                                 SYNC_INTERVAL_MIN)
from .errors import HubError
from .client_address import NO_PROXY, TrustedProxies
from .connection_caps import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
from .ratelimit import DEFAULT_RATE_LIMIT, RateLimit
from .state import DEFAULT_STATE_DIR, DEFAULT_TINC_PORT, StateDir

PROG = "tinc-hub"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_TRUE = {"1", "true", "yes", "on"}


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``tinc-hub: error: … (hint: …)``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (hint: see '{self.prog} --help')")


def env_name(option: str) -> str:
    return "TINC_HUB_" + option.lstrip("-").upper().replace("-", "_")


def add_option(parser: argparse.ArgumentParser, flag: str, *, env: Optional[str] = None,
               default: Any = None, required: bool = False, type: Callable = str,
               help: str = "", old_env: Optional[str] = None, **kwargs: Any) -> None:
    """An option whose default comes from its environment twin (named in --help); a set
    ``old_env`` (the twin's deprecated name) is read when the twin is not, with a warning."""
    env = env or env_name(flag)
    source, raw = env, os.environ.get(env)
    if (raw is None or raw == "") and old_env and os.environ.get(old_env):
        source, raw = old_env, os.environ[old_env]
        # A subparser's defaults reach the namespace only when its command runs: main() warns.
        parser.set_defaults(deprecated_env=f"${old_env} is deprecated; use ${env} (flag {flag})")
    if raw is not None and raw != "":
        try:
            default = type(raw)
        except (TypeError, ValueError):
            raise UsageError(f"invalid value {raw!r} in ${source} (hint: see '{parser.prog} --help')")
        required = False
    suffix = f" [env {env}" + (f"; default {default}" if default is not None else "") + "]"
    parser.add_argument(flag, type=type, default=default, required=required,
                        help=(help + suffix) if help != argparse.SUPPRESS else help, **kwargs)


def add_flag(parser: argparse.ArgumentParser, flag: str, *, env: Optional[str] = None,
             help: str = "") -> None:
    env = env or env_name(flag)
    default = os.environ.get(env, "").strip().lower() in _TRUE
    parser.add_argument(flag, action="store_true", default=default,
                        help=(help + f" [env {env}]") if help != argparse.SUPPRESS else help)


class DeprecatedAlias(argparse.Action):
    """The old spelling of an option: stores into the new option and warns on stderr (once)."""

    def __init__(self, option_strings: List[str], dest: str, *, use: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.use = use  # what to say instead: the new flag and its environment twin(s)
        self.warned = False

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        if not self.warned:
            command = parser.prog.split()[-1]
            print(f"{PROG}: warning: '{command} {option_string}' is deprecated; use {self.use}",
                  file=sys.stderr)
            self.warned = True
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old_flag: str, new_flag: str, *,
                         type: Callable = str, env: Optional[str] = None,
                         old_env: Optional[str] = None) -> None:
    """``old_flag`` still works as ``new_flag`` (hidden from --help), with a warning naming the
    new flag, its environment twin and the twin's old name if it had another."""
    use = f"{new_flag} (env {env or env_name(new_flag)}" + \
        (f"; ${old_env} is deprecated too)" if old_env else ")")
    parser.add_argument(old_flag, dest=new_flag.lstrip("-").replace("-", "_"), type=type,
                        action=DeprecatedAlias, use=use, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


def add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """--state-dir, --registry, --registry-password-file and -v, accepted before and after
    the command."""
    if top:
        add_option(parser, "--state-dir", default=DEFAULT_STATE_DIR, help="hub state directory")
        add_option(parser, "--registry", metavar="URL",
                   help="the registry: postgresql://USER@HOST[:PORT]/DB (several hubs; no password "
                        "in it) or sqlite:////PATH; default: the one hub.json records, else "
                        "registry.sqlite3 in the state dir")
        add_option(parser, "--registry-password-file", metavar="FILE",
                   help="file whose first line is the PostgreSQL password (else libpq's "
                        "PGPASSWORD, ~/.pgpass or PGPASSFILE)")
        add_flag(parser, "--verbose", help="debug output and tracebacks")
        parser.add_argument("-v", dest="verbose", action="store_true", help="same as --verbose")
    else:
        parser.add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--registry", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--registry-password-file", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def add_actions(parser: argparse.ArgumentParser, dest: str,
                metavar: str = "ACTION") -> "argparse._SubParsersAction[Parser]":
    """The required subcommands of a command (one must be given)."""
    actions = parser.add_subparsers(dest=dest, metavar=metavar, parser_class=Parser)
    actions.required = True
    return actions


def add_command(commands: "argparse._SubParsersAction[Parser]", name: str, help: str,
                description: Optional[str] = None,
                run: "Optional[Callable[[argparse.Namespace, StateDir], int]]" = None,
                ) -> argparse.ArgumentParser:
    """A subcommand with the options every command takes (add_common); `run` is what
    dispatch() calls for it (commands with actions of their own have none)."""
    parser = commands.add_parser(name, help=help, description=description)
    add_common(parser, top=False)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def rate_limit(text: str) -> "Optional[RateLimit]":
    """--rate-limit: N/PERIOD, or off (ValueError otherwise)."""
    from .ratelimit import parse_rate_limit

    return parse_rate_limit(text)


def token_id_prefix(text: str) -> str:
    """A token id (or a prefix of at least 6 hex digits); a usage error otherwise."""
    from .tokens import parse_token_id

    try:
        return parse_token_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_combinations(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot express (UsageError: exit 2, nothing done)."""
    if args.command == "token" and args.token_command == "create" and args.replace and not args.name:
        raise UsageError("--replace needs --name: a replace token re-keys only the one node it names"
                         f" (hint: see '{PROG} token create --help')")


def command_prefix(state: StateDir) -> str:
    """``tinc-hub`` plus ``--state-dir DIR`` when not the default, quoted for a shell."""
    import shlex

    if str(state.root) == DEFAULT_STATE_DIR:
        return PROG
    return f"{PROG} --state-dir {shlex.quote(str(state.root))}"


class InvalidValue(argparse.ArgumentTypeError, ValueError):
    """A bad option value whose message argparse shows as is (a ValueError for add_option)."""


def trusted_proxy(text: str) -> TrustedProxies:
    """--trusted-proxy: IP addresses or CIDR networks, comma-separated."""
    try:
        return TrustedProxies.parse(text)
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None


class AddUp(argparse.Action):
    """A repeatable option whose values add up; given on the command line, it replaces
    (not extends) the default from its environment twin."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, values if current is self.default else current + values)


def sync_interval(text: str) -> int:
    value = int(text)
    if not SYNC_INTERVAL_MIN <= value <= SYNC_INTERVAL_MAX:
        raise ValueError(text)
    return value


def ephemeral_duration(text: str) -> int:
    """--ephemeral: a duration from 10 s to 30 days."""
    from .tokens import parse_duration

    try:
        return parse_duration(text)
    except HubError as exc:  # the parser adds its own hint: one is enough
        raise InvalidValue(f"{exc.message}; {exc.hint}" if exc.hint else exc.message) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Hub of a self-enrolling tinc 1.0 VPN.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_common(parser, top=True)
    commands = add_actions(parser, "command", "COMMAND")

    p = add_command(commands, "init", run=cmd_init, help="set up tinc, the boot service and the hub state",
                            description="Install tinc if missing, write the hub's tinc net, generate "
                                        "its key (never regenerated), register it for boot, start "
                                        "tincd, and create the state dir (hub.json, registry, TLS cert). "
                                        "Re-running with the same arguments changes nothing.")
    add_option(p, "--net", help="tinc net name (directory under the tinc dir); a hub joining a"
                                " net (--registry of its other hubs) takes the registry's")
    add_option(p, "--name", required=True, help="the hub's tinc node name ([A-Za-z0-9_])")
    add_option(p, "--address", required=True, help="public host name or IPv4 address nodes connect to")
    add_option(p, "--vpn-subnet", help="VPN IPv4 prefix; the first hub takes its first address,"
                                       " a hub joining the net the registry's prefix and its lowest"
                                       " free address")
    add_option(p, "--tinc-port", type=int, default=DEFAULT_TINC_PORT, old_env="TINC_HUB_PORT",
               help="tinc port")
    add_deprecated_alias(p, "--port", "--tinc-port", type=int, old_env="TINC_HUB_PORT")
    add_option(p, "--api-port", type=int, default=DEFAULT_API_PORT, help="HTTPS enrolment API port")
    add_option(p, "--key-size", type=int, default=DEFAULT_KEY_SIZE, help="RSA key size for a new key")
    add_option(p, "--init", default="auto", choices=INIT_CHOICES,
               help="boot registration")
    add_option(p, "--tinc-dir", default=DEFAULT_TINC_DIR, help="tinc configuration directory")
    add_flag(p, "--dry-run", help="check the arguments, print what each step would write and "
                                  "run, change nothing")
    add_flag(p, "--no-start", help=argparse.SUPPRESS)  # tests: no boot registration, no tincd start

    p = add_command(commands, "token", help="manage enrolment tokens")
    token_cmds = add_actions(p, "token_command")
    p = add_command(token_cmds, "create", run=cmd_token_create, help="make a token and print the node's one-liner",
                              description="Make an enrolment token (shown once; only its hash is "
                                          "stored) and print the command to run on a node.")
    add_option(p, "--uses", env="TINC_HUB_TOKEN_USES", type=positive_int, default=1,
               help="number of enrolments allowed")
    add_option(p, "--ttl", env="TINC_HUB_TOKEN_TTL", default="1h",
               help="lifetime: 30m, 1h, 2d, 1w or seconds")
    add_option(p, "--name", env="TINC_HUB_TOKEN_NAME", help="only this node name may use the token")
    add_flag(p, "--replace", env="TINC_HUB_TOKEN_REPLACE",
             help="may re-enrol the --name node with a new key (keeps its address; needs --name)")
    add_option(p, "--ephemeral", env="TINC_HUB_TOKEN_EPHEMERAL", type=ephemeral_duration, metavar="DURATION",
               help="nodes it enrols are ephemeral: removed (host files, registry row; name and "
                    "address freed) once offline for DURATION (10s..30d, e.g. 90s, 30m, 2h), never"
                    " while online; for autoscaling groups")
    add_flag(p, "--json", help="print {token, expires_at, command, sudo_command} as JSON")
    add_flag(p, "--cloud-init", env="TINC_HUB_TOKEN_CLOUD_INIT",
             help="print a #cloud-config user data that joins the machine at first boot")
    add_option(p, "--os", env="TINC_HUB_TOKEN_OS", default="ubuntu",
               choices=["ubuntu", "debian", "centos"],
               help="image family of the --cloud-init user data")
    add_flag(p, "--embed", env="TINC_HUB_TOKEN_EMBED",
             help="embed bootstrap.py in the --cloud-init user data (gzip+base64) instead of "
                  "fetching it from the hub with the pinned curl")

    p = add_command(token_cmds, "list", run=cmd_token_list, help="list tokens (id, expiry, uses, status; never the secret)",
                              description="List every token: id (a prefix of the stored hash), "
                                          "created, expires, uses left/total, bound name, replace, "
                                          "revoked, status (active, expired, spent or revoked).")
    add_flag(p, "--json", help="print JSON")
    p = add_command(token_cmds, "revoke", run=cmd_token_revoke, help="revoke a token: it enrols nothing more",
                              description="Revoke a token by its id (or an unambiguous prefix of at "
                                          "least 6 hex digits, see 'token list'): every later request "
                                          "with it is refused (401), replays of its enrolments too. "
                                          "Nodes it enrolled stay enrolled ('revoke NAME' removes one).")
    p.add_argument("token_id", metavar="ID", type=token_id_prefix, help="token id (see 'token list')")

    p = add_command(commands, "serve", run=cmd_serve, help="run the HTTPS enrolment API",
                            description="Serve GET /bootstrap.py, POST /v1/enroll, GET /healthz and "
                                        "GET /openapi.json over HTTPS (self-signed, pinned).")
    add_option(p, "--listen", default="0.0.0.0", help="address to listen on")
    add_option(p, "--api-port", type=int,
               help="port to listen on (default: api_port of hub.json)")
    add_deprecated_alias(p, "--port", "--api-port", type=int)
    add_option(p, "--rate-limit", type=rate_limit, default=DEFAULT_RATE_LIMIT,
               help="enrolment attempts per client address: N/PERIOD (N at once, N more per "
                    "PERIOD; e.g. 600/min, 20/10s), or off; over it the hub answers 429")
    add_option(p, "--trusted-proxy", type=trusted_proxy, default=NO_PROXY, action=AddUp,
               metavar="ADDR[,ADDR]",
               help="a reverse proxy in front of the hub (IP address or CIDR network; repeat or "
                    "comma-separate): only from these peers is X-Forwarded-For believed, for the "
                    "rate limit and the logs. Without it the client is always the TCP peer")
    add_option(p, "--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
               help="open connections in total; more are reset at accept, before TLS")
    add_option(p, "--max-connections-per-address", type=positive_int,
               default=DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
               help="open connections per client IP address (trusted proxies exempt); raise it "
                    "for a fleet enrolling at once from behind one NAT address")
    add_option(p, "--sync-interval", type=sync_interval, default=DEFAULT_SYNC_INTERVAL, metavar="SECONDS",
               help=f"seconds between a node's syncs ({SYNC_INTERVAL_MIN}..{SYNC_INTERVAL_MAX}): "
                    "how soon nodes learn new hubs, names and keys; shorter costs more requests")

    p = add_command(commands, "nodes", run=cmd_nodes, help="list enrolled nodes")
    add_flag(p, "--json", help="print JSON")

    p = add_command(commands, "revoke", run=cmd_revoke, help="revoke a node: remove its host file, SIGHUP tincd",
                            description="Remove hosts/NAME, mark the node revoked and SIGHUP the hub's "
                                        "tincd (it drops the node at once). Its address is never reused "
                                        "unless --release is given (which also frees the name and key).")
    p.add_argument("node", metavar="NAME", help="node name")
    add_flag(p, "--release", help="free the node's address, name and key for reuse")
    add_flag(p, "--revoke-token", help="also revoke the token that enrolled (or last re-keyed) the "
                                       "node, so the machine cannot enrol again under another name")

    p = add_command(commands, "expose", run=cmd_expose, help="publish a node's service on the hub's public address",
                    description="NODE:PORT: publish the node's port on the hub (same port, or --listen), "
                                "kept in the registry and applied with nftables in a table of the hub's own"
                                " (tinc_hub_NET; nothing else on the firewall is touched). The node sees the"
                                " client's own address unless --snat. 'expose list' lists them; 'expose apply'"
                                " re-applies the registry's (boot, other hubs' changes).")
    p.add_argument("target", metavar="NODE:PORT|list|apply", help="the node's service, or list, or apply")
    add_option(p, "--listen", env="TINC_HUB_EXPOSE_LISTEN", metavar="[ADDR:]PORT",
               help="where the hub listens (default: every address of the hub, the node's port)")
    add_option(p, "--proto", env="TINC_HUB_EXPOSE_PROTO", default="tcp", choices=["tcp", "udp"],
               help="protocol")
    add_flag(p, "--snat", env="TINC_HUB_EXPOSE_SNAT",
             help="the node sees the hub's VPN address as the client (for nodes whose tinc-up"
                  " predates exposures; always so on every hub of several but the first)")
    add_flag(p, "--json", help="with list: print JSON")
    p = add_command(commands, "unexpose", run=cmd_unexpose, help="stop publishing a node's service",
                    description="Remove exposure ID (see 'expose list'), or every exposure of NODE:PORT"
                                " (only --proto's when given), and close the port on the hub at once.")
    p.add_argument("exposure", metavar="ID|NODE:PORT", help="exposure id or NODE:PORT")
    p.add_argument("--proto", choices=["tcp", "udp"], default=None, help="only this protocol")

    p = add_command(commands, "hubs", run=cmd_hubs, help="list the hubs of the net",
                    description="Every hub recorded in the registry: name, VPN address, public address,"
                                " tinc and API ports, TLS pin, joined, removed.")
    add_flag(p, "--json", help="print JSON")
    p = add_command(commands, "hub", help="manage the hubs of the net (remove one)")
    hub_cmds = add_actions(p, "hub_command")
    p = add_command(hub_cmds, "remove", run=cmd_hub_remove, help="retire a hub: the other hubs and the nodes drop it",
                    description="Mark hub NAME removed in the registry. Every other hub removes its host"
                                " file and ConnectTo line within seconds, nodes at their next sync; its"
                                " name, VPN address and key are never reused. Run it on another hub;"
                                " then stop the removed machine's tincd and API.")
    p.add_argument("hub", metavar="NAME", help="hub name (see 'tinc-hub hubs')")

    p = add_command(commands, "rotate-key", run=cmd_rotate_key,
                    help="give this hub a new tinc key (with other hubs: no node<->node outage)",
                    description="Run as root on the hub whose key changes. Stages a new RSA key (the"
                                " current size) beside rsa_key.priv, publishes its public key in the"
                                " registry (the other hubs and the nodes learn it without dropping"
                                " their connections), waits until every node has synced, then installs"
                                " it and restarts this hub's tincd. Refuses when no other hub is active"
                                " and connected (nodes would lose the VPN), unless --force. A re-run"
                                " after an interruption finishes the rotation.")
    add_option(p, "--wait", env="TINC_HUB_ROTATE_WAIT", type=non_negative_int, metavar="SECONDS",
               help="seconds from publishing the new key to switching to it (default: 2 x"
                    " --sync-interval + 10)")
    add_option(p, "--sync-interval", type=sync_interval, default=DEFAULT_SYNC_INTERVAL, metavar="SECONDS",
               help="the nodes' sync interval: what the hubs' 'serve --sync-interval' says")
    add_flag(p, "--force", env="TINC_HUB_ROTATE_FORCE",
             help="rotate even with no other hub active and connected: every node loses the VPN"
                  " while tincd restarts (5 s or more), a node that has not synced until it does")

    p = add_command(commands, "registry", help="the registry database (copy to PostgreSQL)")
    registry_cmds = add_actions(p, "registry_command")
    p = add_command(registry_cmds, "copy", run=cmd_registry_copy, help="copy every token and node into an empty PostgreSQL registry",
                    description="Copy every token and node (revoked ones too) and the schema version "
                                "from this hub's registry into an EMPTY registry at --to, under the "
                                "registry write lock; read everything back and compare; then record --to "
                                "(and --to-password-file) in hub.json, so that every later command and the "
                                "restarted API use it. Stop the API service first: it keeps the old "
                                "registry open until restarted (the copy refuses while it runs).")
    add_option(p, "--to", env="TINC_HUB_REGISTRY_COPY_TO", required=True, metavar="URL",
               help="the target: postgresql://USER@HOST[:PORT]/DB (no password in it)")
    add_option(p, "--to-password-file", env="TINC_HUB_REGISTRY_COPY_TO_PASSWORD_FILE", metavar="FILE",
               help="file whose first line is the target's password (else libpq's PGPASSWORD, "
                    "~/.pgpass or PGPASSFILE)")
    add_flag(p, "--no-switch", env="TINC_HUB_REGISTRY_COPY_NO_SWITCH",
             help="copy and verify only; leave hub.json as it is")

    p = add_command(commands, "backup", run=cmd_backup, help="write the whole hub to one file (holds secrets)",
                    description="Write everything this hub needs to FILE (mode 0600, atomically): "
                                "hub.json, the TLS key and certificate (nodes pin them), the net's tinc"
                                " directory (its private key, hosts/), and a SQLite registry (an online,"
                                " consistent copy); a PostgreSQL registry is not in it (pg_dump it). "
                                "'-' writes to stdout. The file holds private keys: keep it like one.")
    p.add_argument("file", metavar="FILE", help="the backup file to write, or - for stdout")
    add_flag(p, "--force", env="TINC_HUB_BACKUP_FORCE", help="replace an existing FILE")
    p = add_command(commands, "restore", run=cmd_restore, help="bring a hub back from a backup file",
                    description="On a fresh machine with the old hub's public address: check FILE"
                                " strictly, write its hub.json, TLS key and certificate, registry, tinc"
                                " key and hosts/, then do what init does (install tinc, write the net,"
                                " boot service, start tincd and the API). Nodes come back by"
                                " themselves; tokens made before the backup work. '-' reads stdin.")
    p.add_argument("file", metavar="FILE", help="the file 'tinc-hub backup' wrote, or - for stdin")
    add_flag(p, "--force", env="TINC_HUB_RESTORE_FORCE",
             help="replace this machine's hub state (the old files are kept as NAME.replaced-TIME)")
    add_flag(p, "--no-start", env="TINC_HUB_RESTORE_NO_START", help=argparse.SUPPRESS)  # tests

    p = add_command(commands, "names", help="NAME.NET of every hub and node in /etc/hosts")
    names_cmds = add_actions(p, "names_command")
    p = add_command(names_cmds, "apply", run=cmd_names_apply,
                    help="write names.json of the state dir as the net's block of /etc/hosts",
                    description="Run by tinc-hub-names.service (as root) whenever the API rewrites"
                                " names.json: every name is checked again against --net and"
                                " --vpn-subnet, which come from the unit, not from the state dir.")
    add_option(p, "--net", required=True, help="the net (the block's name and the domain)")
    add_option(p, "--vpn-subnet", required=True, help="the VPN prefix every address must be in")
    return parser


# -- commands ---------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace, state: StateDir) -> int:
    from .hub_init import InitRequest, dry_run_init, run_init

    request = InitRequest(
        net=args.net, name=args.name, address=args.address, vpn_subnet=args.vpn_subnet,
        port=args.tinc_port, api_port=args.api_port, key_size=args.key_size, init=args.init,
        tinc_dir=args.tinc_dir, start=not args.no_start, registry=args.registry,
        registry_password_file=args.registry_password_file)
    if args.dry_run:
        dry_run_init(state, request)
        print(f"{PROG}: dry run: nothing was changed", file=sys.stderr)
        return EXIT_OK
    result = run_init(state, request)
    cfg = result.config
    print(f"hub {cfg.name!r} of net {cfg.net!r}: VPN {cfg.vpn_subnet}, hub address {cfg.hub_address}")
    print(f"tinc: {cfg.address}:{cfg.port} (boot: {cfg.init}; tincd {result.tincd})")
    print(f"API:  https://{cfg.address}:{cfg.api_port}  pin {result.pin}")
    print("changed: " + (", ".join(result.changed) if result.changed else "nothing"))
    for note in result.notes:
        print(f"note: {note}")
    prefix = "tinc-hub" if str(state.root) == DEFAULT_STATE_DIR else f"tinc-hub --state-dir {state.root}"
    if result.api_service:
        print(f"API service: {result.api_service} (enabled, running; log: journalctl -u {result.api_service})")
        print(f"next: run '{prefix} token create'")
    else:
        print(f"next: run '{prefix} serve' (keep it running), then '{prefix} token create'")
    return EXIT_OK


def _registry(state: StateDir, args: argparse.Namespace, keep_connections: bool = False):
    """The registry of --registry / hub.json / the state dir, migrated to this code's schema
    (a registry made by an older tinc-hub is upgraded in place; a newer one is refused)."""
    from .registry import Registry

    state.load_config()  # fail early with a hint when init was never run
    registry = Registry.for_state(state, args.registry, args.registry_password_file, keep_connections)
    registry.upgrade_schema()
    return registry


def cmd_token_create(args: argparse.Namespace, state: StateDir) -> int:
    from .tls import pin_of_cert_file
    from .tokens import check_printable, create_token, parse_ttl, sudo_join_command

    config = state.load_config()
    pin = pin_of_cert_file(state.cert_file)
    check_printable(config, pin)  # before the token is stored: a refusal writes nothing
    issued = create_token(config, _registry(state, args), pin,
                          uses=args.uses, ttl=parse_ttl(args.ttl), name=args.name,
                          allow_replace=args.replace, ephemeral_seconds=args.ephemeral)
    if args.cloud_init:
        from .cloud_init import render_user_data, size_note

        user_data = render_user_data(config, pin, issued.token,
                                     issued.expires_at_iso, os_name=args.os, embed=args.embed)
        sys.stdout.write(user_data)
        print(f"{PROG}: {size_note(user_data)[1]}", file=sys.stderr)
        return EXIT_OK
    if args.json:
        print(json.dumps({"token": issued.token, "expires_at": issued.expires_at_iso,
                          "command": issued.command,
                          "sudo_command": sudo_join_command(config, pin, issued.token)}))
        return EXIT_OK
    limits = [f"{issued.uses} use" + ("s" if issued.uses != 1 else ""),
              f"expires {issued.expires_at_iso}"]
    if issued.bound_name:
        limits.append(f"only for node {issued.bound_name!r}")
    if issued.allow_replace:
        limits.append("may replace an enrolled node's key")
    if issued.ephemeral_seconds is not None:
        from .ephemeral import describe_duration

        limits.append(f"ephemeral: its nodes are removed after {describe_duration(issued.ephemeral_seconds)}"
                      " offline")
    print(f"token ({', '.join(limits)}; shown only once):")
    print(issued.token)
    print()
    print("run on the node as root:")
    print(issued.command)
    print()
    print("or as a user with sudo rights (the token goes through a private temporary file,"
          " never through sudo's command line, environment or log):")
    print(sudo_join_command(config, pin, issued.token))
    return EXIT_OK


def print_rows(rows: List[Dict[str, Any]], as_json: bool, empty: str, header: Sequence[str],
               cells: Callable[[Dict[str, Any]], Sequence[str]]) -> int:
    """A listing: JSON (one row per line), or a table of aligned columns (or one line when
    there is nothing)."""
    from .listing import json_listing, table_listing

    if as_json:
        sys.stdout.write(json_listing(rows))
    elif rows:
        sys.stdout.write(table_listing(header, map(cells, rows)))
    else:
        print(empty)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace, state: StateDir) -> int:
    from .ephemeral import describe_duration
    from .tokens import list_tokens

    rows = list_tokens(_registry(state, args))
    return print_rows(rows, args.json, "no tokens",
                      ("ID", "CREATED", "EXPIRES", "USES", "NAME", "REPLACE", "EPHEMERAL", "REVOKED",
                       "STATUS"),
                      lambda r: (r["id"], r["created_at"], r["expires_at"],
                                 f"{r['uses_left']}/{r['uses_total']}", r["name"] or "-",
                                 "yes" if r["replace"] else "no",
                                 describe_duration(r["ephemeral"]) if r["ephemeral"] else "-",
                                 r["revoked_at"] or "-", r["status"]))


def cmd_token_revoke(args: argparse.Namespace, state: StateDir) -> int:
    from .registry import iso_utc
    from .tokens import revoke_token

    token, changed = revoke_token(_registry(state, args), args.token_id)
    if changed:
        print(f"token {token.id} revoked ({token.uses_left} of {token.uses_total} uses were left);"
              " nodes it enrolled stay enrolled")
    else:
        print(f"token {token.id} already revoked at {iso_utc(token.revoked_at)}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, state: StateDir) -> int:
    from .app import serve

    # The log format (configure_logging) shows no caller, thread or process: the logging
    # HOWTO's "Optimization" switches skip finding them for each of the API's log lines
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    return serve(state, registry_url=args.registry, registry_password_file=args.registry_password_file,
                 listen=args.listen, port=args.api_port, rate_limit=args.rate_limit,
                 trusted_proxies=args.trusted_proxy, max_connections=args.max_connections,
                 max_connections_per_address=args.max_connections_per_address,
                 sync_interval=args.sync_interval)


def cmd_nodes(args: argparse.Namespace, state: StateDir) -> int:
    import gc

    # 50,000 rows of tuples and dicts and as many liveness records, no cycles: the collector's
    # passes over them were ~15% of the listing's CPU
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _list_nodes(args, state)
    finally:
        if enabled:
            gc.enable()


def _list_nodes(args: argparse.Namespace, state: StateDir) -> int:
    from .listing import node_json_listing, node_rows
    from .liveness import read_liveness, tincd_running, tincd_started
    from .registry_read import listed_nodes_sqlite
    from .registry_url import registry_url_of_state

    config = state.load_config()
    # SQLite at this schema: read without importing SQLAlchemy (a third of the time at 50,000
    # nodes); anything else through the Registry, which upgrades, refuses or reports
    listed = listed_nodes_sqlite(registry_url_of_state(state, args.registry, args.registry_password_file))
    if listed is None:
        with _registry(state, args).reading() as view:
            listed = view.listed_nodes()
    seen, hub_running, now = read_liveness(state.root), tincd_running(config.net), int(time.time())
    started = tincd_started(config.net)
    if args.json:  # the lines straight from the registry's tuples, no rows (a third of the time)
        sys.stdout.write(node_json_listing(listed, seen, hub_running, started, now))
        return EXIT_OK
    rows = node_rows(listed, seen, hub_running, started, now)
    return print_rows(rows, args.json, "no nodes enrolled",
                      ("NAME", "ADDRESS", "ENROLLED", "REVOKED", "ONLINE", "LAST SEEN", "EPHEMERAL"),
                      lambda r: (r["name"], r["address"], r["enrolled_at"], r["revoked_at"] or "-",
                                 "yes" if r["online"] else "no", r["last_seen"] or "never",
                                 "-" if r["expires"] is None else
                                 "online" if r["expires"] == "online" else
                                 "paused (hub tincd down)" if r["expires"] == "paused" else
                                 f"removed at {r['expires']}"))


def cmd_revoke(args: argparse.Namespace, state: StateDir) -> int:
    from .hostfiles import remove_if_present
    from .registry import iso_utc
    from .reload import send_sighup
    from .roster import hub_kind_guard

    config = state.load_config()
    registry = _registry(state, args)
    with registry.exclusive():
        now = int(time.time())  # under the lock: no enrolment it allowed is dated after it
        with registry.transaction() as tx:
            node = tx.get_node(args.node)
            if node is None:
                raise HubError(f"no enrolled node named {args.node!r}",
                               "see 'tinc-hub nodes'; a host file tinc-hub did not write must be removed by hand")
            hub_kind_guard(node.kind, node.name)
            tx.mark_revoked(node.name, now)
            exposures_removed = tx.delete_exposures_of(node.name)
            if args.release:
                from .registry import Tombstone

                tx.delete_node(node.name)  # the other hubs remove its host file by the tombstone
                tx.add_tombstone(Tombstone(node.name, node.credential_sha256, now, None))
            token = tx.get_token(node.token_sha256)
            token_revoked = bool(args.revoke_token and token is not None
                                 and tx.revoke_token(token.secret_sha256, now))
        removed = remove_if_present(config.hosts_dir / node.name)
    signalled = send_sighup(config.net, config.tinc_dir)
    if exposures_removed:
        from .exposure import apply_now

        apply_now(state, registry)
        print(f"{exposures_removed} exposure(s) of {node.name} removed and closed on this hub")
    what = "revoked" if not node.revoked else "already revoked"
    print(f"{node.name} ({node.address}) {what}" + ("; address, name and key released" if args.release else "")
          + ("; host file removed" if removed else "")
          + (f"; token {token.id} revoked" if token_revoked and token is not None else ""))
    # A token bound to this (now revoked) name enrols nothing more, unless --release freed it.
    bound_here = token is not None and token.bound_name == node.name and not args.release
    if not args.revoke_token and token is not None and token.can_enrol(now) and not bound_here:
        print(f"{PROG}: warning: token {token.id}, which enrolled {node.name}, can still enrol "
              f"{token.uses_left} more node(s) until {iso_utc(token.expires_at)} "
              f"(hint: end it with '{command_prefix(state)} token revoke {token.id}')", file=sys.stderr)
    if not signalled:
        print(f"{PROG}: warning: could not SIGHUP tincd of net {config.net!r}: "
              "the node stays connected until tincd reloads (hint: is tincd running?)", file=sys.stderr)
    return EXIT_OK


def describe_exposure(row: Any) -> str:
    listen = f"{row.listen_address or '*'}:{row.listen_port}"
    return (f"{row.proto} {listen} -> {row.node_name} {row.node_address}:{row.node_port}"
            + (" (source NAT)" if row.snat else ""))


def cmd_expose(args: argparse.Namespace, state: StateDir) -> int:
    from . import exposure

    if args.target in ("list", "apply") and (args.listen or args.snat):
        raise UsageError(f"--listen and --snat go with NODE:PORT, not '{args.target}'")
    if args.json and args.target != "list":
        raise UsageError("--json goes with 'expose list'")
    registry = _registry(state, args)
    if args.target == "list":
        with registry.reading() as view:
            rows = [exposure.listing(r) for r in view.list_exposures()]
        return print_rows(rows, args.json, "nothing exposed",
                          ("ID", "PROTO", "LISTEN", "NODE", "TARGET", "SNAT", "CREATED"),
                          lambda r: (str(r["id"]), r["proto"],
                                     f"{r['listen_address'] or '*'}:{r['listen_port']}",
                                     r["node"] + (" (revoked)" if r["node_revoked"] else ""),
                                     f"{r['node_address']}:{r['node_port']}",
                                     "yes" if r["snat"] else "no", r["created_at"]))
    if args.target == "apply":
        ruleset = exposure.apply_now(state, registry)
        print("exposure rules applied" + ("" if ruleset.forwarding else " (nothing published)"))
        return EXIT_OK
    row = exposure.add_exposure(state, registry, args.target, args.listen, args.proto, args.snat,
                                int(time.time()))
    print(f"exposure {row.id}: {describe_exposure(row)}")
    return EXIT_OK


def cmd_unexpose(args: argparse.Namespace, state: StateDir) -> int:
    from .exposure import remove_exposures

    for row in remove_exposures(state, _registry(state, args), args.exposure, args.proto):
        print(f"exposure {row.id} removed: {describe_exposure(row)}")
    return EXIT_OK


def hub_listing(hub: Any) -> Dict[str, Any]:
    from .registry import iso_utc

    return {"name": hub.name, "address": hub.address, "public_address": hub.public_address,
            "tinc_port": hub.tinc_port, "api_port": hub.api_port, "pin": hub.tls_pin,
            "joined_at": iso_utc(hub.joined_at), "removed": hub.removed,
            "removed_at": iso_utc(hub.removed_at)}


def cmd_names_apply(args: argparse.Namespace, state: StateDir) -> int:
    import ipaddress

    from bootstrap import bootstrap
    from .names import apply_names_file

    if not bootstrap.NET_RE.fullmatch(args.net):
        raise HubError(f"--net {args.net!r} is not a net name")
    try:
        ipaddress.IPv4Network(args.vpn_subnet)
    except ValueError:
        raise HubError(f"--vpn-subnet {args.vpn_subnet!r} is not an IPv4 prefix") from None
    try:
        changed, problems = apply_names_file(state.root, args.net, args.vpn_subnet)
    except (OSError, ValueError) as exc:
        raise HubError(f"names not written: {exc}", "see the tinc-hub API's log") from None
    for problem in problems:
        print(f"{PROG}: warning: names: {_one_line(problem)}", file=sys.stderr)
    if changed:
        print(f"{PROG}: names of net {args.net} written to /etc/hosts", file=sys.stderr)
    return 0


def cmd_hubs(args: argparse.Namespace, state: StateDir) -> int:
    registry = _registry(state, args)
    with registry.reading() as view:
        rows = [hub_listing(h) for h in view.list_hubs()]
    return print_rows(rows, args.json, "no hub recorded yet (a hub records itself at init and serve)",
                      ("NAME", "ADDRESS", "PUBLIC", "TINC", "API", "JOINED", "REMOVED"),
                      lambda r: (r["name"], r["address"], r["public_address"], str(r["tinc_port"]),
                                 str(r["api_port"]), r["joined_at"], r["removed_at"] or "-"))


def cmd_hub_remove(args: argparse.Namespace, state: StateDir) -> int:
    from .roster import remove_hub

    config = state.load_config()
    hub = remove_hub(_registry(state, args), args.hub, config.name)
    print(f"hub {hub.name} ({hub.address}, {hub.public_address}) removed; the other hubs drop it within"
          " seconds, nodes at their next sync")
    print(f"next: stop tincd and the API on {hub.public_address}")
    return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace, state: StateDir) -> int:
    from .key_rotation import HubKeyRotation

    rotation = HubKeyRotation(state, _registry(state, args), args.sync_interval, wait=args.wait,
                              force=args.force,
                              say=lambda line: print(line, flush=True),
                              warn=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
    rotation.run()
    return EXIT_OK


def cmd_registry_copy(args: argparse.Namespace, state: StateDir) -> int:
    from .registry_copy import copy_registry

    source = _registry(state, args)
    result = copy_registry(state, source, args.to, args.to_password_file, switch=not args.no_switch)
    print(f"copied {result.tokens} token(s) and {result.nodes} node(s) ({result.revoked_nodes} revoked),"
          f" schema {result.revision}, {result.exposures} exposure(s), from {source.describe()} to"
          f" {result.target}; counts verified")
    if result.switched:
        print(f"hub.json now names {result.target}"
              + (f" and its password file {args.to_password_file}" if args.to_password_file else "")
              + ": every tinc-hub command uses it from now on")
        print("next: restart the API service (e.g. 'systemctl restart' its unit, or the"
              f" '{command_prefix(state)} serve' you run) so that it uses it too; keep"
              f" {source.describe()} as a backup")
    else:
        print(f"hub.json unchanged; to use it, pass --registry {result.target} (env TINC_HUB_REGISTRY)"
              " or re-run without --no-switch on an empty target")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace, state: StateDir) -> int:
    from .backup import make_backup

    result = make_backup(state, args.file, args.force, args.registry, args.registry_password_file)
    where = "stdout" if result.path == "-" else result.path
    print(f"{PROG}: warning: the backup holds SECRETS (the tinc private key, the TLS key): keep"
          " it as safe as the hub itself", file=sys.stderr)
    print(f"{PROG}: {result.registry}", file=sys.stderr)
    for path in result.left_out:
        print(f"{PROG}: note: not in the backup: {path}", file=sys.stderr)
    print(f"{PROG}: backup of {result.members} files, {result.size} bytes, written to {where}"
          " (mode 0600)", file=sys.stderr)
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, state: StateDir) -> int:
    from .backup import NOT_INCLUDED, restore_backup

    result = restore_backup(state, args.file, args.force, start=not args.no_start,
                            registry_url=args.registry,
                            registry_password_file=args.registry_password_file)
    cfg, manifest = result.config, result.manifest
    print(f"restored hub {cfg.name!r} of net {cfg.net!r} from the backup of"
          f" {manifest['created_at']} (tinc-hub {manifest['tinc_hub_version']}, schema"
          f" {manifest['schema_revision']}" + (f", upgraded to {result.schema_upgraded[-1]}"
                                                if result.schema_upgraded else "") + ")")
    print(f"tinc: {cfg.address}:{cfg.port} (boot: {cfg.init}; tincd {result.tincd})")
    print(f"API:  https://{cfg.address}:{cfg.api_port}  pin {result.pin}")
    print(f"registry: {result.registry}")
    for path in result.moved_aside:
        print(f"kept the replaced file as {path}")
    print("not restored: " + "; ".join(NOT_INCLUDED))
    if result.api_service:
        print(f"API service: {result.api_service} (enabled, running)")
    elif not args.no_start:
        print(f"next: run '{command_prefix(state)} serve' (keep it running)")
    print("nodes reconnect by themselves (tinc retries at most every 30 s)")
    return EXIT_OK


def dispatch(args: argparse.Namespace) -> int:
    """Run the command build_parser() chose (each leaf parser names its function)."""
    run = getattr(args, "run", None)
    if run is None:
        raise UsageError(f"unknown command {getattr(args, 'command', None)!r}")
    return run(args, StateDir(args.state_dir))


def configure_logging(verbose: bool) -> None:
    """Log lines (the API's access and audit lines, warnings) to stderr: journald under systemd.
    Here, not in app.py, so that admin commands never import the web server."""
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:  # Alembic tells every migration step at INFO: the result line says enough
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tinc-hub``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        check_combinations(args)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "deprecated_env", None):
        print(f"{PROG}: warning: {args.deprecated_env}", file=sys.stderr)
    verbose = bool(getattr(args, "verbose", False))
    configure_logging(verbose)
    try:
        from bootstrap import bootstrap

        bootstrap.REPORT.verbose = verbose
    except Exception:  # pragma: no cover - bootstrap.py missing from a broken install
        pass
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure ends as one line; traceback only with -v
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def describe_error(exc: BaseException) -> str:
    """One line: the message and a hint."""
    hint = getattr(exc, "hint", None)
    if isinstance(exc, HubError):
        return _one_line(str(exc))
    if isinstance(exc, PermissionError):
        message, hint = f"permission denied: {exc.filename or exc}", hint or "run as root (sudo)"
    elif isinstance(exc, sqlite3.Error):  # only raw sqlite3 code: the registry raises RegistryError
        message, hint = f"registry error: {exc}", hint or "is the state dir writable and not corrupted?"
    elif isinstance(exc, OSError):
        message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        message = str(exc) or type(exc).__name__
    hint = hint or "re-run with -v for details"
    return _one_line(f"{message} (hint: {hint})")


if __name__ == "__main__":
    sys.exit(main())
