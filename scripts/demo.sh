#!/usr/bin/env bash
# Installs everything, then runs the demo (run as root on Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
