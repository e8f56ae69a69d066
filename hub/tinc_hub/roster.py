"""The hubs of a net: this hub's record in the registry, what each hub's files say about the
others, and what nodes are told about the hubs.

A hub is a row of ``nodes`` (kind hub) plus a row of ``hubs`` (registry revision 0002); the
registry's ``settings`` hold the net and the VPN subnet, written by the first hub. Host files
are rendered per viewing hub (docs/research/tinc-several-hubs/REPORT.md, "relay layout"):
with two or more hubs, a hub's own file claims the VPN prefix with weight 20 and its copies of
the other hubs' files with weight 10, so a hub without a connection to the destination hands
the packet to another hub. Alone, a hub's files carry no weight (byte for byte what one hub
always wrote). Nodes get each hub's file without a weight (they do not use it).
"""

import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Set

from bootstrap import bootstrap
from .errors import HubError
from .hostfiles import host_row_problem
from .registry import HUB, HubRow, Registry, RegistryConflict, RegistryView
from .state import HubConfig

log = logging.getLogger("tinc_hub.roster")

OWN_PREFIX_WEIGHT = 20  # a hub's own claim on the VPN prefix, when there are several hubs
OTHER_PREFIX_WEIGHT = 10  # its copies of the other hubs' claims: preferred
PING_INTERVAL, PING_TIMEOUT = 5, 3  # hubs notice a dead peer hub as fast as nodes do


@dataclass(frozen=True)
class NetSettings:
    """What every hub of the net shares, from the registry's settings."""
    net: str
    vpn_subnet: str

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.vpn_subnet)


def read_net_settings(view: RegistryView) -> Optional[NetSettings]:
    """The net and VPN subnet recorded by the first hub; None before any hub recorded them."""
    values = view.settings()
    if "net" not in values or "vpn_subnet" not in values:
        return None
    return NetSettings(values["net"], values["vpn_subnet"])


def hub_row_problem(hub: HubRow, network: ipaddress.IPv4Network) -> Optional[str]:
    """Why a hub row cannot go into a tinc file or an answer (None: it can). The registry is
    shared by every hub: a row is checked as strictly as the init that wrote it."""
    problem = host_row_problem(hub.name, hub.address, hub.public_key, network)
    if problem:
        return problem
    problem = bootstrap.host_problem(hub.public_address)
    if problem:
        return f"public address: {problem}"
    for port in (hub.tinc_port, hub.api_port):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return "invalid port"
    if not bootstrap.PIN_RE.fullmatch(hub.tls_pin or ""):
        return "invalid TLS pin"
    return None


def active_hubs(hubs: Sequence[HubRow]) -> List[HubRow]:
    return [hub for hub in hubs if not hub.removed]


def usable_hubs(hubs: Sequence[HubRow], network: ipaddress.IPv4Network) -> List[HubRow]:
    """Active hubs whose rows are sound (an unsound one is logged and left out)."""
    usable = []
    for hub in active_hubs(hubs):
        problem = hub_row_problem(hub, network)
        if problem:
            log.warning("hub %r of the registry is left out: %s", hub.name, problem)
        else:
            usable.append(hub)
    return usable


# -- rendering (pure) ---------------------------------------------------------------------------

# In a hub's own host file only, while an exposure needs it (exposure.py: written by the
# exposures' apply after its forward drops are in place, removed before they go): tincd
# advertises it to the nodes, which accept the ADD_SUBNET (they run without StrictSubnets), so
# packets a node sends to an address outside the VPN go to a hub: the replies of connections
# `tinc-hub expose` forwards to the node without source NAT. The hub's forward chain drops
# every other such packet. Hubs (TunnelServer implies StrictSubnets) never learn another hub's.
DEFAULT_ROUTE_SUBNET = "Subnet = 0.0.0.0/0"


def render_hub_host_file(hub: HubRow, network: ipaddress.IPv4Network,
                         weight: Optional[int] = None, claim: bool = False) -> str:
    """A hub's host file: where it is, its /32 and its claim on the whole VPN prefix; with
    ``claim`` (the hub's own copy while exposures need it) every address outside it too."""
    prefix = f"Subnet = {network}" + (f"#{weight}" if weight is not None else "")
    lines = [f"Address = {hub.public_address}", f"Port = {hub.tinc_port}",
             f"Subnet = {hub.address}/32", prefix] + ([DEFAULT_ROUTE_SUBNET] if claim else [])
    return bootstrap.render_host_file(lines, hub.public_key)


def hub_host_files_for(viewer: str, hubs: Sequence[HubRow], network: ipaddress.IPv4Network,
                       claim: bool = False) -> Dict[str, str]:
    """name -> content of the hub host files in ``viewer``'s hosts/ (active hubs only; the
    other hubs' rows checked, the viewer's own comes from its checked init); ``claim``: the
    viewer's own file claims 0.0.0.0/0 (see DEFAULT_ROUTE_SUBNET)."""
    present = [hub for hub in active_hubs(hubs) if hub.name == viewer] + \
        usable_hubs([hub for hub in hubs if hub.name != viewer], network)
    several = len(present) > 1
    files = {}
    for hub in present:
        weight = None
        if several:
            weight = OWN_PREFIX_WEIGHT if hub.name == viewer else OTHER_PREFIX_WEIGHT
        files[hub.name] = render_hub_host_file(hub, network, weight,
                                               claim=claim and hub.name == viewer)
    return files


