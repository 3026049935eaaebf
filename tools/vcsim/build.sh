#!/usr/bin/env bash
# Build kubegate's vcsim offline, in GOPATH mode, against Debian's govmomi sources
# (golang-github-vmware-govmomi-dev, /usr/share/gocode).
# Usage: tools/vcsim/build.sh [OUTPUT]   (default: .kubegate/bin/vcsim, relative to the repo root)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-.kubegate/bin/vcsim}"
case "$out" in
  /*) ;;
  *) out="$root/$out" ;;
esac

if ! command -v go >/dev/null 2>&1; then
  echo "build.sh: 'go' not found (apt-get install golang-go golang-github-vmware-govmomi-dev)" >&2
  exit 1
fi
if [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
  echo "build.sh: govmomi sources missing (apt-get install golang-github-vmware-govmomi-dev)" >&2
  exit 1
fi

mkdir -p "$(dirname "$out")"

# Use the user's build cache when it is writable, else one under .kubegate/.
if [ -z "${GOCACHE:-}" ] || [ "${GOCACHE}" = off ]; then
  cache="$(go env GOCACHE 2>/dev/null || true)"
  case "$cache" in
    /*) ;;
    *) cache="" ;;  # "off" (no HOME) or unset
  esac
  if [ -z "$cache" ] || ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
    export GOCACHE="$root/.kubegate/go-cache"
    mkdir -p "$GOCACHE"
  fi
fi

cd "$root"
GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= go build -o "$out" ./tools/vcsim
