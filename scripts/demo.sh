#!/usr/bin/env bash
# The story so far, on the simulator: bring the stack up, check a cloud account, define an
# IP pool, deploy a cluster and watch its steps, change it, delete it leaving nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n== %s\n' "$*"; }
ui=$(python -c 'from starters.settings import Settings; print(Settings().ui_address)')

say "kubegate dev up"
kubegate dev up

say "kubegate account validate -f .kubegate/accounts/dev.yaml"
kubegate account validate -f .kubegate/accounts/dev.yaml

say "kubegate ippool create -f examples/ippool.yaml"
if kubegate ippool get lab-pool --gateway local >/dev/null 2>&1; then
  echo "IP pool lab-pool exists already (kept from an earlier demo)"
else
  kubegate ippool create -f examples/ippool.yaml
fi

if kubegate cluster get demo >/dev/null 2>&1; then
  state=$(kubegate cluster get demo -o json | python -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  if [ "$state" != "Deleted" ]; then
    say "cluster demo is left from an earlier demo ($state): deleting it first"
    if [ "$state" = "Provisioning" ]; then kubegate cluster abort demo --wait >/dev/null
    else kubegate cluster delete demo --wait >/dev/null; fi
  fi
fi

say "kubegate cluster deploy -f examples/cluster.yaml --wait   (Web UI: $ui/namespaces/default/workflows/cluster%2Fdemo)"
kubegate cluster deploy -f examples/cluster.yaml --wait

say "kubegate cluster scale demo general --size 3"
kubegate cluster scale demo general --size 3

say "kubegate cluster add-pool demo -f examples/pool-highmem.yaml"
kubegate cluster add-pool demo -f examples/pool-highmem.yaml

say "kubegate cluster describe demo"
kubegate cluster describe demo

say "kubegate ippool list"
kubegate ippool list

say "kubegate cluster delete demo --wait"
kubegate cluster delete demo --wait

say "kubegate ippool list   (every address back in the pool)"
kubegate ippool list

echo
echo "Every step above is in the Web UI: $ui (workflow cluster/demo, its preflight child, the IP pool)."
echo "Stop everything with: make down"
