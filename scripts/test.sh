#!/usr/bin/env bash
# Installs what is missing, then runs the linters and the whole test suite (run as root).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff check src tests bench scripts || exit 1
.venv/bin/mypy || exit 1
.venv/bin/pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest's 5 means no test ran at all: that is a failure here, never a pass.
if [[ $rc -eq 5 ]]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $rc