HUB_CONF_MARKER = "# Written by tinc-hub init; re-running it rewrites this file."


# The receive buffer of the hub tincd's UDP socket (tinc 1.0.36 `UDPRcvBuf`, SO_RCVBUF: the
# kernel caps it at net.core.rmem_max, which `tinc-hub init` raises to it: udp_buffer.py). Why:
# tincd fires every node's PMTU probe timer in the same second, so the probe replies of a few
# hundred nodes arrive as one burst while tincd is still busy sending; with the default buffer
# (rmem_default, 208 KiB) the kernel drops the rest of that burst AND the node-to-node packets
# that arrive with it (measured, 200 nodes: 3 of 4 datagrams into a hub dropped, a relayed
# ping lost about once a second while a restarted hub readmits the fleet; none with 8 MiB).
HUB_UDP_RCVBUF = 8 * 1024 * 1024


def render_hub_tinc_conf(name: str, net: str, port: int) -> str:
    """The hub's tinc.conf (written by init only): a tunnel server with a UDP receive buffer
    that holds a fleet's bursts of PMTU probe replies (HUB_UDP_RCVBUF)."""
    return bootstrap.render_tinc_conf(name, net, extra=[f"Port = {port}", "TunnelServer = yes",
                                                        f"UDPRcvBuf = {HUB_UDP_RCVBUF}"],
                                      marker=HUB_CONF_MARKER)


# What changes with the other hubs lives in conf.d/ (tinc 1.0 reads conf.d/*.conf after
# tinc.conf, at start and on SIGHUP): the API writes it, under its sandbox, without being able
# to write tinc.conf, tinc-up or the key.
HUB_PEERS_FILE = "conf.d/hubs.conf"
PEERS_MARKER = "# Written by tinc-hub from the registry: the other hubs of the net."


def render_hub_peers_conf(other_hubs: Sequence[str]) -> Optional[str]:
    """conf.d/hubs.conf: a ConnectTo each other hub and keepalives; None when alone."""
    if not other_hubs:
        return None
    lines = [PEERS_MARKER, f"PingInterval = {PING_INTERVAL}", f"PingTimeout = {PING_TIMEOUT}"]
    lines += [f"ConnectTo = {name}" for name in sorted(other_hubs)]
    return "\n".join(lines) + "\n"


def hubs_for_nodes(hubs: Sequence[HubRow], network: ipaddress.IPv4Network,
                   first: Optional[str] = None) -> List[Dict[str, Any]]:
    """The ``hubs`` list of an enrolment or sync answer: every active hub (``first`` at the
    head), its host file as nodes keep it, and its API endpoint and pin."""
    present = sorted(usable_hubs(hubs, network), key=lambda h: (h.name != first, h.joined_at, h.name))
    return [{"name": hub.name, "host_file": render_hub_host_file(hub, network),
             "api": {"host": hub.public_address, "port": hub.api_port, "pin": hub.tls_pin}}
            for hub in present]


# -- this hub's record ----------------------------------------------------------------------

def hub_row(config: HubConfig, public_pem: str, pin: str) -> HubRow:
    """This hub as the registry records it (joined_at set at registration)."""
    return HubRow(name=config.name, address=config.hub_address,
                  address_int=int(ipaddress.IPv4Address(config.hub_address)), public_key=public_pem,
                  public_address=config.address, tinc_port=config.port, api_port=config.api_port,
                  tls_pin=pin, joined_at=0)


def allocate_address(network: ipaddress.IPv4Network, reserved: Set[int]) -> Optional[ipaddress.IPv4Address]:
    """Lowest host address of ``network`` not in ``reserved`` (network and broadcast excluded):
    what a joining hub's init previews. (Enrolment and a hub joining take theirs under the
    write lock: RegistryTransaction.allocate_address_int, the same rule without reading every
    address.)"""
    first = int(network.network_address) + 1
    last = int(network.broadcast_address) - 1
    for candidate in range(first, last + 1):
        if candidate not in reserved:
            return ipaddress.IPv4Address(candidate)
    return None


def check_settings(found: Optional[NetSettings], net: str, vpn_subnet: str, where: str) -> None:
    """A registry of another net, or with another subnet, is refused."""
    if found is not None and (found.net, found.vpn_subnet) != (net, vpn_subnet):
        raise HubError(f"registry {where} belongs to net {found.net!r} with VPN {found.vpn_subnet},"
                       f" not net {net!r} with VPN {vpn_subnet}",
                       "give the registry of this net, or this hub's original --net and --vpn-subnet")


