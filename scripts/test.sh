#!/usr/bin/env bash
# Install what the test suite needs and run all of it. Used by the README and by CI.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k curl`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in curl lftp haproxy shellcheck; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,dev]'

.venv/bin/ruff check ftps_gateway tests
.venv/bin/mypy ftps_gateway
.venv/bin/python -m pytest "$@"
