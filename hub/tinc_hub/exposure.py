"""Services of nodes published on the hub's public addresses (``tinc-hub expose``).

The registry's ``exposures`` rows become ONE nftables table of the hub's own,
``table ip tinc_hub_<net>`` (render_ruleset, pure), replaced as a whole in one ``nft -f -``
transaction (apply_exposures); no other table is read or written. The table:

- prerouting (dstnat): ``[ip daddr LISTEN | fib daddr type local] PROTO dport LPORT`` is
  DNATed to the node's VPN address and port;
- postrouting (srcnat): for ``--snat`` exposures (all of them on every hub but the reply
  hub when the net has several: tinc sends a node's reply to one hub only; source_nat_here),
  the source becomes the hub's VPN address;
- forward (filter): the DNATed flows of these exposures are accepted both ways (original
  direction into the VPN interface, reply direction out of it); anything else forwarded into
  or out of the VPN interface is dropped (a node cannot use the hub as a router: the hub
  claims ``Subnet = 0.0.0.0/0`` for the replies), and when it was this code that turned IPv4
  forwarding on, every other forwarded packet is dropped too (the hub routes nothing it did
  not route before).

The claim (the invariant: this hub claims ``Subnet = 0.0.0.0/0`` only while its table with
the forward drops is in the kernel): the hub's own host file claims 0.0.0.0/0 only while an
exposure without source NAT needs it (the node's replies to outside addresses must reach the
hub). apply_from_view puts the table in place first and the claim second; it takes the claim
away first (tincd SIGHUPed) and the table second, and the table only ever goes with IPv4
forwarding off. The init and the follower keep the claim as the host file has it
(claims_default_route); the hub's tinc-up (render_tinc_up_guard) puts the drops back before
tincd opens its sockets when the claim is there and the table is not (after a reboot).

IPv4 forwarding: ``net.ipv4.ip_forward`` (a per-interface ``conf.IFACE.forwarding`` would be
lost each time tincd re-creates its interface, and the public side can be any interface).
Its value before the first exposure is kept in the state dir (FORWARDING_RECORD) and put
back when the last exposure goes.
"""

import hashlib
import ipaddress
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Set, Tuple

from bootstrap import bootstrap
from .errors import HubError
from .registry import ExposureRow
from .roster import DEFAULT_ROUTE_SUBNET, hub_host_files_for

if TYPE_CHECKING:
    from .registry import Registry, RegistryView
    from .state import HubConfig, StateDir

PROTOCOLS = ("tcp", "udp")
SSH_PORT = 22
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
FORWARDING_RECORD = "expose-ip-forward"  # in the state dir: ip_forward before the first exposure
_NFT_WORD_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


def table_name(net: str) -> str:
    """The hub's own nftables table: tinc_hub_<net>; a net name with '-' or '.' (valid tinc
    net names) gets them as '_' plus a digest of the name, so two nets never share a table."""
    if _NFT_WORD_RE.fullmatch(net or ""):
        return f"tinc_hub_{net}"
    if not bootstrap.NET_RE.fullmatch(net or ""):
        raise ValueError(f"net name {net!r} is not a tinc net name")
    digest = hashlib.sha256(net.encode()).hexdigest()[:8]
    return "tinc_hub_{}_{}".format(re.sub(r"[^A-Za-z0-9_]", "_", net), digest)


def parse_port(text: str, what: str = "port") -> int:
    """A port 1-65535 written in plain decimal; ValueError otherwise."""
    if not _PORT_RE.fullmatch(text or "") or int(text) > 65535:
        raise ValueError(f"{what} {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_target(text: str) -> Tuple[str, int]:
    """NODE:PORT -> (node, port); ValueError otherwise."""
    name, sep, port = (text or "").rpartition(":")
    if not sep or not bootstrap.valid_node_name(name):
        raise ValueError(f"{text!r} is not NODE:PORT (a node name, a colon, a port)")
    return name, parse_port(port)


def parse_listen(text: str) -> Tuple[Optional[str], int]:
    """--listen [ADDR:]PORT -> (IPv4 address or None for every address, port)."""
    address, sep, port = (text or "").rpartition(":")
    if not sep:
        return None, parse_port(text, "listen port")
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"listen address {address!r} is not an IPv4 address") from None
    if parsed.is_unspecified:
        return None, parse_port(port, "listen port")
    if parsed.is_loopback or parsed.is_multicast or parsed.is_reserved or str(parsed) != address:
        raise ValueError(f"listen address {address!r} is not a unicast address of the hub")
    return address, parse_port(port, "listen port")


