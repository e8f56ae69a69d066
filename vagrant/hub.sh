#!/bin/sh
# Provision the hub: install tinc-hub from this repo and run `tinc-hub init`, which under
# systemd also enables and starts tinc-hub.service (the enrolment API).
# Offline when REPO_DIR/vagrant/wheelhouse/ exists: pip then takes the hub's dependencies
# (and setuptools/wheel, to build the project) from there and never asks a package index;
# a tinc_hub wheel there (labkit.vms builds one from the same copy) is installed as it is,
# without building the project in the guest.
# Usage: hub.sh NET NAME PUBLIC_IP VPN_SUBNET REPO_DIR [KEY_SIZE (of a new key; 4096)]
set -eu
net=$1 name=$2 address=$3 subnet=$4 repo=$5 key_size=${6:-4096}
case "$key_size" in
    ''|*[!0-9]*) echo "hub.sh: KEY_SIZE '$key_size' must be a number of bits" >&2; exit 1 ;;
esac
wheelhouse=$repo/vagrant/wheelhouse
venv=/opt/tinc-hub
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    [ ! -d "$wheelhouse" ] || { echo "hub.sh: python3-venv missing and no package index (offline)" >&2; exit 1; }
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
# Under emulation `python3 -m venv` spends most of its time installing pip itself into the
# venv: Debian's and Ubuntu's python3-venv ship pip as a wheel, which runs from there
# (pip's documented way to run a wheel of pip) and installs into the venv's python.
pip_wheel=
for wheel in /usr/share/python-wheels/pip-*.whl; do
    [ ! -f "$wheel" ] || pip_wheel=$wheel
done
if [ -n "$pip_wheel" ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv --without-pip "$venv"
    venv_pip() { "$venv/bin/python" "$pip_wheel/pip" "$@"; }
else
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    venv_pip() { "$venv/bin/pip" "$@"; }
fi
# Re-provisioning: pip builds and reinstalls the project even when nothing changed (~2 min
# under emulation), so the digest of what it was installed from is kept beside the venv and
# pip is skipped when it matches. Every file of the synced folder counts (the wheelhouse
# too) but the tokens directory, caches and what pip's in-tree build writes there (build/,
# *.egg-info): a needless reinstall costs time, a missed one would not.
stamp=$venv/.installed-from.sha256
digest=$(cd "$repo" && find . \( -path ./.vagrant-lab -o -path ./build -o -name '*.egg-info' \
    -o -name __pycache__ \) -prune -o -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d ' ' -f 1)
if [ -x "$venv/bin/tinc-hub" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ]; then
    echo "hub.sh: tinc-hub already installed from this very project, pip skipped"
else
    rm -f "$stamp"
    started=$(date +%s)
    # --no-compile: Python writes the .pyc of what it imports at first use (as root: hub.sh,
    # tinc-hub init), instead of pip compiling every module of every dependency up front
    if [ -d "$wheelhouse" ]; then
        project=$repo
        for wheel in "$wheelhouse"/tinc_hub-*.whl; do
            [ ! -f "$wheel" ] || project=$wheel
        done
        PIP_NO_INDEX=1 PIP_FIND_LINKS=$wheelhouse venv_pip install -q --no-compile \
            --disable-pip-version-check "$project"
    else
        venv_pip install -q --no-compile --disable-pip-version-check "$repo"
    fi
    echo "$digest" > "$stamp"
    echo "hub.sh: tinc-hub installed in $(($(date +%s) - started)) s"
fi
ln -sf "$venv/bin/tinc-hub" /usr/local/bin/tinc-hub
started=$(date +%s)
tinc-hub init --net "$net" --name "$name" --address "$address" --vpn-subnet "$subnet" \
    --key-size "$key_size"
echo "hub.sh: tinc-hub init in $(($(date +%s) - started)) s"
