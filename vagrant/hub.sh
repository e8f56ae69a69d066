#!/bin/sh
# Provision the hub: install tinc-hub from this repo and run `tinc-hub init`, which under
# systemd also enables and starts tinc-hub.service (the enrolment API).
# Offline when REPO_DIR/vagrant/wheelhouse/ exists: pip then takes the hub's dependencies
# (and setuptools/wheel, to build the project) from there and never asks a package index.
# Usage: hub.sh NET NAME PUBLIC_IP VPN_SUBNET REPO_DIR
set -eu
net=$1 name=$2 address=$3 subnet=$4 repo=$5
wheelhouse=$repo/vagrant/wheelhouse
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    [ ! -d "$wheelhouse" ] || { echo "hub.sh: python3-venv missing and no package index (offline)" >&2; exit 1; }
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
[ -x /opt/tinc-hub/bin/tinc-hub ] || python3 -m venv /opt/tinc-hub
if [ -d "$wheelhouse" ]; then
    PIP_NO_INDEX=1 PIP_FIND_LINKS=$wheelhouse /opt/tinc-hub/bin/pip install -q \
        --disable-pip-version-check "$repo"
else
    /opt/tinc-hub/bin/pip install -q "$repo"
fi
ln -sf /opt/tinc-hub/bin/tinc-hub /usr/local/bin/tinc-hub
tinc-hub init --net "$net" --name "$name" --address "$address" --vpn-subnet "$subnet"