def listening_ports(proto: str, proc_net: Path = Path("/proc/net")) -> Set[int]:
    """Ports something on this machine listens on (TCP LISTEN) or is bound to (UDP), from
    /proc/net/{tcp,udp,tcp6,udp6} of this network namespace (a dual-stack socket on [::]
    takes IPv4 too); lines that do not parse are skipped."""
    state = "0A" if proto == "tcp" else "07"
    ports: Set[int] = set()
    for table in (proto, proto + "6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == state \
                    and re.fullmatch(r"(?:[0-9A-F]{8}|[0-9A-F]{32}):[0-9A-F]{4}", fields[1]):
                ports.add(int(fields[1][-4:], 16))
    return ports


def own_port_problem(proto: str, port: int, tinc_port: int, api_port: int,
                     listening: Set[int]) -> Optional[str]:
    """Why the hub cannot publish ``port``: its tinc port (TCP and UDP), its API port, ssh,
    or a port something on the hub already listens on; None when free."""
    if port == tinc_port:
        return f"port {port} is the hub's tinc port"
    if proto == "tcp" and port == api_port:
        return f"port {port} is the hub's API port"
    if proto == "tcp" and port == SSH_PORT:
        return f"port {port} is ssh"
    if port in listening:
        return f"something on the hub already listens on {proto} port {port}"
    return None


@dataclass(frozen=True)
class Ruleset:
    """What apply_exposures sends to ``nft -f -`` and whether IPv4 forwarding must be on."""
    text: str
    forwarding: bool


def _rule_values(row: ExposureRow) -> Tuple[str, str, Optional[str]]:
    """The row's node address, protocol and listen address, re-checked for nft."""
    if row.proto not in PROTOCOLS:
        raise ValueError(f"exposure {row.id}: protocol {row.proto!r}")
    for port in (row.node_port, row.listen_port):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"exposure {row.id}: port {port!r}")
    node = str(ipaddress.IPv4Address(row.node_address))
    listen = None if row.listen_address is None else str(ipaddress.IPv4Address(row.listen_address))
    return node, row.proto, listen


def render_ruleset(net: str, interface: str, hub_address: str, rows: Sequence[ExposureRow],
                   force_snat: bool = False, guard: bool = False,
                   drop_other_forwarding: bool = False) -> Ruleset:
    """The nft script that replaces table tinc_hub_<net> by the one for ``rows`` (revoked
    nodes' rows left out). ``guard`` (IPv4 forwarding is on): the table stays, with the drops
    of the VPN interface, even without rows; otherwise no row deletes it.
    ``drop_other_forwarding`` (this code turned forwarding on): every other forwarded packet is
    dropped too. Pure; ValueError on a value that cannot go into nft."""
    table = table_name(net)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", interface or "") or len(interface) > bootstrap.IFNAMSIZ:
        raise ValueError(f"interface name {interface!r}")
    hub = str(ipaddress.IPv4Address(hub_address))
    live = [row for row in rows if not row.node_revoked]
    head = [f"add table ip {table}", f"delete table ip {table}"]  # one transaction: replaced
    if not live and not guard and not drop_other_forwarding:
        return Ruleset("\n".join(head) + "\n", forwarding=False)
    dnat, snat, forward = [], [], []
    for row in live:
        node, proto, listen = _rule_values(row)
        match = f"ip daddr {listen}" if listen else "fib daddr type local"
        dnat.append(f"{match} {proto} dport {row.listen_port} dnat to {node}:{row.node_port}"
                    f' comment "exposure {row.id}"')
        flow = f"ct status dnat meta l4proto {proto} ct original proto-dst {row.listen_port}"
        forward.append(f'oifname "{interface}" ct direction original {flow} '
                       f"ip daddr {node} th dport {row.node_port} accept")
        forward.append(f'iifname "{interface}" ct direction reply {flow} '
                       f"ip saddr {node} th sport {row.node_port} accept")
        if row.snat or force_snat:
            snat.append(f'oifname "{interface}" {flow} ip daddr {node} th dport {row.node_port} '
                        f"snat to {hub}")
    forward += [f'iifname "{interface}" drop', f'oifname "{interface}" drop']
    if drop_other_forwarding:
        forward.append("drop")

    def chain(name: str, hook: str, priority: str, rules: List[str]) -> List[str]:
        return ([f"  chain {name} {{", f"    type {hook} priority {priority}; policy accept;"]
                + [f"    {rule}" for rule in rules] + ["  }"])

    body = [f"table ip {table} {{"]
    body += chain("prerouting", "nat hook prerouting", "dstnat", dnat)
    body += chain("postrouting", "nat hook postrouting", "srcnat", snat)
    body += chain("forward", "filter hook forward", "filter", forward)
    body.append("}")
    return Ruleset("\n".join(head + body) + "\n", forwarding=bool(live))


