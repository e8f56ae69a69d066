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
# Re-provisioning: pip builds and reinstalls the project even when nothing changed (~2 min
# under emulation), so the digest of what it was installed from is kept beside the venv and
# pip is skipped when it matches. Every file of the synced folder counts (the wheelhouse
# too) but the tokens directory, caches and what pip's in-tree build writes there (build/,
# *.egg-info): a needless reinstall costs time, a missed one would not.
stamp=/opt/tinc-hub/.installed-from.sha256
digest=$(cd "$repo" && find . \( -path ./.vagrant-lab -o -path ./build -o -name '*.egg-info' \
    -o -name __pycache__ \) -prune -o -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d ' ' -f 1)
if [ -x /opt/tinc-hub/bin/tinc-hub ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
    echo "hub.sh: tinc-hub already installed from this very project, pip skipped"
else
    rm -f "$stamp"
    if [ -d "$wheelhouse" ]; then
        PIP_NO_INDEX=1 PIP_FIND_LINKS=$wheelhouse /opt/tinc-hub/bin/pip install -q \
            --disable-pip-version-check "$repo"
    else
        /opt/tinc-hub/bin/pip install -q "$repo"
    fi
    echo "$digest" > "$stamp"
fi
ln -sf /opt/tinc-hub/bin/tinc-hub /usr/local/bin/tinc-hub
tinc-hub init --net "$net" --name "$name" --address "$address" --vpn-subnet "$subnet"
