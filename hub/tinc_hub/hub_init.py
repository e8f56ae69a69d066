"""``tinc-hub init``: set up the hub's tinc net, boot service and the hub state directory.

Distro, init-system and tincd knowledge comes from the shared ``bootstrap.bootstrap`` module
(the node's bootstrap.py); this module only decides what the hub's files say. Re-running
with the same arguments changes nothing (same bytes, same mtimes).
"""

import ipaddress
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bootstrap import bootstrap
from .errors import HubError
from .exposure import claims_default_route, render_tinc_up_guard
from .names import NAMES_PATH_UNIT
from .service import (EXPOSE_NFT_UNIT, EXPOSE_PATH_UNIT, EXPOSE_UNIT, UNIT_NAME, apply_service,
                      installed_executable, read_expose_plan, read_names_units_plan,
                      read_service_plan, render_unit)
from .liveness import render_host_script
from .registry import SCHEMA_REVISION, HubRow, Registry
from .roster import (HUB_CONF_MARKER, HUB_PEERS_FILE, NetSettings, active_hubs, check_settings,
                     allocate_address, hub_host_files_for, hub_row, read_net_settings,
                     register_hub, render_hub_peers_conf, render_hub_tinc_conf,
                     HUB_UDP_RCVBUF)
from .state import DEFAULT_TINC_PORT, HubConfig, StateDir
from .tls import ensure_cert, pin_of_cert_file
from .udp_buffer import apply_rmem_max, plan_rmem_max, read_rmem_max

log = logging.getLogger("tinc_hub.init")


@dataclass(frozen=True)
class InitRequest:
    net: Optional[str]  # None: the registry's (a hub joining a net)
    name: str
    address: str
    vpn_subnet: Optional[str]  # None: the registry's
    port: int = DEFAULT_TINC_PORT
    api_port: int = bootstrap.DEFAULT_API_PORT
    key_size: int = bootstrap.DEFAULT_KEY_SIZE
    init: str = "auto"
    tinc_dir: str = bootstrap.DEFAULT_TINC_DIR
    start: bool = True  # False: hidden --no-start (tests): no boot registration, no tincd start
    registry: Optional[str] = None  # --registry URL (else hub.json's, else the SQLite file)
    registry_password_file: Optional[str] = None


@dataclass(frozen=True)
class InitResult:
    config: HubConfig
    pin: str
    changed: List[str]
    tincd: str  # what happened to tincd: started / running / restarted / not started
    notes: List[str]  # things the admin should know (kept key size, changed API port...)
    api_service: Optional[str] = None  # the systemd unit that runs `tinc-hub serve`, if any


def validate_request(req: InitRequest) -> ipaddress.IPv4Network:
    """Check the arguments; return the VPN network."""
    if not bootstrap.NET_RE.fullmatch(req.net):
        raise HubError(f"invalid net name {req.net!r}", "use letters, digits, _ . and - (max 64)")
    if not bootstrap.valid_node_name(req.name):
        raise HubError(f"invalid hub name {req.name!r}", "tinc names use only A-Z a-z 0-9 _ (max 64)")
    address = req.address.strip()
    try:
        is_ipv6 = isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address)
    except ValueError:
        is_ipv6 = False
    if is_ipv6:
        raise HubError("--address must be an IPv4 address or a host name (the net uses AddressFamily = ipv4)")
    problem = bootstrap.host_problem(address)  # what reaches tinc files, URLs, shell lines, YAML
    if problem:
        raise HubError(f"invalid --address {req.address!r}: {problem}",
                       "give the public host name (RFC 1123) or IPv4 address nodes connect to")
    try:
        network = ipaddress.IPv4Network(req.vpn_subnet, strict=False)
    except ValueError:
        raise HubError(f"invalid --vpn-subnet {req.vpn_subnet!r}", "use an IPv4 CIDR such as 10.0.0.0/24") from None
    if not 1 <= network.prefixlen <= 30:
        raise HubError(f"--vpn-subnet {network} is unusable", "use a prefix length between /1 and /30")
    for label, port in (("--tinc-port", req.port), ("--api-port", req.api_port)):
        if not 0 < port < 65536:
            raise HubError(f"invalid {label} {port}")
    if req.key_size < 2048:
        raise HubError(f"--key-size {req.key_size} is too small", f"use 2048 or more ({bootstrap.DEFAULT_KEY_SIZE} is the default)")
    if req.init not in bootstrap.INIT_CHOICES:
        raise HubError(f"invalid --init {req.init!r}", "use one of " + ", ".join(bootstrap.INIT_CHOICES))
    return network


