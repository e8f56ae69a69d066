"""The hub pin cannot be fooled: crafted certificates against bootstrap.py's strict DER reader.

An on-path attacker holds only its own key. It serves a certificate that OpenSSL accepts
(TLS really runs with the attacker's key) but that hides the real hub's SubjectPublicKeyInfo
where a lenient DER walker would find it. bootstrap.py must refuse (exit 4) before it sends a
single byte, so the attacker never sees `Authorization: Bearer <token>`.
"""

import base64
import datetime
import hashlib
import json
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
from hypothesis import HealthCheck, event, given, settings
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


def join_served_by(cert_file: Path, key_file: Path, pin: str, tmp_path: Path, node_rsa_key,
                   answer: Optional[bytes] = None
                   ) -> Tuple[subprocess.CompletedProcess, "RecordingTLSServer", str]:
    """The real join against a loopback TLS server holding cert_file/key_file (answering
    `answer`, if any), with a token carrying `pin`: (the join, the server, the token)."""
    server = RecordingTLSServer(cert_file, key_file, answer=answer)
    token = token_for(server.port, pin)
    try:
        proc = run_join(token, tmp_path, node_rsa_key)
    finally:
        server.close()
    return proc, server, token


def http_answer(status: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 JSON answer, as a hub would send it."""
    return ("HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n"
            "Connection: close\r\n\r\n".format(status, len(body))).encode() + body


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
    proc, server, token = join_served_by(cert_file, attacker_key_file, hub_tls.pin, tmp_path,
                                         node_rsa_key)
    output = proc.stdout + proc.stderr
    assert proc.returncode == bootstrap.EXIT_REFUSED, output
    assert "does not match the pin" in proc.stderr and hub_tls.pin in proc.stderr, output
    assert server.handshake_done, "the attacker's TLS server never completed a handshake"
    assert server.received == b""
    assert token not in output and bootstrap.decode_token(token).secret not in output


@needs_root_and_tinc
def test_positive_control_the_real_hub_key_receives_the_token(
        hub_tls: HubTLS, tmp_path, node_rsa_key) -> None:
    answer = http_answer("403 Forbidden", b'{"error": "positive control"}')
    proc, server, token = join_served_by(hub_tls.cert_file, hub_tls.key_file, hub_tls.pin,
                                         tmp_path, node_rsa_key, answer)
    assert proc.returncode == bootstrap.EXIT_REFUSED, proc.stderr
    assert "positive control" in proc.stderr
    assert server.handshake_done
    assert b"POST /v1/enroll " in server.received
    assert b"Authorization: Bearer " + token.encode() in server.received


@pytest.mark.parametrize("status,body,needle", [
    (200, b"[" * 200000, "answer is malformed"),  # json.loads: RecursionError
    (403, b'{"error": "\\u001b]0;pwned\\u0007no"}', "refused the enrolment: ?]0;pwned?no"),
])
@needs_root_and_tinc
def test_a_hostile_hub_answer_is_a_clean_refusal(hub_tls: HubTLS, tmp_path, node_rsa_key,
                                                 status: int, body: bytes, needle: str) -> None:
    proc, _, _ = join_served_by(hub_tls.cert_file, hub_tls.key_file, hub_tls.pin, tmp_path,
                                node_rsa_key, http_answer("{} X".format(status), body))
    assert proc.returncode == bootstrap.EXIT_REFUSED, proc.stderr
    assert needle in proc.stderr and "\x1b" not in proc.stderr, proc.stderr


@needs_root_and_tinc
def test_a_hostile_hub_host_file_is_never_written(hub_tls: HubTLS, tmp_path, node_rsa_key) -> None:
    """The hub itself (it holds the pinned key) answers with a host file whose PublicKey line
    would make tincd trust another key and whose PublicKeyFile would make root tincd open
    /etc/shadow: the node refuses the answer and writes no hosts/HUB, tinc-up or state."""
    hub_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key() \
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    host_file = ("Address = 127.0.0.1\nPublicKey = " + "AB" * 256 +
                 "\nPublicKeyFile = /etc/shadow\nSubnet = 10.0.0.1/32\n\n" + hub_pem)
    body = json.dumps({"name": NODE, "address": "10.0.0.2", "prefix": 24,
                       "hub": {"name": "hub1", "host_file": host_file}}).encode()
    proc, server, _ = join_served_by(hub_tls.cert_file, hub_tls.key_file, hub_tls.pin, tmp_path,
                                     node_rsa_key, http_answer("200 OK", body))
    assert b"POST /v1/enroll " in server.received  # the answer was read, and refused
    assert proc.returncode == bootstrap.EXIT_REFUSED, proc.stderr
    assert "host file is refused" in proc.stderr and "PublicKey" in proc.stderr, proc.stderr
    net = tmp_path / "tinc" / NET
    assert sorted(p.name for p in (net / "hosts").iterdir()) == [NODE]
    assert not (net / "tinc-up").exists() and not (net / bootstrap.STATE_FILE).exists()


# ---------------------------------------------------------------------------
# The strict reader's rules, one violation at a time, on an otherwise good certificate.

def _cert_parts(keys: Keys) -> Dict[str, bytes]:
    return {"version": VERSION_3, "serial": SERIAL, "signature": ECDSA_SHA256,
            "issuer": name("hub1"), "validity": validity(), "subject": name("hub1"),
            "spki": spki_of(keys.attacker), "tail": extensions()}


def _assemble(parts: Dict[str, bytes], key: ec.EllipticCurvePrivateKey) -> bytes:
    return signed_cert(seq(*parts.values()), key)


@pytest.mark.parametrize("field,value", [
    ("version", tlv(0xA0, tlv(0x02, b"\x02") + tlv(0x02, b"\x02"))),  # two INTEGERs
    ("version", tlv(0xA0, tlv(0x04, b"\x02"))),  # not an INTEGER
    ("serial", tlv(0x03, b"\x00\x01")),  # wrong tag
    ("validity", tlv(0x31, content_of(validity()))),  # SET, not SEQUENCE
    ("spki", seq(seq(oid("1.2.840.10045.2.1"), oid("1.2.840.10045.3.1.7"), NULL),
                 tlv(0x03, b"\x00\x04"))),  # two algorithm parameters
    ("spki", seq(seq(oid("1.2.840.10045.2.1")), tlv(0x03, b"\x07\x04"))),  # unused bits
    ("spki", seq(seq(oid("1.2.840.10045.2.1")), tlv(0x03, b""))),  # empty BIT STRING
    ("spki", seq(seq(NULL), tlv(0x03, b"\x00\x04"))),  # no algorithm OID
    ("tail", extensions() + tlv(0x81, b"\x00")),  # [1] after [3]
    ("tail", tlv(0x81, b"\x00") + tlv(0x81, b"\x00")),  # [1] twice
    ("tail", tlv(0xA3, seq() + seq())),  # [3] holding two SEQUENCEs
    ("tail", tlv(0xA4, seq())),  # unknown [4]
])
def test_strict_reader_refuses_each_deviation(field: str, value: bytes, keys: Keys) -> None:
    parts = _cert_parts(keys)
    good = _assemble(parts, keys.attacker)
    assert bootstrap.spki_pin_from_cert_der(good) == pin_of_spki(spki_of(keys.attacker))
    parts[field] = value
    with pytest.raises(ValueError):
        bootstrap.spki_pin_from_cert_der(_assemble(parts, keys.attacker))


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x00", b"\x30\x80\x00\x00",
                                 b"\x30\x84\xff\xff\xff\xff", b"\x1f\x10\x00"])
def test_strict_reader_refuses_scraps(der: bytes) -> None:
    with pytest.raises(ValueError):
        bootstrap.spki_pin_from_cert_der(der)


# ---------------------------------------------------------------------------
# Property: on generated and mutated certificates, the pin is the key that a real parser
# finds, or there is no pin at all.

class OpenSSLOracle:
    """The SPKI that OpenSSL (the very libcrypto that Python's ssl, and so bootstrap.py's
    TLS, uses) finds in a certificate, or None if it does not parse it as one certificate."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util
        self.ctypes = ctypes
        lib = ctypes.CDLL(ctypes.util.find_library("crypto"))
        lib.OpenSSL_version.restype = ctypes.c_char_p
        lib.OpenSSL_version.argtypes = [ctypes.c_int]
        assert lib.OpenSSL_version(0).decode() == ssl.OPENSSL_VERSION, "not the ssl module's"
        lib.d2i_X509.restype = ctypes.c_void_p
        lib.d2i_X509.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_long]
        lib.X509_get_X509_PUBKEY.restype = ctypes.c_void_p
        lib.X509_get_X509_PUBKEY.argtypes = [ctypes.c_void_p]
        lib.i2d_X509_PUBKEY.restype = ctypes.c_int
        lib.i2d_X509_PUBKEY.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.X509_free.argtypes = [ctypes.c_void_p]
        lib.ERR_clear_error.argtypes = []
        self.lib = lib

    def spki(self, der: bytes) -> Optional[bytes]:
        ctypes, lib = self.ctypes, self.lib
        buffer = ctypes.create_string_buffer(der, len(der))
        cursor = ctypes.c_void_p(ctypes.addressof(buffer))
        cert = lib.d2i_X509(None, ctypes.byref(cursor), len(der))
        lib.ERR_clear_error()
        if not cert:
            return None
        try:
            if cursor.value - ctypes.addressof(buffer) != len(der):
                return None  # a TLS client refuses a certificate with bytes after it
            public = lib.X509_get_X509_PUBKEY(cert)
            size = lib.i2d_X509_PUBKEY(public, None)
            if size <= 0:
                return None
            out = ctypes.create_string_buffer(size)
            out_cursor = ctypes.c_void_p(ctypes.addressof(out))
            assert lib.i2d_X509_PUBKEY(public, ctypes.byref(out_cursor)) == size
            return out.raw
        finally:
            lib.X509_free(cert)


