#!/bin/sh
# Provision the NAT router: forward the LAN to the "public" side with nftables masquerade.
# Usage: router.sh PUBLIC_IP LAN_CIDR
set -eu
public_ip=$1 lan=$2
command -v nft >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables; }
wan=$(ip -o -4 addr show | awk -v ip="$public_ip" 'index($4, ip "/") == 1 {print $2; exit}')
[ -n "$wan" ] || { echo "router: no interface holds $public_ip" >&2; exit 1; }
echo 'net.ipv4.ip_forward = 1' > /etc/sysctl.d/90-tinc-lab.conf
sysctl -q -p /etc/sysctl.d/90-tinc-lab.conf
cat > /etc/nftables.conf <<NFT
#!/usr/sbin/nft -f
flush ruleset
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr $lan oifname "$wan" masquerade
    }
}
NFT
systemctl enable --now nftables
nft -f /etc/nftables.conf