def render_hub_host_file(config: HubConfig, public_pem: str) -> str:
    """The host file of a hub alone in its net (what nodes keep of any hub)."""
    return hub_host_files_for(config.name, [hub_row(config, public_pem, "")], config.network)[config.name]


def check_existing(state: StateDir, new: HubConfig, registry: Registry,
                   tinc_conf: str, other_hubs: int = 0) -> Optional[HubConfig]:
    """Compare with an earlier init; refuse unsafe changes. Returns the old config, if any.
    With other hubs in the net, the public address and tinc port may change: nodes learn the
    new ones from another hub at their next sync."""
    conf_path = Path(new.tinc_dir) / new.net / "tinc.conf"
    if not state.exists():
        text = bootstrap.read_text(str(conf_path))
        if text is not None and text != tinc_conf:
            if text.startswith(HUB_CONF_MARKER):
                raise HubError(f"{conf_path} was written by an earlier 'tinc-hub init' with other"
                               f" arguments, but {state.config_file} does not exist",
                               "use the original --state-dir, or move the net directory away")
            raise HubError(f"{conf_path} exists and was not written by tinc-hub",
                           "move it away, or use another --net")
        return None
    old = state.load_config()
    if old == new:
        return old
    for field in ("net", "name", "tinc_dir"):
        if getattr(old, field) != getattr(new, field):
            raise HubError(
                f"{state.config_file} belongs to net {old.net!r} hub {old.name!r} in {old.tinc_dir};"
                f" refusing to change {field} to {getattr(new, field)!r}",
                "use another --state-dir for another net, or re-run with the original arguments")
    nodes = 0
    if registry.exists():
        with registry.reading() as view:
            nodes = view.count_nodes()
    for field in ("vpn_subnet", "address", "port"):
        if field != "vpn_subnet" and other_hubs:
            continue
        if getattr(old, field) != getattr(new, field) and nodes:
            raise HubError(
                f"refusing to change {field} from {getattr(old, field)!r} to {getattr(new, field)!r}:"
                f" {nodes} node(s) are enrolled with the old value",
                "re-run with the original arguments (see hub.json)")
    if old.init != new.init and old.init != "none":
        raise HubError(f"refusing to change the boot registration from {old.init!r} to {new.init!r}",
                       f"re-run with --init {old.init}, or remove the old registration and hub.json's init")
    return old