OPENSSL = OpenSSLOracle()


class Oracle(NamedTuple):
    cert_loads: bool  # cryptography parses the certificate
    pin: Optional[str]  # cryptography's pin (cert and key parse), else None
    openssl_pin: Optional[str]


def oracle(der: bytes) -> Oracle:
    openssl_spki = OPENSSL.spki(der)
    openssl_pin = pin_of_spki(openssl_spki) if openssl_spki is not None else None
    try:
        cert = x509.load_der_x509_certificate(der)
    except Exception:  # any refusal counts: ValueError, UnsupportedAlgorithm, ...
        return Oracle(False, None, openssl_pin)
    try:
        return Oracle(True, pin_of_spki(spki_of(cert)), openssl_pin)
    except Exception:
        return Oracle(True, None, openssl_pin)


KEY_KINDS = ("p256", "p384", "rsa2048", "ed25519")
_KEY_POOL: Dict[str, object] = {}


def pool_key(kind: str):
    if kind not in _KEY_POOL:
        _KEY_POOL[kind] = {
            "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
            "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ed25519": ed25519.Ed25519PrivateKey.generate,
        }[kind]()
    return _KEY_POOL[kind]


LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


@st.composite
def generated_certs(draw) -> bytes:
    kind = draw(st.sampled_from(KEY_KINDS))
    key = pool_key(kind)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, draw(LABEL))]
    if draw(st.booleans()):
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, draw(LABEL)))
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name(attributes))
               .issuer_name(x509.Name(attributes[:1])).public_key(key.public_key())
               .serial_number(draw(st.integers(1, 2 ** 159 - 1)))
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=draw(
                   st.integers(1, 40000)))))
    dns_names = draw(st.lists(LABEL, max_size=3))
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n + ".example") for n in dns_names]), critical=False)
    if draw(st.booleans()):
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                        critical=True)
    if draw(st.booleans()):
        builder = builder.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.99999." + str(draw(st.integers(1, 9)))),
            draw(st.binary(max_size=40))), critical=False)
    cert = builder.sign(key, None if kind == "ed25519" else hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER)
    if draw(st.booleans()):  # a v1 certificate: no [0] version (the signature goes stale)
        der = without_version(der)
    return der