def guard_script(net: str, interface: str, hub_address: str) -> str:
    """nft text that creates table tinc_hub_<net> with the forward drops only (no DNAT):
    what the hub's tinc-up loads when the table is missing and the claim is there."""
    text = render_ruleset(net, interface, hub_address, [], guard=True).text
    return text.split("\n", 2)[2]  # without "add table; delete table": the table is missing


def render_tinc_up_guard(net: str, interface: str, hub_address: str, host_file: str) -> str:
    """Lines for the hub's tinc-up: when the hub's own host file claims 0.0.0.0/0 and our table
    is not in the kernel (a reboot, a flush), load the forward drops. tincd runs tinc-up before
    it opens its sockets, so no node can send before they are in place."""
    table = table_name(net)
    return ("# tinc-hub expose: this hub claims 0.0.0.0/0 only behind the forward drops of its own\n"
            "# nftables table; after a reboot the table is gone: load the drops before any node connects\n"
            "if grep -qxF {claim} {host} 2>/dev/null && ! nft list table ip {table} >/dev/null 2>&1\n"
            "then\n"
            "nft -f - <<'TINC_HUB_GUARD' || echo \"tinc-hub: nft refused the forward guard of {table}\" >&2\n"
            "{script}TINC_HUB_GUARD\n"
            "fi\n").format(claim=shlex.quote(DEFAULT_ROUTE_SUBNET), host=shlex.quote(host_file),
                           table=table, script=guard_script(net, interface, hub_address))


