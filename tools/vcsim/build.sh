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

# govmomi's simulator, patched in the build only (/usr/share stays as the package left it):
# WaitForUpdatesEx wakes on a change instead of vcsim 0.24's fixed 250 ms ticker (see
# tools/vcsim/overlay/wake.go.in). `go build -overlay` compiles a patched copy of
# property_collector.go, made here with sed, plus the added file, in place of the originals.
sim=/usr/share/gocode/src/github.com/vmware/govmomi/simulator
build="$(mktemp -d "${TMPDIR:-/tmp}/kubegate-vcsim-build.XXXXXX")"
trap 'rm -rf "$build"' EXIT

patch_line() {  # FILE FROM TO: replace the one line that is exactly FROM (after indentation)
  local file="$1" from="$2" to="$3" count
  count="$(grep -cxF -e "$from" <(sed 's/^[[:space:]]*//' "$file") || true)"
  if [ "$count" != 1 ]; then
    echo "build.sh: expected one line '$from' in $sim/$(basename "$file"), found $count;" \
      "govmomi changed: update tools/vcsim/build.sh and tools/vcsim/overlay/wake.go.in" >&2
    exit 1
  fi
  local tmp="$file.new"
  FROM="$from" TO="$to" awk '{ line = $0; sub(/^[[:space:]]+/, "", line);
    if (line == ENVIRON["FROM"]) { match($0, /^[[:space:]]*/); $0 = substr($0, 1, RLENGTH) ENVIRON["TO"] }
    print }' "$file" >"$tmp"
  mv "$tmp" "$file"
}

cp "$sim/property_collector.go" "$build/property_collector.go"
patch_line "$build/property_collector.go" \
  'pc.updates = append(pc.updates, u)' \
  'pc.updates = append(pc.updates, u); kubegateWake(pc) // kubegate: wake on change'
patch_line "$build/property_collector.go" \
  'ticker := time.NewTicker(250 * time.Millisecond) // allow for updates to accumulate' \
  'ticker := kubegateTicker(pc, oneUpdate) // kubegate: wakes on change, not every 250 ms'
cp "$here/overlay/wake.go.in" "$build/kubegate_wake.go"
cat >"$build/overlay.json" <<JSON
{"Replace": {
  "$sim/property_collector.go": "$build/property_collector.go",
  "$sim/kubegate_wake.go": "$build/kubegate_wake.go"
}}
JSON

cd "$root"
# build next to the output and rename: a simulator that is running keeps its old binary
tmp_out="$(mktemp "$out.XXXXXX")"
if ! GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= \
  go build -overlay "$build/overlay.json" -o "$tmp_out" ./tools/vcsim; then
  rm -f "$tmp_out"
  exit 1
fi
mv -f "$tmp_out" "$out"
