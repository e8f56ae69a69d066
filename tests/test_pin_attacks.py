"""The hub pin cannot be fooled: crafted certificates against bootstrap.py's strict DER reader.

An on-path attacker holds only its own key. It serves a certificate that OpenSSL accepts
(TLS really runs with the attacker's key) but that hides the real hub's SubjectPublicKeyInfo
where a lenient DER walker would find it. bootstrap.py must refuse (exit 4) before it sends a
single byte, so the attacker never sees `Authorization: Bearer <token>`.
"""

import base64
import datetime
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import BOOTSTRAP_PY, bootstrap
from tinc_hub.tls import ensure_cert, pin_of_cert_file


# ---------------------------------------------------------------------------
# The lenient walker bootstrap.py used before (commit 28ef856), kept as the "before"
# reference: the attacks below are real only if it returns the hub's pin for them.

def old_der_element(data: bytes, pos: int) -> Tuple[int, int, int]:
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def old_spki_pin_from_cert_der(der: bytes) -> str:
    _, cert_start, _ = old_der_element(der, 0)
    _, pos, _ = old_der_element(der, cert_start)
    tag, _, end = old_der_element(der, pos)
    if tag == 0xA0:
        pos = end
    for _ in range(5):
        _, _, pos = old_der_element(der, pos)
    _, _, end = old_der_element(der, pos)
    return "sha256//" + base64.b64encode(hashlib.sha256(der[pos:end]).digest()).decode()


# ---------------------------------------------------------------------------
# A small DER/BER writer: tag and length bytes are written exactly as the caller says.

def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_length(len(content)) + content


def long_form(tag: int, content: bytes, length_bytes: int) -> bytes:
    """Long-form length padded with leading zero bytes (valid BER, not DER)."""
    return bytes([tag, 0x80 | length_bytes]) + len(content).to_bytes(length_bytes, "big") + content


def indefinite(tag: int, content: bytes) -> bytes:
    """BER indefinite length: 0x80, the content, then an end-of-contents 00 00."""
    return bytes([tag, 0x80]) + content + b"\x00\x00"


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


ECDSA_SHA256 = seq(oid("1.2.840.10045.4.3.2"))
VERSION_3 = tlv(0xA0, tlv(0x02, b"\x02"))
SERIAL = tlv(0x02, b"\x01\x23\x45\x67")
OCTET_STRING, NULL, UTF8_STRING = 0x04, b"\x05\x00", 0x0C


def name(common_name: str) -> bytes:
    atv = seq(oid("2.5.4.3"), tlv(UTF8_STRING, common_name.encode()))
    return seq(tlv(0x31, atv))


def validity() -> bytes:
    def utc(when: datetime.datetime) -> bytes:
        return tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    now = datetime.datetime.now(datetime.timezone.utc)
    return seq(utc(now - datetime.timedelta(hours=1)), utc(now + datetime.timedelta(days=1)))


def extensions(*extra: bytes) -> bytes:
    basic_constraints = seq(oid("2.5.29.19"), tlv(0x01, b"\xff"), tlv(OCTET_STRING, seq()))
    return tlv(0xA3, seq(basic_constraints, *extra))


