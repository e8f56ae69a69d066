#!/bin/sh
# Provision a node behind the NAT: route to the hub through the router, then join the VPN
# with the one-liner the hub printed (`tinc-hub token create --json`), then ping.
# A PING_ADDRESS that is this node's own VPN address is skipped; for the others it waits (at
# most ~3 min each) until they answer: nodes brought up in parallel join at the same time.
# The bootstrap reads its settings from TINC_BOOTSTRAP_* (e.g. TINC_BOOTSTRAP_KEY_SIZE).
# Usage: node.sh TOKEN_JSON ROUTER_LAN_IP PUBLIC_CIDR PING_ADDRESS...
set -eu
token_json=$1 router=$2 public=$3
shift 3
case "$public/$router/$*" in
    *[!0-9./\ ]*) echo "node.sh: '$public', '$router' and '$*' must be IPv4 addresses" >&2; exit 1 ;;
esac
[ -r "$token_json" ] || { echo "node.sh: no token file $token_json; hint: bring the hub up" \
    "first (vagrant up erebor gate)" >&2; exit 1; }
ip route replace "$public" via "$router"
if [ -d /run/systemd/system ]; then
    # the same route at every boot (`vagrant reload`), so that tincd finds the hub again
    cat > /etc/systemd/system/tinc-lab-route.service <<UNIT
[Unit]
Description=tinc lab: route to the hub's network through the NAT router
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'n=0; until ip route replace $public via $router; do n=\$\$((n + 1)); [ \$\$n -lt 60 ] || exit 1; sleep 1; done'

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable -q tinc-lab-route.service
fi
if ! command -v python3 >/dev/null; then   # CentOS 7 images ship without python3
    if command -v yum >/dev/null; then yum install -y -q python3; else apt-get install -y -q python3; fi
fi
command=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["command"])' "$token_json")
# The one-liner holds the token: hand it to sh on stdin (printf is a builtin), never as an
# argument (`sh -c "$command"` would show it in ps to every user of the machine).
printf '%s\n' "$command" | sh
for address in "$@"; do
    if [ -n "$(ip -o -4 addr show to "$address/32")" ]; then
        continue   # this node's own address
    fi
    tries=0
    until ping -c 1 -W 2 "$address" >/dev/null 2>&1 || [ "$tries" -ge 60 ]; do
        tries=$((tries + 1))
        sleep 1
    done
    ping -c 3 -W 2 "$address"
done
