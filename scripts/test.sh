#!/usr/bin/env bash
# Install what the test suite needs and run all of it. Used by the README and by CI.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k curl`).
set -euo pipefail
cd "$(dirname "$0")/.."

# haproxy and ip live in /usr/sbin, which is not on every user's PATH.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
need=()
for tool in curl lftp haproxy shellcheck; do have "$tool" || need+=("$tool"); done
have go || need+=(golang-go)  # builds the Go client in tests/clients/goftps
have ip || need+=(iproute2)   # network namespaces for tests/network
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
have nft || need+=(nftables)  # self-test firewall-drop cases (as root)
have redis-server || need+=(redis-server)  # the cluster tests (issue 15)
if [ ${#need[@]} -gt 0 ]; then
  # As root (a container) there may be no sudo at all; otherwise apt needs it, and
  # sudo drops DEBIAN_FRONTEND from the environment, so env passes it through.
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,dev]'

.venv/bin/ruff check ftps_gateway tests bench
.venv/bin/ruff format --check ftps_gateway tests bench
.venv/bin/mypy ftps_gateway
.venv/bin/python -m pytest "$@"
