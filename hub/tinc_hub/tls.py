"""The hub's self-signed TLS certificate and its curl-style SPKI pin."""

import base64
import datetime
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import HubError
from .hostfiles import write_if_changed

CERT_DAYS = 3650


def subject_alt_name(address: str) -> x509.GeneralName:
    """The SAN entry for the hub's public address: an IP when it parses as one, else DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def spki_pin(cert: x509.Certificate) -> str:
    """``sha256//`` + base64 of SHA-256 over the SubjectPublicKeyInfo DER (curl --pinnedpubkey)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise HubError(f"TLS certificate {path} is missing", "re-run 'tinc-hub init'") from None
    except ValueError as exc:
        raise HubError(f"TLS certificate {path} is unreadable ({exc})") from exc


def pin_of_cert_file(path: Path) -> str:
    return spki_pin(load_cert(path))


def _build_cert(key: ec.EllipticCurvePrivateKey, common_name: str, address: str) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([subject_alt_name(address)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _cert_sans(cert: x509.Certificate) -> list:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def ensure_cert(cert_file: Path, key_file: Path, common_name: str, address: str) -> bool:
    """Create the key (EC P-256, 0600) and self-signed cert unless present; True if anything changed.

    The key is never replaced, so the pin stays stable. If the address changed, the
    certificate is re-issued for the same key (same pin).
    """
    changed = False
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(cert_file.parent, 0o700)
    if key_file.exists():
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except ValueError as exc:
            raise HubError(f"TLS key {key_file} is unreadable ({exc})",
                           "move it away to generate a new one (this changes the pin)") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise HubError(f"TLS key {key_file} is not an EC key")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_if_changed(key_file, pem.decode("ascii"), mode=0o600)
        changed = True
    if cert_file.exists() and not changed:
        cert = load_cert(cert_file)
        same_key = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        if same_key and _cert_sans(cert) == [subject_alt_name(address)]:
            return False
    cert = _build_cert(key, common_name, address)
    write_if_changed(cert_file, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), mode=0o644)
    return True

