#!/bin/sh
# Provision the hub: install tinc-hub from this repo and run `tinc-hub init`, which under
# systemd also enables and starts tinc-hub.service (the enrolment API).
# Usage: hub.sh NET NAME PUBLIC_IP VPN_SUBNET REPO_DIR
set -eu
net=$1 name=$2 address=$3 subnet=$4 repo=$5
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
[ -x /opt/tinc-hub/bin/tinc-hub ] || python3 -m venv /opt/tinc-hub
/opt/tinc-hub/bin/pip install -q "$repo"
ln -sf /opt/tinc-hub/bin/tinc-hub /usr/local/bin/tinc-hub
tinc-hub init --net "$net" --name "$name" --address "$address" --vpn-subnet "$subnet"
