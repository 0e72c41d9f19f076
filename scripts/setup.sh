#!/usr/bin/env bash
# Installs everything pytier, its tests, demo and benchmarks need on a Debian machine (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
debs=(python3 python3-venv python3-pip iproute2 nftables iperf3 kcptun ethtool iputils-ping procps kmod systemd)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe tun 2>/dev/null || true
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check setuptools==80.9.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
