"""Tokens (format, TTL, hashing at rest) and the TLS pin."""

import hashlib
import json
import re
import time

import pytest
from cryptography import x509

from bootstrap import bootstrap
from tinc_hub.errors import HubError
from tinc_hub.tls import ensure_cert, pin_of_cert_file
from tinc_hub.tokens import hash_secret, join_command, parse_ttl
from hub_fixtures import HubEnv, dump_registry, hub  # noqa: F401


@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("1h", 3600), ("2d", 172800),
                                          ("1w", 604800), ("90s", 90), ("3600", 3600), (" 2H ", 7200)])
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "1y", "h", "1.5h", "1h30m", "abc"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(HubError):
        parse_ttl(text)


def test_pin_matches_bootstrap_spki_pin_and_openssl_semantics(hub: HubEnv) -> None:
    cert = x509.load_pem_x509_certificate(hub.state.cert_file.read_bytes())
    from cryptography.hazmat.primitives import serialization

    der = cert.public_bytes(serialization.Encoding.DER)
    assert pin_of_cert_file(hub.state.cert_file) == bootstrap.spki_pin_from_cert_der(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (hub.state.key_file.stat().st_mode & 0o777) == 0o600


def test_cert_for_dns_name_and_stable_pin_on_address_change(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert ensure_cert(cert, key, "hub1", "hub.example.org")
    pin = pin_of_cert_file(cert)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example.org"]
    mtime = cert.stat().st_mtime_ns
    assert not ensure_cert(cert, key, "hub1", "hub.example.org")
    assert cert.stat().st_mtime_ns == mtime
    assert ensure_cert(cert, key, "hub1", "192.0.2.7")  # re-issued for the same key
    assert pin_of_cert_file(cert) == pin


def test_token_round_trip_and_only_hash_stored(hub: HubEnv) -> None:
    issued = hub.token(uses=3, ttl=1800, name="web_1", replace=True)
    token = bootstrap.decode_token(issued.token)
    assert token == bootstrap.Token("127.0.0.1", 8655, pin_of_cert_file(hub.state.cert_file),
                                    hub.config.net, "hub1", token.secret)
    assert len(bootstrap._b64url_decode(token.secret)) == 32
    rows = dump_registry(hub.registry)
    assert token.secret not in json.dumps(rows)
    assert ("tokens", hashlib.sha256(token.secret.encode()).hexdigest(), 3, 3, issued.expires_at,
            "web_1", 1, issued.expires_at - 1800, None, None) in rows  # not revoked, not ephemeral
    assert hash_secret(token.secret) == hashlib.sha256(token.secret.encode()).hexdigest()
    assert abs(issued.expires_at - (time.time() + 1800)) < 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", issued.expires_at_iso)


def test_command_uses_env_form_and_pin(hub: HubEnv) -> None:
    issued = hub.token()
    pin = pin_of_cert_file(hub.state.cert_file)
    assert issued.command == (
        f"curl -fsS --pinnedpubkey '{pin}' -k 'https://127.0.0.1:8655/bootstrap.py'"
        f" | TINC_BOOTSTRAP_TOKEN='{issued.token}' python3 -")
    v6 = hub.config.__class__(**{**hub.config.__dict__, "address": "2001:db8::1"})
    assert "'https://[2001:db8::1]:8655/bootstrap.py'" in join_command(v6, pin, issued.token)


def test_token_refuses_bad_bound_name(hub: HubEnv) -> None:
    for name in ("a-b", "hub1", "x" * 65, "a\n"):
        with pytest.raises(HubError):
            hub.token(name=name)
