#!/bin/sh
# Set the machine's host name, as Vagrant's `config.vm.hostname` would, but without what
# Vagrant does with it on Debian (a dozen ssh round trips and a restart of every network
# interface: ~30 s per VM under emulation). The first provisioner of every machine: the
# node's bootstrap names the node after it.
# Usage: hostname.sh NAME
set -eu
name=$1
case "$name" in
    [A-Za-z0-9]*) ;;
    *) echo "hostname.sh: '$name' is not a host name" >&2; exit 1 ;;
esac
case "$name" in
    *[!A-Za-z0-9-]*) echo "hostname.sh: '$name' is not a host name" >&2; exit 1 ;;
esac
# (not hostnamectl: it needs D-Bus, which the lab's box does not have; systemd reads
# /etc/hostname at boot)
if [ "$(cat /etc/hostname 2>/dev/null)" != "$name" ]; then
    echo "$name" > /etc/hostname
fi
[ "$(hostname)" = "$name" ] || hostname "$name"
# the name resolves to this machine (sudo and tincd look it up), as Vagrant's 127.0.X.1 line
if ! grep -q "^127\.0\.1\.1[[:space:]]$name\$" /etc/hosts; then
    hosts=$(grep -v '^127\.0\.1\.1[[:space:]]' /etc/hosts || true)
    printf '%s\n127.0.1.1 %s\n' "$hosts" "$name" > /etc/hosts
fi
