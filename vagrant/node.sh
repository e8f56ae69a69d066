#!/bin/sh
# Provision a node behind the NAT: route to the hub through the router, then join the VPN
# with the one-liner the hub printed (`tinc-hub token create --json`), then ping.
# Usage: node.sh TOKEN_JSON ROUTER_LAN_IP PUBLIC_CIDR PING_ADDRESS...
set -eu
token_json=$1 router=$2 public=$3
shift 3
ip route replace "$public" via "$router"
if ! command -v python3 >/dev/null; then   # CentOS 7 images ship without python3
    if command -v yum >/dev/null; then yum install -y -q python3; else apt-get install -y -q python3; fi
fi
command=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["command"])' "$token_json")
# The one-liner holds the token: hand it to sh on stdin (printf is a builtin), never as an
# argument (`sh -c "$command"` would show it in ps to every user of the machine).
printf '%s\n' "$command" | sh
for address in "$@"; do
    ping -c 3 -W 2 "$address"
done
