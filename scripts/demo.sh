#!/usr/bin/env bash
# The story so far, on the simulator: bring the stack up, then check a cloud account.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== kubegate dev up"
kubegate dev up
echo
echo "== kubegate account validate -f .kubegate/dev-account.yaml"
status=0
kubegate account validate -f .kubegate/dev-account.yaml || status=$?
echo
echo "Open the Web UI to see the PreflightWorkflow and each check: $(python -c 'from starters.settings import Settings; print(Settings().ui_address)')"
echo "Stop everything with: make down"
exit $status