class HubInit:
    """``tinc-hub init`` as a list of steps (bootstrap.Step, run by bootstrap.run_steps): the
    dry run prints the plans that a real run applies. Checks come first, in __init__."""

    def __init__(self, state: StateDir, req: InitRequest, dry_run: bool = False) -> None:
        # --registry, else hub.json's registry, else the SQLite file
        self.registry = Registry.for_state(state, req.registry, req.registry_password_file)
        self.old_config = old_config = state.load_config() if state.exists() else None
        self.net_settings, self.hubs = self.read_registry(dry_run)
        req = self.settle_net(req, old_config)
        network = validate_request(req)
        check_settings(self.net_settings, req.net, str(network), self.registry.describe())
        self.state, self.req, self.dry_run = state, req, dry_run
        self.facts = bootstrap.detect_system()
        old_init = old_config.init if old_config else None
        if req.start:
            init = bootstrap.resolve_init(req.init, self.facts)  # PID 1 and family, not tinc
        else:
            init = old_init or "none"  # hidden --no-start (tests) never changes the boot choice
        known = {h.name: h for h in self.hubs}.get(req.name)
        others = [h for h in active_hubs(self.hubs) if h.name != req.name]
        # a hub keeps its address; the first hub of a net takes the first one; a hub joining
        # a net the lowest free one (allocated again under the write lock at registration)
        self.joining = known is None and bool(others) and old_config is None
        if known is not None:
            hub_address = known.address
        elif old_config is not None:
            hub_address = old_config.hub_address
        elif self.joining:
            hub_address = self.preview_address(network) or str(network.network_address + 1)
        else:
            hub_address = str(network.network_address + 1)
        if req.registry is not None:
            registry_url, password_file = self.registry.describe(), (
                os.path.abspath(req.registry_password_file) if req.registry_password_file else None)
            if self.registry.dialect == "sqlite":
                registry_url, password_file = None, None  # the state dir's file (or given path)
                if self.registry.db_path != state.registry_file:
                    registry_url = req.registry
        else:  # kept: 'registry copy' set them
            registry_url = old_config.registry if old_config else None
            password_file = old_config.registry_password_file if old_config else None
        self.config = config = HubConfig(
            net=req.net, name=req.name, address=req.address.strip(), port=req.port,
            api_port=req.api_port, vpn_subnet=str(network), hub_address=hub_address,
            tinc_dir=os.path.normpath(req.tinc_dir), init=init,
            registry=registry_url, registry_password_file=password_file)
        if req.start and config.init == "systemd":  # refuse what the unit cannot carry, first
            render_unit(config, installed_executable(), str(state.root),
                        bootstrap.service_unit(self.facts, config.net))
        old = check_existing(state, config, self.registry, self.tinc_conf(), len(others))
        self.notes: List[str] = []
        if old is not None and old.api_port != config.api_port:
            self.notes.append(f"API port changed from {old.api_port}: tokens made before still name the old port")
        if old is not None and old.address != config.address:
            self.notes.append(f"address changed from {old.address!r}: tokens made before still name the old one")
        if old is not None and (old.address, old.port) != (config.address, config.port) and others:
            self.notes.append("the other hubs and the nodes follow the new address and port by themselves"
                              " (nodes at their next sync, within 2 minutes; a node that joined before"
                              " sync existed: re-run its one-liner)")
        self.changed: List[str] = []
        self.public_pem = "<public key>"  # until the key step (a dry run keeps it)
        self.tinc_changed = True  # a dry run cannot know: it shows the restart
        self.rmem_raised = False  # tincd sizes its UDP buffer at start: restart it after
        self.tincd_state = bootstrap.TincdState()
        self.tincd = "not started (--no-start)"
        self.api_service: Optional[str] = None

    def read_registry(self, dry_run: bool) -> "tuple[Optional[NetSettings], List[HubRow]]":
        """The net's settings and hubs, when the registry exists (else None and none). A dry
        run does not upgrade an older registry (it reads no hubs from it)."""
        if self.registry.dialect == "sqlite" or not self.registry.exists():
            # a SQLite registry serves one hub: nothing to join. Not opened either: opening a
            # WAL database touches its directory, and a re-run of init changes nothing. Only
            # its schema version is read, as immutable: a newer one is refused before any step.
            self.registry.refuse_newer_schema()
            return None, []
        if self.registry.schema_revision() != SCHEMA_REVISION:
            if dry_run:
                self.registry.refuse_newer_schema()  # an older one: the real run upgrades it
                return None, []
            self.registry.upgrade_schema()
        with self.registry.snapshot() as view:
            return read_net_settings(view), view.list_hubs()

    def settle_net(self, req: InitRequest, old: Optional[HubConfig]) -> InitRequest:
        """--net and --vpn-subnet: given, or the registry's (a hub joining), or hub.json's."""
        found = self.net_settings
        if found is not None:
            return replace(req, net=req.net or found.net, vpn_subnet=req.vpn_subnet or found.vpn_subnet)
        if old is not None:
            return replace(req, net=req.net or old.net, vpn_subnet=req.vpn_subnet or old.vpn_subnet)
        if req.net is None or req.vpn_subnet is None:
            raise HubError(f"registry {self.registry.describe()} holds no net yet: --net and"
                           " --vpn-subnet are needed for the first hub",
                           "give them, or the --registry of the net this hub joins")
        return req

    def preview_address(self, network: ipaddress.IPv4Network) -> Optional[str]:
        with self.registry.reading() as view:
            address = allocate_address(network, view.used_address_ints())
        return str(address) if address is not None else None

    def other_hubs(self) -> List[HubRow]:
        return [h for h in active_hubs(self.hubs) if h.name != self.config.name]

    def tinc_conf(self) -> str:
        config = self.config
        return render_hub_tinc_conf(config.name, config.net, config.port)

    def hub_files(self) -> Dict[str, str]:
        """hosts/ files of every hub as this hub sees them (itself included)."""
        me = hub_row(self.config, self.public_pem, "")
        return hub_host_files_for(self.config.name, self.other_hubs() + [me], self.config.network,
                                  claim=claims_default_route(self.config.hub_host_file))

    def steps(self) -> List[bootstrap.Step]:
        config, start = self.config, self.req.start
        steps = [
            bootstrap.Step(lambda: "tinc is installed" if self.facts.tinc_installed
                           else "installing tinc",
                           lambda: bootstrap.plan_install(self.facts), self.apply_install),
            bootstrap.Step(lambda: f"tinc net {config.net!r} in {config.net_dir}",
                           self.plan_conf, self.apply_files),
            bootstrap.Step(lambda: "tinc key", self.plan_key, self.apply_key),
            bootstrap.Step(lambda: f"this hub in the registry {self.registry.describe()}",
                           self.plan_register, self.apply_register),
            bootstrap.Step(lambda: "hub host files, conf.d, tinc-up/down, host-up/down",
                           self.plan_hub_files, self.apply_hub_files),
            bootstrap.Step(lambda: f"hub state in {self.state.root}", self.plan_state,
                           self.apply_state),
        ]
        if start and config.init != "none":
            steps.append(bootstrap.Step(
                lambda: f"boot: {config.init}",
                lambda: bootstrap.read_boot_plan(config.net, config.init, self.facts,
                                                 config.tinc_dir), self.apply_boot))
        if start and config.init != "none":  # a real install: the host's kernel settings
            steps.append(bootstrap.Step(lambda: "UDP receive buffer cap (net.core.rmem_max)",
                                        self.plan_udp_buffer, self.apply_udp_buffer))
        if start:
            steps.append(bootstrap.Step(lambda: "tincd", self.plan_start, self.apply_start))
        if start and config.init == "systemd":  # the API too comes back after a reboot
            steps.append(bootstrap.Step(lambda: f"API service {UNIT_NAME}", self.plan_service,
                                        self.apply_service))
            steps.append(bootstrap.Step(lambda: f"names into /etc/hosts: {NAMES_PATH_UNIT}",
                                        self.plan_names_units, self.apply_names_units))
            steps.append(bootstrap.Step(
                lambda: f"exposures at boot, from other hubs, after nftables: {EXPOSE_UNIT}, "
                        f"{EXPOSE_PATH_UNIT}, {EXPOSE_NFT_UNIT}",
                self.plan_expose_units, self.apply_expose_units))
        return steps

    def apply_install(self, plan: bootstrap.Plan) -> None:
        self.facts = bootstrap.apply_install(plan, self.facts)

    def apply_hub_files(self, plan: bootstrap.Plan) -> None:
        peers_dir = self.config.net_dir / Path(HUB_PEERS_FILE).parent
        if not peers_dir.is_dir():
            peers_dir.mkdir(parents=True)
            self.changed.append(str(peers_dir))
        self.apply_files(plan)

    def apply_files(self, plan: bootstrap.Plan) -> None:
        for spec in plan.files:
            Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
        self.changed += bootstrap.apply_files(plan.files)

    def plan_conf(self) -> bootstrap.Plan:
        return bootstrap.Plan(files=(bootstrap.FileSpec(
            str(self.config.net_dir / "tinc.conf"), self.tinc_conf()),))

    def plan_register(self) -> bootstrap.Plan:
        config, state = self.config, self.state
        how = (f"the lowest free VPN address (now {config.hub_address})" if self.joining
               else f"VPN address {config.hub_address}")
        registry = str(self.registry.db_path) if self.registry.db_path else self.registry.describe()
        return bootstrap.Plan(actions=(
            f"directory {state.root} with mode 0700; registry {registry} and its"
            f" lock {state.lock_file}, created when missing",
            f"TLS key {state.key_file} and certificate {state.cert_file} for {config.address},"
            " made when missing, re-issued for a new address",
            f"hub {config.name!r} of net {config.net!r} ({config.vpn_subnet}) recorded with {how},"
            f" its tinc key, {config.address}:{config.port}, API port {config.api_port} and TLS pin",
        ))

    def apply_register(self, plan: bootstrap.Plan) -> None:
        state, config = self.state, self.config
        state.root.mkdir(parents=True, exist_ok=True)
        if (state.root.stat().st_mode & 0o777) != 0o700:
            os.chmod(state.root, 0o700)
        created = self.registry.create()
        if created:
            self.changed.append(str(self.registry.db_path or self.registry.describe()))
        renewed = ensure_cert(state.cert_file, state.key_file, config.name, config.address)
        if renewed:
            self.changed.append(str(state.cert_file))
        if (self.registry.dialect == "sqlite" and not created and not renewed
                and self.old_config == config):
            return  # a re-run: nothing to record ('serve' records this hub at start too)
        self.registry.upgrade_schema()  # an older one in place, under the lock; a newer one refused
        row = register_hub(self.registry, hub_row(config, self.public_pem, pin_of_cert_file(state.cert_file)),
                           config.net, config.vpn_subnet, allocate=self.joining)
        if row.address != config.hub_address:
            self.config = replace(config, hub_address=row.address)
        with self.registry.snapshot() as view:
            self.hubs = view.list_hubs()

    def plan_key(self) -> bootstrap.Plan:
        config = self.config
        return bootstrap.plan_key(config.tinc_dir, config.net, self.req.key_size,
                                  bootstrap.has_key(config.tinc_dir, config.net))

    def apply_key(self, plan: bootstrap.Plan) -> None:
        config = self.config
        self.public_pem = bootstrap.apply_key(plan, config.tinc_dir, config.net, config.name)
        if plan.commands:
            self.changed.append(str(config.net_dir / "rsa_key.priv"))
            return
        bits = rsa_key_bits(self.public_pem)
        if bits is not None and bits != self.req.key_size:
            self.notes.append(f"kept the existing {bits}-bit RSA key (keys are never regenerated;"
                              f" --key-size {self.req.key_size} ignored)")

    def event_scripts(self) -> List[bootstrap.FileSpec]:
        """host-up/host-down: read by tincd at each event, so writing them never needs a
        tincd restart."""
        return [bootstrap.FileSpec(str(self.config.net_dir / f"host-{event}"),
                                   render_host_script(self.state.root, event), 0o755)
                for event in ("up", "down")]

    def plan_hub_files(self) -> bootstrap.Plan:
        config, net_dir = self.config, self.config.net_dir
        hub_files = tuple(bootstrap.FileSpec(str(config.hosts_dir / name), text)
                          for name, text in sorted(self.hub_files().items()))
        peers = render_hub_peers_conf([h.name for h in self.other_hubs()])
        if peers is not None:
            hub_files += (bootstrap.FileSpec(str(net_dir / HUB_PEERS_FILE), peers),)
        peers_dir = net_dir / Path(HUB_PEERS_FILE).parent
        return bootstrap.Plan(actions=(
            f"directory {peers_dir} (the other hubs' ConnectTo, kept by the API), made when missing",),
            files=tuple(self.event_scripts()) + hub_files + (
            bootstrap.FileSpec(str(net_dir / "tinc-up"),
                               bootstrap.render_tinc_up(config.hub_address, config.prefix)
                               + render_tinc_up_guard(config.net, bootstrap.interface_name(config.net),
                                                      config.hub_address, str(config.hub_host_file)),
                               0o755),
            bootstrap.FileSpec(str(net_dir / "tinc-down"),
                               bootstrap.render_tinc_down(config.hub_address, config.prefix),
                               0o755),
        ))

    def plan_state(self) -> bootstrap.Plan:
        state, config = self.state, self.config
        return bootstrap.Plan(
            files=(bootstrap.FileSpec(str(state.config_file), config.to_json(), 0o600),))

    def apply_state(self, plan: bootstrap.Plan) -> None:
        self.changed += bootstrap.apply_files(plan.files)

    def apply_boot(self, plan: bootstrap.Plan) -> None:
        self.changed += bootstrap.apply_boot(plan)

    def plan_udp_buffer(self) -> bootstrap.Plan:
        return plan_rmem_max(HUB_UDP_RCVBUF, read_rmem_max())

    def apply_udp_buffer(self, plan: bootstrap.Plan) -> None:
        self.rmem_raised = apply_rmem_max(plan, HUB_UDP_RCVBUF)

    def start_how(self) -> str:
        return "systemd" if self.config.init == "systemd" else "direct"

    def plan_start(self) -> bootstrap.Plan:
        """Restart a running tincd only when its own files changed (not for boot registration
        or the event scripts)."""
        config = self.config
        if not self.dry_run:  # what this run wrote
            no_restart = {spec.path for spec in self.event_scripts()}
            self.tinc_changed = self.rmem_raised or any(
                p.startswith(str(config.net_dir) + os.sep) and p not in no_restart
                for p in self.changed)
        self.tincd_state = bootstrap.read_tincd_state(config.net, self.start_how(), self.facts)
        return bootstrap.plan_start(config.net, self.start_how(), self.facts, self.tincd_state,
                                    self.tinc_changed, config.tinc_dir)

    def apply_start(self, plan: bootstrap.Plan) -> None:
        self.tincd = bootstrap.apply_start(plan, self.tincd_state)

    def plan_service(self) -> bootstrap.Plan:
        return read_service_plan(self.config, str(self.state.root),
                                 bootstrap.service_unit(self.facts, self.config.net))

    def apply_service(self, plan: bootstrap.Plan) -> None:
        self.changed += apply_service(plan)
        self.api_service = UNIT_NAME

    def plan_names_units(self) -> bootstrap.Plan:
        return read_names_units_plan(self.config, str(self.state.root))

    def apply_names_units(self, plan: bootstrap.Plan) -> None:
        self.changed += apply_service(plan)

    def plan_expose_units(self) -> bootstrap.Plan:
        return read_expose_plan(self.config, str(self.state.root),
                                bootstrap.service_unit(self.facts, self.config.net))

    def apply_expose_units(self, plan: bootstrap.Plan) -> None:
        self.changed += apply_service(plan)

    def result(self) -> InitResult:
        return InitResult(config=self.config, pin=pin_of_cert_file(self.state.cert_file),
                          changed=self.changed, tincd=self.tincd, notes=self.notes,
                          api_service=self.api_service)


def run_init(state: StateDir, req: InitRequest) -> InitResult:
    """The whole ``tinc-hub init``."""
    job = HubInit(state, req)
    bootstrap.run_steps(job.steps(), dry_run=False, say=log.debug)
    return job.result()


def dry_run_init(state: StateDir, req: InitRequest) -> None:
    """``tinc-hub init --dry-run``: the same checks, then each step's title and plan on
    stdout; nothing is changed."""
    job = HubInit(state, req, dry_run=True)
    bootstrap.run_steps(job.steps(), dry_run=True, say=lambda title: print("# " + title))


def rsa_key_bits(public_pem: str) -> Optional[int]:
    """Size of the RSA public key in a PEM block, None if unreadable."""
    try:
        key = serialization.load_pem_public_key(public_pem.strip().encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        return None
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None