class Node(NamedTuple):
    tag: int
    content: bytes  # primitive content; b"" for constructed
    children: Tuple["Node", ...]  # constructed children


def parse_tree(data: bytes) -> List[Node]:
    """The TLV tree of DER this module made (trusted input; constructed tags descended)."""
    nodes, pos = [], 0
    while pos < len(data):
        tag, first = data[pos], data[pos + 1]
        pos += 2
        length = first
        if first & 0x80:
            length = int.from_bytes(data[pos:pos + (first & 0x7F)], "big")
            pos += first & 0x7F
        content = data[pos:pos + length]
        pos += length
        if tag & 0x20:
            nodes.append(Node(tag, b"", tuple(parse_tree(content))))
        else:
            nodes.append(Node(tag, content, ()))
    return nodes


def encode_tree(nodes, target: int = -1, style: str = "", counter: Optional[List[int]] = None):
    """DER of the tree, except node number `target` (pre-order) re-encoded in `style`."""
    counter = counter if counter is not None else [0]
    out = b""
    for node in nodes:
        index = counter[0]
        counter[0] += 1
        content = encode_tree(node.children, target, style, counter) if node.tag & 0x20 \
            else node.content
        if index != target:
            out += tlv(node.tag, content)
        elif style == "leading_zero":
            out += long_form(node.tag, content, len(der_length(len(content))) + 1)
        elif style == "five_bytes":
            out += long_form(node.tag, content, 5)
        elif style == "indefinite" and node.tag & 0x20:
            out += indefinite(node.tag, content)
        elif style == "high_tag" and node.tag & 0x1F < 0x1F:
            out += bytes([node.tag | 0x1F, node.tag & 0x1F]) + der_length(len(content)) + content
        else:
            out += tlv(node.tag, content)
    return out


