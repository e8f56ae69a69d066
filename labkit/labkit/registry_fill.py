"""labkit.registry_fill: put many enrolled nodes into a hub's registry at once, for the
benchmarks and tests of the hub at fleet size (bench/enrol_scale.py, tests/test_enrol_scale.py).

The rows go in through the registry API (:class:`tinc_hub.registry.Registry`) in ONE write
transaction, not through HTTP: 50,000 nodes take seconds, not an hour of enrolments. They are
what an enrolment writes: a valid tinc name, the lowest free addresses of the VPN (the hub's
and every taken address skipped), a distinct RSA public key each (``nodes.public_key`` is
unique), the hash of one spent token. Their host files can be written too (without fsync: a
fixture, not the hub's own writes), so that ``serve`` starts with a hosts/ that matches.

Distinct keys without generating 50,000 RSA keys: one real 2048-bit modulus with a different
odd public exponent per row. Every one is an RSA public key that ``cryptography`` and tinc read
(no private key exists for most, which a filler row never needs).
"""

import ipaddress
import os
import time
from pathlib import Path
from typing import Iterator, List, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tinc_hub.hostfiles import render_node_host_file
from tinc_hub.registry import NodeRow, Registry, TokenRow
from tinc_hub.tokens import hash_secret

FILL_PREFIX = "fill"  # node names: fill0, fill1, ...
FIRST_EXPONENT = 65539  # above the usual 65537, so a filler key never equals a real node's


def distinct_public_keys(count: int, bits: int = 2048) -> Iterator[str]:
    """``count`` distinct RSA public keys (PKCS#1 PEM): one fresh modulus, odd exponents."""
    modulus = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key() \
        .public_numbers().n
    for index in range(count):
        numbers = rsa.RSAPublicNumbers(FIRST_EXPONENT + 2 * index, modulus)
        yield numbers.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.PKCS1).decode("ascii")


def fill_registry(registry: Registry, vpn_subnet: str, count: int, prefix: str = FILL_PREFIX,
                  hosts_dir: Optional[Path] = None, reserved: Optional[List[str]] = None,
                  clock: float = 0.0) -> List[NodeRow]:
    """Add ``count`` nodes named PREFIX0.. to ``registry`` in one transaction, on the lowest
    addresses of ``vpn_subnet`` that no row holds and ``reserved`` (e.g. the hub's address
    before it recorded itself) does not name. With ``hosts_dir``, their host files too.
    Returns the rows. ValueError when the subnet has too few free addresses."""
    network = ipaddress.IPv4Network(vpn_subnet)
    now = int(clock or time.time())
    token = TokenRow(secret_sha256=hash_secret(f"labkit-fill-{prefix}-{os.getpid()}-{now}"),
                     uses_total=count, uses_left=0, expires_at=now + 3600, bound_name=None,
                     allow_replace=False, created_at=now)
    keys = distinct_public_keys(count)
    with registry.exclusive(), registry.transaction() as tx:
        taken = {row.address_int for row in tx.list_rows()}
        taken.update(int(ipaddress.IPv4Address(a)) for a in reserved or ())
        free = (a for a in range(int(network.network_address) + 1, int(network.broadcast_address))
                if a not in taken)
        rows = []
        for index, address_int in zip(range(count), free):
            address = str(ipaddress.IPv4Address(address_int))
            rows.append(NodeRow(name=f"{prefix}{index}", address=address, address_int=address_int,
                                public_key=next(keys), token_sha256=token.secret_sha256,
                                enrolled_at=now, updated_at=now, revoked_at=None))
        if len(rows) < count:
            raise ValueError(f"VPN subnet {vpn_subnet} has only {len(rows)} free addresses, not {count}")
        tx.insert_token(token)
        tx.insert_nodes(rows)
    if hosts_dir is not None:
        write_host_files(hosts_dir, rows)
    return rows


def write_host_files(hosts_dir: Path, rows: List[NodeRow]) -> None:
    """The hub's host files of ``rows`` as the hub renders them (mode 0644), no fsync."""
    hosts_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        fd = os.open(hosts_dir / row.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(render_node_host_file(row.address, row.public_key))


def write_liveness_records(state_root: Path, rows: List[NodeRow], at: int) -> None:
    """A host-up/host-down record per row in STATE/liveness, as the hub's scripts leave them
    for a fleet whose nodes have all connected (every other one gone down again), at ``at``."""
    directory = Path(state_root) / "liveness"
    directory.mkdir(exist_ok=True)
    for index, row in enumerate(rows):
        event = "down" if index % 2 else "up"
        (directory / row.name).write_text(f"{event} {at} 192.0.2.{index % 250 + 1}\n")
