#!/usr/bin/env bash
# The story so far, on the simulator: bring the stack up, check a cloud account, define an
# IP pool for the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== kubegate dev up"
kubegate dev up
echo
echo "== kubegate account validate -f .kubegate/accounts/dev.yaml"
status=0
kubegate account validate -f .kubegate/accounts/dev.yaml || status=$?
echo
echo "== kubegate ippool create -f examples/ippool.yaml"
if kubegate ippool get lab-pool --gateway local >/dev/null 2>&1; then
  echo "IP pool lab-pool exists already (kept from an earlier demo)"
else
  kubegate ippool create -f examples/ippool.yaml
fi
echo
echo "== kubegate ippool list"
kubegate ippool list
echo
echo "Open the Web UI to see the PreflightWorkflow and each check: $(python -c 'from starters.settings import Settings; print(Settings().ui_address)')"
echo "Stop everything with: make down"
exit $status
