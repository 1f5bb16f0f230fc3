#!/usr/bin/env bash
# Installs everything compute-supervisor needs on a bare Debian bookworm machine (or image):
# PostgreSQL 15 and tools from Debian's packages, then the package in a virtualenv that the
# unprivileged compute user can read. Idempotent. Used by .ci/run, scripts/demo, scripts/test
# and the Dockerfile, so CI exercises the image's install steps.
#
#   COMPUTE_VENV   virtualenv path (default /opt/compute-supervisor/venv)
#   WITH_TESTS=1   also install the test dependencies (prometheus-postgres-exporter, and prometheus
#                  for promtool, among them)
#   WITH_POSTGRES_EXPORTER=1   also install Debian's prometheus-postgres-exporter (the image's build arg)
#   PIP_CERT       CA bundle for pip (a proxy's), optional
#   SKIP_IF_CURRENT=1   leave the venv alone when it already holds these sources (and the test
#                  dependencies when WITH_TESTS=1): scripts/test --fast
#
# The venv records a hash of the sources it got (share/compute-supervisor/installed-sources.sha256):
# the tests that run the installed copy refuse a stale one (tests/support/installed.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COMPUTE_VENV:-/opt/compute-supervisor/venv}"
packages=(postgresql-15 python3 python3-venv util-linux gdb procps ca-certificates)
if [ "${WITH_TESTS:-0}" = 1 ] || [ "${WITH_POSTGRES_EXPORTER:-0}" = 1 ]; then
  packages+=(prometheus-postgres-exporter)  # supervised with --postgres-exporter; e2e-tested
fi
if [ "${WITH_TESTS:-0}" = 1 ]; then
  packages+=(prometheus)  # its promtool checks our /metrics page (`promtool check metrics`)
fi

# Behind a TLS-intercepting proxy pass its CA bundle as PIP_CERT (pip reads it); an empty one
# (an unset Docker build arg) must not reach pip.
[ -n "${PIP_CERT:-}" ] || unset PIP_CERT

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# sha256 of `sha256sum` of every installed source file, in byte order of the paths; the same as
# tests/support/installed.py's source_hash (keep the two in step).
source_hash() {
  (cd "$1" && {
    for f in pyproject.toml docs/openapi.yaml; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done
    find compute supervisor -name __pycache__ -prune -o -type f ! -name '*.pyc' -print0
  } | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}
stamp="$venv/share/compute-supervisor/installed-sources.sha256"

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing ${missing[*]}"
  # No default cluster: every compute makes its own PGDATA.
  sudo_ mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | sudo_ tee /etc/postgresql-common/createcluster.conf >/dev/null
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
id postgres >/dev/null 2>&1 || sudo_ useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres

if [ "${SKIP_IF_CURRENT:-0}" = 1 ] && [ -x "$venv/bin/python" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$(source_hash "$repo")" ] \
    && { [ "${WITH_TESTS:-0}" != 1 ] || "$venv/bin/python" -c "import pytest, hypothesis, xdist, openapi_core, importlinter, kubernetes_validate" 2>/dev/null; }; then
  echo "install.sh: $venv is current"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  sudo_ mkdir -p "$(dirname "$venv")"
  sudo_ /usr/bin/python3 -m venv "$venv"
  sudo_ "$venv/bin/python" -m pip install -q --upgrade pip
fi
extra=""
[ "${WITH_TESTS:-0}" = 1 ] && extra="[test]"
# A real (not editable) install: the compute user cannot read a checkout under /root.
# Build from a copy so no build/ or egg-info litter is left in the checkout.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
(cd "$repo" && tar --exclude=.git --exclude='*.egg-info' --exclude=build -cf - .) | tar -xf - -C "$build"
sudo_ "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps "$build"
sudo_ "$venv/bin/python" -m pip install -q --disable-pip-version-check "$build$extra"
# `compute-ctl` on PATH (its sub-commands `supervisorctl` and `plan` need no venv path), for the
# default venv only: another venv (a test's) never takes the name over; a real file is left alone.
if [ "$venv" = /opt/compute-supervisor/venv ] && { [ -L /usr/local/bin/compute-ctl ] || [ ! -e /usr/local/bin/compute-ctl ]; }; then
  sudo_ ln -sfn "$venv/bin/compute-ctl" /usr/local/bin/compute-ctl
fi
source_hash "$build" | sudo_ tee "$stamp" >/dev/null
sudo_ chmod -R a+rX "$(dirname "$venv")"
echo "install.sh: compute-ctl installed in $venv"
