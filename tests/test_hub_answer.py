"""A hostile (or broken) hub's enrolment answer, read by the node.

tinc 1.0.36 reads these variables of a peer's host file (hosts/HUB) into that connection's
config (src/net_setup.c, net_socket.c, protocol_auth.c): PublicKey and PublicKeyFile (which
override the PEM block: the key the node checked would not be the key tincd trusts, and
PublicKeyFile makes the root tincd open any path), Address, Port, IndirectData, TCPOnly,
ClampMSS, Weight, PMTU, and Subnet (with StrictSubnets). Commands (ScriptsInterpreter, Proxy)
come only from tinc.conf and the node's own host file, which the node writes itself. So the
node never writes the hub's text: it keeps the Address, Port and Subnet lines it validated and
the RSA public key (strict DER, re-encoded), and refuses anything else.
"""
import base64
import ipaddress

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support import bootstrap
from tinc_hub.hub_init import render_hub_host_file
from tinc_hub.state import HubConfig

NAME = "node1"


@pytest.fixture(scope="module")
def hub_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def pkcs1_pem(hub_key) -> str:
    return hub_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()


def good_host_file(pem: str, *lines: str) -> str:
    head = list(lines) or ["Address = hub.example.org", "Port = 655", "Subnet = 10.0.0.1/32",
                           "Subnet = 10.0.0.0/24"]
    return "\n".join(head) + "\n\n" + pem


def answer_with(host_file: str, **changes) -> dict:
    answer = {"name": NAME, "address": "10.0.0.2", "prefix": 24,
              "hub": {"name": "hub1", "host_file": host_file}}
    answer.update(changes)
    return answer


def refused(answer: dict) -> str:
    with pytest.raises(bootstrap.BootstrapError) as err:
        bootstrap.validate_answer(answer, NAME)
    assert err.value.code == bootstrap.EXIT_REFUSED
    return str(err.value)


def test_the_real_hubs_host_file_comes_back_unchanged(pkcs1_pem: str, tmp_path) -> None:
    """What `tinc-hub init` writes is already canonical: rebuilding it changes nothing (so a
    re-run does not touch the file's mtime)."""
    config = HubConfig(net="pintest", name="hub1", address="hub.example.org", port=655,
                       api_port=8655, vpn_subnet="10.0.0.0/24", hub_address="10.0.0.1",
                       tinc_dir=str(tmp_path), init="none")
    text = render_hub_host_file(config, pkcs1_pem)
    address, prefix, hub, host_file = bootstrap.validate_answer(answer_with(text), NAME)
    assert (address, prefix, hub, host_file) == ("10.0.0.2", 24, "hub1", text)


def test_spki_pem_and_odd_line_breaks_are_rewritten_as_pkcs1(hub_key, pkcs1_pem: str) -> None:
    spki_pem = hub_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    body = "".join(spki_pem.splitlines()[1:-1])
    rewrapped = "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n".format(
        body[:10], body[10:])
    text = "# the hub\nAddress = 192.0.2.1 655\n\n" + rewrapped
    *_, host_file = bootstrap.validate_answer(answer_with(text), NAME)
    assert host_file == "Address = 192.0.2.1 655\n\n" + pkcs1_pem


@pytest.mark.parametrize("extra", [
    "PublicKey = " + "AB" * 256,  # overrides the PEM block: tincd would trust another key
    "PublicKeyFile = /etc/shadow",  # root tincd opens any path
    "PublicKeyFile = /dev/zero",
    "ScriptsInterpreter = /bin/sh -c 'touch /tmp/pwned'",
    "Proxy = exec /bin/sh -c 'touch /tmp/pwned'",
    "IndirectData = yes", "TCPOnly = yes", "Weight = 1", "PMTU = 68", "ClampMSS = no",
    "Name = root", "ConnectTo = evil",
    "address = 192.0.2.1",  # tinc's variable names are case-insensitive; ours are not
    "Address=192.0.2.1", "Address  = 192.0.2.1",
    "Address = evil.example.org 655 extra", "Address = -oProxyCommand=x",
    "Address = a..b", "Address = 192.0.2.1 0", "Address = 192.0.2.1 65536",
    "Address = 192.0.2.1 0655", "Port = 655 656", "Port = 0x28f", "Port = 0655", "Port = 655\nPort = 656",
    "Subnet = 10.0.0.1", "Subnet = 10.0.0.1/24", "Subnet = 10.0.0.001/32",
    "Subnet = 10.0.0.0/24#10", "Subnet = fe80::/64", "Subnet = 00:11:22:33:44:55",
    "Subnet = 10.0.0.1/32\r", "Address = 192.0.2.1\x00PublicKeyFile = /etc/shadow",
    "Address = hub.example.org\x0bPublicKey = AB",
    "\tAddress = 192.0.2.1",
])
def test_any_other_line_is_refused(pkcs1_pem: str, extra: str) -> None:
    refused(answer_with(good_host_file(pkcs1_pem, "Address = 192.0.2.1", extra)))