def count_nodes(nodes) -> int:
    return sum(1 + count_nodes(node.children) for node in nodes)


def without_version(der: bytes) -> bytes:
    (cert,) = parse_tree(der)
    tbs = cert.children[0]
    tbs = tbs._replace(children=tuple(c for c in tbs.children if c.tag != 0xA0))
    return encode_tree([cert._replace(children=(tbs,) + cert.children[1:])])


def length_byte_offsets(data: bytes, pos: int = 0, end: Optional[int] = None) -> List[int]:
    """Where the first length byte of each element sits in DER this module made (pre-order)."""
    end = len(data) if end is None else end
    offsets = []
    while pos < end:
        tag, first = data[pos], data[pos + 1]
        offsets.append(pos + 1)
        header = 2 + (first & 0x7F if first & 0x80 else 0)
        length = int.from_bytes(data[pos + 2:pos + header], "big") if first & 0x80 else first
        if tag & 0x20:
            offsets += length_byte_offsets(data, pos + header, pos + header + length)
        pos += header + length
    return offsets


POSITION = st.integers(0, 1 << 16)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(1, 255)),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 4)),
    st.tuples(st.just("truncate"), POSITION, st.just(0)),
    st.tuples(st.just("length_byte"), POSITION, st.integers(0, 255)),
    st.tuples(st.just("reencode"), POSITION,
              st.sampled_from(["leading_zero", "five_bytes", "indefinite", "high_tag"])),
)


def mutate(der: bytes, mutation: Tuple[str, int, object]) -> bytes:
    kind, position, arg = mutation
    if kind in ("reencode", "length_byte"):
        try:  # these two need the structure: after an earlier mutation there may be none
            if kind == "reencode":
                tree = parse_tree(der)
                return encode_tree(tree, position % count_nodes(tree), arg)
            offsets = length_byte_offsets(der)
        except (IndexError, ZeroDivisionError):
            return der
        position = offsets[position % len(offsets)]
        return der[:position] + bytes([arg]) + der[position + 1:]
    position %= len(der) + (kind == "insert")
    if kind == "flip":
        return der[:position] + bytes([der[position] ^ arg]) + der[position + 1:]
    if kind == "insert":
        return der[:position] + arg + der[position:]
    if kind == "delete":
        return der[:position] + der[position + arg:]
    return der[:position]  # truncate


def project_pin(der: bytes) -> Optional[str]:
    try:
        return bootstrap.spki_pin_from_cert_der(der)
    except ValueError:
        return None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(der=generated_certs())
def test_generated_certificates_pin_as_cryptography_and_openssl_do(der: bytes) -> None:
    truth = oracle(der)
    assert bootstrap.spki_pin_from_cert_der(der) == truth.pin == truth.openssl_pin


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=generated_certs(), mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_certificates_pin_the_parsers_key_or_refuse(original: bytes, mutations) -> None:
    """Whenever we return a pin, it is the key cryptography and OpenSSL find in those bytes;
    wherever either finds another key, we refuse."""
    der = original
    for mutation in mutations:
        if der:
            der = mutate(der, mutation)
    truth, ours = oracle(der), project_pin(der)
    if der == original:
        assert ours == truth.pin == truth.openssl_pin
        return
    if ours is None:
        event("mutated: refused")
        return  # refusing is always safe
    event("mutated: pin; cryptography {}, OpenSSL {}".format(
        "agrees" if truth.pin else "reads the cert only" if truth.cert_loads else "refuses",
        "agrees" if truth.openssl_pin else "refuses"))
    # We returned a pin: it must be the key each real parser finds in these bytes.
    assert truth.openssl_pin in (None, ours), "OpenSSL would use another key"
    if truth.pin is not None:
        assert ours == truth.pin, "cryptography finds another key"
    elif truth.cert_loads:  # cryptography reads the certificate but not its key:
        with pytest.raises(Exception):  # the pinned bytes are no usable key for anyone
            serialization.load_der_public_key(bootstrap.spki_der_from_cert_der(der))
