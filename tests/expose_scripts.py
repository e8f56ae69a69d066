"""Small programs the expose tests run inside their namespaces (python3 -c SCRIPT ARGS)."""

# A UDP sink on the public side: prints "ready", then one line per datagram with its source.
UDP_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    print("got %r from %s" % (data, peer[0]), flush=True)
"""

# A hostile node's datagrams to a public address: SOURCE_ADDR DEST PORT [PAYLOAD [SOURCE_PORT]].
# Sent from its VPN address, policy routing puts them into the VPN, to the hub.
HOSTILE_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[5]) if len(sys.argv) > 5 else 0))
payload = (sys.argv[4] if len(sys.argv) > 4 else "escape").encode()
for _ in range(3):
    try:
        s.sendto(payload, (sys.argv[2], int(sys.argv[3])))
    except OSError:  # ICMP unreachable from the node's tincd (no subnet): nothing left
        pass
"""