def test_more_than_64_lines_are_refused(pkcs1_pem: str) -> None:
    lines = ["Address = 192.0.2.1"] + ["Subnet = 10.0.{}.0/24".format(i) for i in range(64)]
    refused(answer_with(good_host_file(pkcs1_pem, *lines)))


@pytest.mark.parametrize("mangle", [
    lambda pem: pem.replace("RSA PUBLIC KEY-----\n", "RSA PUBLIC KEY-----\nPublicKeyFile = /x\n", 1),
    lambda pem: pem + pem,  # two keys
    lambda pem: pem.replace("-----END RSA PUBLIC KEY-----", "-----END PUBLIC KEY-----"),
    lambda pem: pem.replace("-----BEGIN RSA PUBLIC KEY-----", "-----BEGIN CERTIFICATE-----"),
    lambda pem: pem.replace("-----END RSA PUBLIC KEY-----\n", ""),  # never closed
    lambda pem: pem.replace("\n", "\n ", 2),  # a space in the base64
    lambda pem: pem.replace("M", "*", 1),
    lambda pem: "",  # no key at all
    lambda pem: "-----BEGIN RSA PUBLIC KEY-----\nMAA=\n-----END RSA PUBLIC KEY-----\n",  # empty
    lambda pem: "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n".format(
        base64.b64encode(b"\x30\x06\x02\x01\x05\x02\x01\x03\x00").decode()),  # trailing byte
    lambda pem: "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n".format(
        base64.b64encode(b"\x30\x07\x02\x02\x00\x05\x02\x01\x03").decode()),  # non-minimal n
    lambda pem: "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n".format(
        base64.b64encode(b"\x30\x06\x02\x01\x85\x02\x01\x03").decode()),  # negative n
    lambda pem: "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n".format(
        base64.b64encode(b"\x30\x80\x02\x01\x05\x02\x01\x03\x00\x00").decode()),  # BER
])
def test_a_bad_public_key_block_is_refused(pkcs1_pem: str, mangle) -> None:
    refused(answer_with(good_host_file(mangle(pkcs1_pem), "Address = 192.0.2.1")))


def test_config_lines_inside_the_key_block_never_reach_the_node(pkcs1_pem: str) -> None:
    """tinc skips the lines between -----BEGIN and -----END; the old node code read Subnet
    lines anywhere. A Subnet smuggled into the key block must not choose the hub's address."""
    text = good_host_file(pkcs1_pem, "Address = 192.0.2.1").replace(
        "-----END RSA PUBLIC KEY-----", "Subnet = 10.0.0.77/32\n-----END RSA PUBLIC KEY-----")
    refused(answer_with(text))


@pytest.mark.parametrize("subnet", ["192.0.2.66/32", "10.0.1.1/32", "10.0.0.2/32",
                                    "10.0.0.0/32", "10.0.0.255/32"])
def test_the_hubs_vpn_address_lies_inside_the_vpn(pkcs1_pem: str, subnet: str) -> None:
    """Else a hostile hub makes the node ping (and record) any address of the internet."""
    message = refused(answer_with(good_host_file(pkcs1_pem, "Address = 192.0.2.1",
                                                 "Subnet = " + subnet)))
    assert subnet.split("/")[0] in message


@pytest.mark.parametrize("changes", [
    {"prefix": True}, {"prefix": 31}, {"prefix": 0}, {"address": 167772162},
    {"address": "10.0.0.0"}, {"address": "10.0.0.255"}, {"address": "010.0.0.2"},
    {"address": "127.0.0.1", "prefix": 8}, {"address": "224.0.0.2", "prefix": 24},
    {"name": NAME + "x"}, {"hub": {"name": "../hub1", "host_file": "x"}},
    {"hub": {"name": "hub1", "host_file": ["x"]}},
])
def test_bad_answer_fields_are_refused(pkcs1_pem: str, changes: dict) -> None:
    refused(answer_with(good_host_file(pkcs1_pem), **changes))


def test_the_hub_vpn_address_falls_back_to_the_first_host(pkcs1_pem: str) -> None:
    answer = answer_with(good_host_file(pkcs1_pem, "Address = 192.0.2.1"), address="10.9.0.9",
                         prefix=16)
    _, _, _, host_file = bootstrap.validate_answer(answer, NAME)
    assert bootstrap.hub_vpn_address(host_file, "10.9.0.9", 16) == "10.9.0.1"
    assert ipaddress.IPv4Address("10.9.0.1") in ipaddress.IPv4Network("10.9.0.0/16")