def signed_cert(tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The certificate around `tbs`, really signed by `key` (the attacker's)."""
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return seq(tbs, ECDSA_SHA256, tlv(0x03, b"\x00" + signature))


def spki_of(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def pin_of_spki(spki: bytes) -> str:
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


# ---------------------------------------------------------------------------
# The crafted certificates. Each builds the attacker's certificate DER from the attacker's
# key and the real hub's SPKI.

class Keys(NamedTuple):
    attacker: ec.EllipticCurvePrivateKey
    hub_spki: bytes


def content_of(element: bytes) -> bytes:
    """The content of a DER element this module wrote (definite length)."""
    first = element[1]
    header = 2 + (first & 0x7F if first & 0x80 else 0)
    return element[header:]


def cert_of(keys: Keys, *, version: bytes = VERSION_3, signature: bytes = ECDSA_SHA256,
            issuer: Optional[bytes] = None, subject: Optional[bytes] = None,
            spki: Optional[bytes] = None, after_spki: Optional[bytes] = None,
            wrap: Callable[[bytes], bytes] = seq) -> bytes:
    """The attacker's certificate, signed by the attacker, with the given TBS parts."""
    tbs = wrap(version + SERIAL + signature + (issuer or name("hub1")) + validity()
               + (subject or name("hub1")) + (spki or spki_of(keys.attacker))
               + (extensions() if after_spki is None else after_spki))
    return signed_cert(tbs, keys.attacker)


def indefinite_sigalg_params(keys: Keys) -> bytes:
    """BER indefinite lengths in the TBS signature algorithm; the hub SPKI in its parameters.

    A walker that reads 0x80 as "length 0" steps into the algorithm and lands on the hub SPKI.
    """
    params = indefinite(0x30, NULL + keys.hub_spki)
    return cert_of(keys, signature=indefinite(0x30, oid("1.2.840.10045.4.3.2") + params))


def high_tag_number_sigalg(keys: Keys) -> bytes:
    """The TBS signature algorithm SEQUENCE written with a high-tag-number form (3F 10).

    A walker that takes the second tag byte (0x10) as the length jumps 16 bytes into the
    algorithm, into an OCTET STRING parameter that holds three NULLs and the hub SPKI.
    """
    algorithm = oid("1.2.840.10045.4.3.2")
    padding = 16 - 1 - len(algorithm) - 2  # the walker's 16 bytes: length, OID, 04 xx, padding
    params = tlv(OCTET_STRING, b"\xAA" * padding + NULL * 3 + keys.hub_spki)
    content = algorithm + params
    assert len(content) < 0x80
    return cert_of(keys, signature=b"\x3F\x10" + der_length(len(content)) + content)


def indefinite_version(keys: Keys) -> bytes:
    """A misleading [0] version with an indefinite length, plus the hub SPKI as the (indefinite)
    signature algorithm's parameter: the walker sees the version as empty and counts its
    INTEGER and end-of-contents as two fields."""
    signature = indefinite(0x30, oid("1.2.840.10045.4.3.2") + keys.hub_spki)
    return cert_of(keys, version=indefinite(0xA0, tlv(0x02, b"\x02")), signature=signature)


def ber_name_hides_hub_spki(keys: Keys) -> bytes:
    """The issuer Name in BER: indefinite Name and RDN, an attribute SEQUENCE in high-tag form
    (3F 10) and a BIT STRING value holding the hub SPKI. The walker enters the Name, skips 16
    bytes of the attribute and lands on the hub SPKI inside the value."""
    attribute_type = oid("2.5.4.3")
    padding = 16 - 1 - len(attribute_type) - 2 - 1  # length, OID, 03 xx, unused-bits byte
    value = tlv(0x03, b"\x00" + b"\xAA" * padding + keys.hub_spki)
    attribute = attribute_type + value
    assert len(attribute) < 0x80
    rdn = indefinite(0x31, b"\x3F\x10" + der_length(len(attribute)) + attribute)
    return cert_of(keys, issuer=indefinite(0x30, rdn))


def indefinite_tbs(keys: Keys) -> bytes:
    """The whole TBS with an indefinite length (BER)."""
    return cert_of(keys, wrap=lambda content: indefinite(0x30, content),
                  after_spki=extensions(seq(oid("1.3.6.1.4.1.99999.1"),
                                            tlv(OCTET_STRING, keys.hub_spki))))


def leading_zero_lengths(keys: Keys) -> bytes:
    """Non-minimal long-form lengths (leading zero bytes) on the issuer, subject and key."""
    issuer = long_form(0x30, content_of(name("hub1")), 3)
    tbs = (VERSION_3 + SERIAL + ECDSA_SHA256 + issuer + validity()
           + long_form(0x30, content_of(name("hub1")), 2)
           + long_form(0x30, content_of(spki_of(keys.attacker)), 4)
           + extensions(seq(oid("1.3.6.1.4.1.99999.1"), tlv(OCTET_STRING, keys.hub_spki))))
    return signed_cert(long_form(0x30, tbs, 2), keys.attacker)


def long_form_short_length(keys: Keys) -> bytes:
    """A short length written in long form (81 xx with xx < 128) on the serial and validity."""
    tbs = (VERSION_3 + long_form(0x02, b"\x01\x23", 1) + ECDSA_SHA256 + name("hub1")
           + long_form(0x30, content_of(validity()), 1) + name("hub1") + spki_of(keys.attacker)
           + extensions())
    return signed_cert(seq(tbs), keys.attacker)


def hub_spki_in_extension(keys: Keys) -> bytes:
    """Valid DER with the attacker's key; the hub SPKI as an unknown extension's value."""
    extension = seq(oid("1.3.6.1.4.1.99999.1"), tlv(OCTET_STRING, keys.hub_spki))
    return cert_of(keys, after_spki=extensions(extension))


def hub_spki_in_name(keys: Keys) -> bytes:
    """Valid DER with the attacker's key; the hub SPKI as the issuer's attribute value."""
    issuer = seq(tlv(0x31, seq(oid("2.5.4.3"), keys.hub_spki)))
    return cert_of(keys, issuer=issuer)


def hub_spki_as_unique_id(keys: Keys) -> bytes:
    """Valid DER with the attacker's key; the hub SPKI inside issuerUniqueID [1]."""
    return cert_of(keys, after_spki=tlv(0x81, b"\x00" + keys.hub_spki) + extensions())


def hub_spki_in_version(keys: Keys) -> bytes:
    """[0] version wrapping an INTEGER and the hub SPKI (EXPLICIT holds exactly one value)."""
    return cert_of(keys, version=tlv(0xA0, tlv(0x02, b"\x02") + keys.hub_spki))


def hub_spki_after_extensions(keys: Keys) -> bytes:
    """An extra element, the hub SPKI, at the end of the TBS."""
    return cert_of(keys, after_spki=extensions() + keys.hub_spki)


def hub_spki_before_key(keys: Keys) -> bytes:
    """An extra element, the hub SPKI, between the subject and the attacker's key."""
    return cert_of(keys, subject=name("hub1") + keys.hub_spki)


def five_byte_length(keys: Keys) -> bytes:
    """A length written with five bytes (DER allows at most what the value needs)."""
    return cert_of(keys, issuer=long_form(0x30, content_of(name("hub1")), 5))


def constructed_key_bit_string(keys: Keys) -> bytes:
    """The attacker's key BIT STRING in BER constructed form (23: two primitive pieces)."""
    spki = content_of(spki_of(keys.attacker))
    algorithm = spki[:2 + spki[1]]
    key_bits = content_of(spki[len(algorithm):])  # 00 + the key
    pieces = tlv(0x03, key_bits[:21]) + tlv(0x03, b"\x00" + key_bits[21:])
    return cert_of(keys, spki=seq(algorithm, tlv(0x23, pieces)))


def _reframed(keys: Keys, frame: Callable[[bytes], bytes]) -> bytes:
    return frame(content_of(cert_of(keys)))


def outer_indefinite(keys: Keys) -> bytes:
    """The certificate SEQUENCE itself with an indefinite length."""
    return _reframed(keys, lambda content: indefinite(0x30, content))


def outer_long_form(keys: Keys) -> bytes:
    """The certificate SEQUENCE with a 4-byte, zero-padded length."""
    return _reframed(keys, lambda content: long_form(0x30, content, 4))


def trailing_data(keys: Keys) -> bytes:
    """The hub SPKI after the end of the certificate."""
    return cert_of(keys) + keys.hub_spki


def extra_element_in_certificate(keys: Keys) -> bytes:
    """The hub SPKI as a fourth element of the certificate SEQUENCE."""
    return _reframed(keys, lambda content: seq(content, keys.hub_spki))


class Trick(NamedTuple):
    build: Callable[[Keys], bytes]  # the certificate DER (or BER) the attacker's server loads
    openssl_accepts: bool  # load_cert_chain(cert, attacker key) and a CERT_NONE handshake work
    fools_old_walker: bool  # the pre-fix walker returned the hub's pin for it


TRICKS: Dict[str, Trick] = {
    # Each fools the old walker, and OpenSSL accepts it (BER inside the TBS reaches the client
    # byte for byte: OpenSSL keeps the TBS encoding as received).
    "indefinite_sigalg_params": Trick(indefinite_sigalg_params, True, True),
    "high_tag_number_sigalg": Trick(high_tag_number_sigalg, True, True),
    "indefinite_version": Trick(indefinite_version, True, True),
    "ber_name_hides_hub_spki": Trick(ber_name_hides_hub_spki, True, True),
    # OpenSSL accepts these; the old walker was not fooled, the strict reader refuses them.
    "indefinite_tbs": Trick(indefinite_tbs, True, False),
    "leading_zero_lengths": Trick(leading_zero_lengths, True, False),
    "long_form_short_length": Trick(long_form_short_length, True, False),
    "five_byte_length": Trick(five_byte_length, True, False),
    # Strict DER with the attacker's key: the reader returns the attacker's pin (mismatch).
    "hub_spki_in_extension": Trick(hub_spki_in_extension, True, False),
    "hub_spki_in_name": Trick(hub_spki_in_name, True, False),
    "hub_spki_as_unique_id": Trick(hub_spki_as_unique_id, True, False),
    # Outer framing: OpenSSL accepts it but re-encodes the outer SEQUENCE before sending, so
    # the client gets strict DER with the attacker's key.
    "outer_indefinite": Trick(outer_indefinite, True, False),
    "outer_long_form": Trick(outer_long_form, True, False),
    # OpenSSL refuses these (load_cert_chain fails), so they are not attacks; the strict
    # reader refuses them too (checked directly on the DER).
    "hub_spki_in_version": Trick(hub_spki_in_version, False, False),
    "hub_spki_after_extensions": Trick(hub_spki_after_extensions, False, False),
    "hub_spki_before_key": Trick(hub_spki_before_key, False, True),
    "constructed_key_bit_string": Trick(constructed_key_bit_string, False, False),
    "trailing_data": Trick(trailing_data, False, False),
    "extra_element_in_certificate": Trick(extra_element_in_certificate, False, False),
}


# ---------------------------------------------------------------------------
# Fixtures: the real hub's certificate (made by the hub's own code) and an attacker.

class HubTLS(NamedTuple):
    cert_file: Path
    key_file: Path
    pin: str
    spki: bytes


@pytest.fixture(scope="module")
def hub_tls(tmp_path_factory) -> HubTLS:
    directory = tmp_path_factory.mktemp("hub-tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    ensure_cert(cert_file, key_file, "hub1", "127.0.0.1")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return HubTLS(cert_file, key_file, pin_of_cert_file(cert_file), spki_of(cert))


@pytest.fixture(scope="module")
def keys(hub_tls: HubTLS) -> Keys:
    return Keys(ec.generate_private_key(ec.SECP256R1()), hub_tls.spki)


@pytest.fixture(scope="module")
def attacker_key_file(keys: Keys, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("attacker") / "key.pem"
    path.write_bytes(keys.attacker.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def pem_file(der: bytes, path: Path) -> Path:
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der)
                     + b"-----END CERTIFICATE-----\n")
    return path


class RecordingTLSServer:
    """A one-connection TLS server on 127.0.0.1 that holds only the given key and records
    every byte it receives after the handshake. With `answer`, it answers one HTTP request."""

    def __init__(self, cert_file: Path, key_file: Path, answer: Optional[bytes] = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert_file), str(key_file))
        self.answer = answer
        self.handshake_done = False
        self.received = b""
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(60)
            try:
                tls = self.context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                return
            self.handshake_done = True
            with tls:
                self._record(tls)

    def _record(self, tls: ssl.SSLSocket) -> None:
        answered = False
        while True:
            try:
                data = tls.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not data:
                return
            self.received += data
            if self.answer and not answered and self._request_complete():
                tls.sendall(self.answer)
                answered = True

    def _request_complete(self) -> bool:
        head, sep, body = self.received.partition(b"\r\n\r\n")
        if not sep:
            return False
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                return len(body) >= int(line.split(b":", 1)[1])
        return True

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the test TLS server did not finish"


needs_root_and_tinc = pytest.mark.skipif(
    os.geteuid() != 0 or not any(os.access(os.path.join(d, "tincd"), os.X_OK)
                                 for d in os.environ.get("PATH", "").split(os.pathsep)
                                 + ["/usr/sbin"]),
    reason="bootstrap.py join runs only as root and with tincd installed")

NET, NODE = "pintest", "node1"


@pytest.fixture(scope="module")
def node_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def run_join(token: str, tmp_path: Path, node_rsa_key) -> subprocess.CompletedProcess:
    """The real bootstrap.py join, with its tinc dir in tmp_path and a pre-made node key."""
    tinc_dir = tmp_path / "tinc"
    hosts = tinc_dir / NET / "hosts"
    hosts.mkdir(parents=True)
    (tinc_dir / NET / "rsa_key.priv").write_bytes(node_rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (hosts / NODE).write_bytes(node_rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINC_BOOTSTRAP_")}
    env.update(TINC_BOOTSTRAP_TOKEN=token, TINC_BOOTSTRAP_TINC_DIR=str(tinc_dir),
               TINC_BOOTSTRAP_LOG="")
    return subprocess.run(
        [sys.executable, BOOTSTRAP_PY, "join", "--name", NODE, "--init", "none",
         "--key-size", "2048", "--timeout", "5"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)


def token_for(port: int, pin: str) -> str:
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    return bootstrap.encode_token(bootstrap.Token("127.0.0.1", port, pin, NET, "hub1", secret))


# ---------------------------------------------------------------------------
# The tricks: what OpenSSL, the old walker and the strict reader make of each.

def served_peer_der(cert_file: Path, key_file: Path) -> Optional[bytes]:
    """The certificate DER a CERT_NONE client sees from a server loaded with (cert, key);
    None if OpenSSL refuses to load it or the handshake fails."""
    try:
        server = RecordingTLSServer(cert_file, key_file)
    except ssl.SSLError:
        return None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            with client.wrap_socket(raw, server_hostname="hub1") as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    finally:
        server.close()


@pytest.mark.parametrize("trick_name", sorted(TRICKS))
def test_trick_is_what_the_table_says_and_never_yields_the_hub_pin(
        trick_name: str, keys: Keys, hub_tls: HubTLS, attacker_key_file: Path, tmp_path) -> None:
    trick = TRICKS[trick_name]
    der = trick.build(keys)
    peer = served_peer_der(pem_file(der, tmp_path / "cert.pem"), attacker_key_file)
    assert (peer is not None) == trick.openssl_accepts
    try:
        old = old_spki_pin_from_cert_der(der)
    except (ValueError, IndexError):
        old = None
    assert (old == hub_tls.pin) == trick.fools_old_walker  # the attack was real before
    for seen in (der, peer):
        if seen is None:
            continue
        try:
            pin = bootstrap.spki_pin_from_cert_der(seen)
        except ValueError:
            continue
        assert pin == pin_of_spki(spki_of(keys.attacker))  # strict DER: the key TLS used


def test_strict_reader_agrees_on_the_hub_certificate(hub_tls: HubTLS) -> None:
    cert = x509.load_pem_x509_certificate(hub_tls.cert_file.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert bootstrap.spki_pin_from_cert_der(der) == hub_tls.pin
    assert bootstrap.spki_der_from_cert_der(der) == hub_tls.spki


@pytest.mark.parametrize("trick_name", sorted(n for n, t in TRICKS.items() if t.openssl_accepts))
@needs_root_and_tinc
def test_crafted_certificate_on_loopback_gets_no_byte(
        trick_name: str, keys: Keys, hub_tls: HubTLS, attacker_key_file: Path, tmp_path,
        node_rsa_key) -> None:
    cert_file = pem_file(TRICKS[trick_name].build(keys), tmp_path / "attacker-cert.pem")
    server = RecordingTLSServer(cert_file, attacker_key_file)
    token = token_for(server.port, hub_tls.pin)
    try:
        proc = run_join(token, tmp_path, node_rsa_key)
    finally:
        server.close()
    output = proc.stdout + proc.stderr
    assert proc.returncode == bootstrap.EXIT_REFUSED, output
    assert "does not match the pin" in proc.stderr and hub_tls.pin in proc.stderr, output
    assert server.handshake_done, "the attacker's TLS server never completed a handshake"
    assert server.received == b""
    assert token not in output and bootstrap.decode_token(token).secret not in output


@needs_root_and_tinc
def test_positive_control_the_real_hub_key_receives_the_token(
        hub_tls: HubTLS, tmp_path, node_rsa_key) -> None:
    body = b'{"error": "positive control"}'
    answer = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
              + body)
    server = RecordingTLSServer(hub_tls.cert_file, hub_tls.key_file, answer=answer)
    token = token_for(server.port, hub_tls.pin)
    try:
        proc = run_join(token, tmp_path, node_rsa_key)
    finally:
        server.close()
    assert proc.returncode == bootstrap.EXIT_REFUSED, proc.stderr
    assert "positive control" in proc.stderr
    assert server.handshake_done
    assert b"POST /v1/enroll " in server.received
    assert b"Authorization: Bearer " + token.encode() in server.received