def claims_default_route(host_file: Path) -> bool:
    """True when the hub's own host file claims 0.0.0.0/0 (the claim's only record)."""
    try:
        return DEFAULT_ROUTE_SUBNET in Path(host_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False


def claim_wanted(rows: Sequence[ExposureRow], force_snat: bool) -> bool:
    """An exposure without source NAT is published: its replies need the hub's claim."""
    return not force_snat and any(not row.node_revoked and not row.snat for row in rows)


def run_nft(script: str) -> None:
    """Run one nft transaction from stdin (all or nothing)."""
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        raise HubError("nft not found (hint: install the nftables package)") from None
    if done.returncode != 0:
        error = " ".join((done.stderr or done.stdout).split())[:400]
        raise HubError(f"nft refused the exposure rules: {error} (hint: is this kernel built "
                       "with nf_tables and nf_nat? re-run with -v for the rules)")


def read_ip_forward(path: Path = IP_FORWARD) -> str:
    return path.read_text().strip()


def apply_exposures(state_dir: Path, net: str, interface: str, hub_address: str,
                    rows: Sequence[ExposureRow], force_snat: bool = False) -> Ruleset:
    """Make the kernel match ``rows``: our table replaced (or removed) in one nft transaction
    and IPv4 forwarding on while anything is published, put back as it was after the last.
    Safe to re-run (boot, every registry change)."""
    record = Path(state_dir) / FORWARDING_RECORD
    wanted = any(not row.node_revoked for row in rows)
    ours = record.exists()
    if wanted and read_ip_forward() == "0" and not ours:
        bootstrap.write_atomic(str(record), "0\n", 0o600)  # before the change: never lost
        ours = True
    if not wanted and ours:  # the last exposure went: forwarding back first, then the table
        IP_FORWARD.write_text(record.read_text().strip() + "\n")
        record.unlink()
        ours = False
    ruleset = render_ruleset(net, interface, hub_address, rows, force_snat,
                             guard=read_ip_forward() != "0", drop_other_forwarding=ours)
    if not wanted and not ours and shutil.which("nft") is None:
        return Ruleset("", forwarding=False)  # no nft: no table of ours to remove (boot units)
    run_nft(ruleset.text)
    if wanted and read_ip_forward() == "0":  # the drops are in place before routing starts
        IP_FORWARD.write_text("1\n")
    return ruleset


# -- the hub's commands --------------------------------------------------------------------------

def source_nat_here(view: "RegistryView", this_hub: str) -> bool:
    """True when this hub must source-NAT every exposure: the net has several active hubs and
    this one is not the REPLY HUB, the first active hub in joining order. tinc routes a node's
    reply by its destination only, to the one hub that claims 0.0.0.0/0; so only the reply hub
    publishes without source NAT (and claims it), and a client that reaches another hub is
    source-NATed there (the node answers that hub's VPN address)."""
    active = [hub.name for hub in view.list_hubs() if not hub.removed]
    return len(active) > 1 and active[0] != this_hub


def set_claim(config: "HubConfig", view: "RegistryView", claim: bool) -> bool:
    """Write the hub's own host file with or without the 0.0.0.0/0 claim and SIGHUP tincd
    when it changed (the caller holds the registry's exclusive lock, as the follower does
    when it writes the file). True when the file changed."""
    from .hostfiles import write_if_changed
    from .reload import send_sighup

    own = hub_host_files_for(config.name, view.list_hubs(), config.network,
                             claim=claim).get(config.name)
    if own is None or not write_if_changed(config.hub_host_file, own):
        return False
    send_sighup(config.net, config.tinc_dir)
    return True


def apply_from_view(state: "StateDir", config: "HubConfig", view: "RegistryView") -> Ruleset:
    """Apply what the registry (as ``view`` sees it) publishes, on this hub: the claim goes
    before the table changes, the table is in place before the claim comes (module doc)."""
    rows, force_snat = view.list_exposures(), source_nat_here(view, config.name)
    claim = claim_wanted(rows, force_snat)
    if not claim:
        set_claim(config, view, False)
    ruleset = apply_exposures(state.root, config.net, bootstrap.interface_name(config.net),
                              config.hub_address, rows, force_snat)
    if claim:
        set_claim(config, view, True)
    return ruleset


def add_exposure(state: "StateDir", registry: "Registry", target: str, listen: Optional[str],
                 proto: str, snat: bool, now: int) -> ExposureRow:
    """Record a new exposure and apply the rules, in one registry transaction (nft refusing
    them records nothing). HubError with a hint for what is unsafe or meaningless."""
    config = state.load_config()
    try:
        node_name, node_port = parse_target(target)
        listen_address, listen_port = parse_listen(listen) if listen else (None, node_port)
    except ValueError as exc:
        raise HubError(f"{exc} (hint: e.g. 'tinc-hub expose web1:80 --listen 8080')") from None
    if proto not in PROTOCOLS:
        raise HubError(f"protocol {proto!r} (hint: tcp or udp)")
    problem = own_port_problem(proto, listen_port, config.port, config.api_port,
                               listening_ports(proto))
    if problem:
        raise HubError(f"cannot publish {proto} port {listen_port} on the hub: {problem} "
                       "(hint: choose another with --listen PORT)")
    with registry.exclusive(), registry.transaction() as tx:
        node = tx.get_node(node_name)
        if node is None or node.kind != "node":
            raise HubError(f"no enrolled node named {node_name!r} (hint: see 'tinc-hub nodes')")
        if node.revoked:
            raise HubError(f"node {node_name!r} is revoked (hint: a revoked node gets no traffic;"
                           " see 'tinc-hub nodes')")
        for other in tx.list_exposures():
            if other.proto == proto and other.listen_port == listen_port:
                raise HubError(f"{proto} port {listen_port} is already published (exposure "
                               f"{other.id}, to {other.node_name}:{other.node_port}) (hint: "
                               f"'tinc-hub unexpose {other.id}' first, or choose another --listen)")
        row = ExposureRow(0, node.name, node_port, listen_address, listen_port, proto, snat, now,
                          node.address)
        new_id = tx.insert_exposure(row)
        apply_from_view(state, config, tx)
    return ExposureRow(new_id, *[getattr(row, f) for f in list(ExposureRow.__dataclass_fields__)[1:]])


def remove_exposures(state: "StateDir", registry: "Registry", what: str,
                     proto: Optional[str]) -> List[ExposureRow]:
    """Remove exposure ID, or every exposure of NODE:PORT (of ``proto`` when given), and
    apply. HubError when nothing matches."""
    config = state.load_config()
    with registry.exclusive(), registry.transaction() as tx:
        rows = tx.list_exposures()
        if re.fullmatch(r"[1-9][0-9]{0,9}", what or ""):
            gone = [row for row in rows if row.id == int(what)]
        else:
            try:
                node_name, node_port = parse_target(what)
            except ValueError as exc:
                raise HubError(f"{exc} (hint: give an exposure id or NODE:PORT; see "
                               "'tinc-hub expose list')") from None
            gone = [row for row in rows if row.node_name == node_name and row.node_port == node_port
                    and (proto is None or row.proto == proto)]
        if not gone:
            raise HubError(f"no exposure {what!r}" + (f" ({proto})" if proto else "")
                           + " (hint: see 'tinc-hub expose list')")
        for row in gone:
            tx.delete_exposure(row.id)
        apply_from_view(state, config, tx)
    return gone


def apply_now(state: "StateDir", registry: "Registry") -> Ruleset:
    """``tinc-hub expose apply``: read the registry, apply (boot, other hubs' changes)."""
    config = state.load_config()
    with registry.exclusive(), registry.snapshot() as view:
        return apply_from_view(state, config, view)


def listing(row: ExposureRow) -> dict:
    from .registry import iso_utc

    return {"id": row.id, "node": row.node_name, "node_address": row.node_address,
            "node_port": row.node_port, "listen_address": row.listen_address,
            "listen_port": row.listen_port, "proto": row.proto, "snat": row.snat,
            "node_revoked": row.node_revoked, "created_at": iso_utc(row.created_at)}