def register_hub(registry: Registry, hub: HubRow, net: str, vpn_subnet: str,
                 allocate: bool = False, clock: Any = time.time) -> HubRow:
    """Record ``hub`` in the registry (settings too, when the registry has none yet); return
    the row as recorded. ``allocate``: the hub takes the lowest free address of the VPN (a hub
    joining a net), else ``hub.address``. A known hub keeps its address; its public address,
    ports, pin and key are updated when they changed. A hub alone in its net with no node
    enrolled may change the VPN subnet (and so its address). Nothing is written when nothing
    changed."""
    where = registry.describe()
    with registry.snapshot() as view:
        settings = read_net_settings(view)
        known = {h.name: h for h in view.list_hubs()}.get(hub.name)
    _refuse_another_key(known, hub, where)
    if known is not None and _same_place(known, hub) and settings == NetSettings(net, vpn_subnet):
        return known
    now = int(clock())
    with registry.exclusive():
        try:
            with registry.transaction() as tx:
                settings = read_net_settings(tx)
                hubs = tx.list_hubs()
                alone = all(h.name == hub.name for h in hubs) and tx.count_nodes() == 0
                if settings is not None and settings.net == net and alone:
                    settings = None  # nothing depends on the old subnet yet
                check_settings(settings, net, vpn_subnet, where)
                if settings is None:
                    tx.put_setting("net", net)
                    tx.put_setting("vpn_subnet", vpn_subnet)
                known = {h.name: h for h in hubs}.get(hub.name)
                _refuse_another_key(known, hub, where)
                if known is not None:
                    if known.removed:
                        raise HubError(f"hub {hub.name!r} was removed from the net",
                                       "a removed hub's name stays taken: init this machine as a hub with another --name")
                    updated = replace(known, public_address=hub.public_address, tinc_port=hub.tinc_port,
                                      api_port=hub.api_port, tls_pin=hub.tls_pin, public_key=hub.public_key)
                    if alone and known.address != hub.address and not allocate:
                        updated = replace(updated, address=hub.address, address_int=hub.address_int)
                    tx.update_hub(updated, now)
                    return updated
                row = tx.get_node(hub.name)
                if row is not None:
                    raise HubError(f"{hub.name!r} is the name of an enrolled node ({row.address})",
                                   "give this hub another --name")
                if allocate:
                    found = tx.allocate_address_int(ipaddress.IPv4Network(vpn_subnet))
                    if found is None:
                        raise HubError(f"VPN subnet {vpn_subnet} is full: no address for a new hub")
                    hub = replace(hub, address=str(ipaddress.IPv4Address(found)), address_int=found)
                hub = replace(hub, joined_at=now, removed_at=None)
                tx.insert_hub(hub, now)
                return hub
        except RegistryConflict as exc:
            raise HubError(f"cannot record hub {hub.name!r} in {where}: {exc.message}",
                           "its VPN address or tinc key is already used by another node or hub") from None


def _refuse_another_key(known: Optional[HubRow], hub: HubRow, where: str) -> None:
    """A hub's tinc key never changes (init never regenerates it): a recorded hub with
    another key is another machine given the same --name, which must not take its place."""
    if known is not None and known.public_key.strip() != hub.public_key.strip():
        raise HubError(f"hub {hub.name!r} is recorded in {where} with another tinc key"
                       " (another machine with the same --name?)",
                       "give this hub another --name; a hub's tinc key never changes")


def _same_place(known: HubRow, hub: HubRow) -> bool:
    return (known.public_address, known.tinc_port, known.api_port, known.tls_pin, known.public_key) == \
           (hub.public_address, hub.tinc_port, hub.api_port, hub.tls_pin, hub.public_key) \
        and not known.removed


def remove_hub(registry: Registry, name: str, this_hub: str, clock: Any = time.time) -> HubRow:
    """Retire hub ``name`` (not this one, not the last one): the other hubs and the nodes drop
    it when they next follow the registry. Its name, address and key stay taken."""
    if name == this_hub:
        raise HubError(f"{name!r} is this hub", "run 'tinc-hub hub remove' on another hub of the net")
    with registry.exclusive(), registry.transaction() as tx:
        hubs = {h.name: h for h in tx.list_hubs()}
        hub = hubs.get(name)
        if hub is None:
            raise HubError(f"no hub named {name!r}", "see 'tinc-hub hubs'")
        if hub.removed:
            raise HubError(f"hub {name!r} was already removed")
        if len(active_hubs(list(hubs.values()))) < 2:
            raise HubError(f"{name!r} is the last hub of the net")
        tx.remove_hub(name, int(clock()))
        return next(h for h in tx.list_hubs() if h.name == name)


def hub_kind_guard(kind: str, name: str) -> None:
    """Node commands refuse a hub's row."""
    if kind == HUB:
        raise HubError(f"{name!r} is a hub, not a node", "see 'tinc-hub hubs' and 'tinc-hub hub remove'")
