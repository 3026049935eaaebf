#!/usr/bin/env bash
# The story on the simulator: bring the stack up, create a private cloud gateway, install its
# installer in vCenter, pair its agent, approve the fingerprint the agent printed, configure it
# (its own node, static addresses, its default cloud account), then define an IP pool, deploy a cluster through the gateway and
# watch its steps, change it, and delete it leaving nothing. Idempotent: a gateway `lab`
# Running from an earlier demo is kept (only its agent is started again), one stopped half-way
# is taken on from where it stopped. Any failure stops the demo with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }
home=${KUBEGATE_HOME:-.kubegate}
ui=$(python -c 'from plumbing.settings import Settings; print(Settings().ui_address)')
vm=/DC0/vm/kubegate-installer-lab
link() { printf '%s/namespaces/default/workflows/%s' "$ui" "${1//\//%2F}"; }

agent_cmd="kubegate dev agent"
dev_agent() { $agent_cmd "$@"; }

# "<status> <paired|unpaired> <ran|new>" of gateway lab, or "None unpaired new"
lab_state() {
  kubegate gateway get lab -o json 2>/dev/null | python -c '
import json, sys
d = json.load(sys.stdin)
ran = (d.get("nodes") or {}).get("provisioned")
print(d["status"], "paired" if d.get("agent") else "unpaired", "ran" if ran else "new")
' 2>/dev/null || echo "None unpaired new"
}

# The operator's step after pairing: the fingerprint the agent printed on its console (its
# output: $home/agents/lab/agent.out) must be the one the gateway shows for the agent that
# paired; then approve it. Until then no secret is sealed to the agent and lab stays Pending.
approve_lab() {
  local printed shown approved
  read -r shown approved < <(kubegate gateway get lab -o json | python -c '
import json, sys
agent = json.load(sys.stdin).get("agent") or {}
print(agent.get("fingerprint") or "-", "yes" if agent.get("approved") else "no")
')
  [ -n "$shown" ] && [ "$shown" != - ] \
    || die "gateway lab has no paired agent to approve; see: kubegate gateway describe lab"
  printed=$(sed -n 's/.*gateway agent lab: key fingerprint \([0-9a-f:]*\).*/\1/p' \
    "$home/agents/lab/agent.out" 2>/dev/null | tail -n1)
  echo "the agent printed key fingerprint ${printed:-?}; gateway lab shows ${shown}"
  [ "$approved" = yes ] && { echo "(approved already)"; return 0; }
  [ "$printed" = "$shown" ] || die "gateway lab was paired by another agent ($shown, not $printed): kubegate gateway reset lab, then run the demo again"
  say "kubegate gateway approve lab $printed   (the fingerprint the agent printed)"
  kubegate gateway approve lab "$printed"
}

# wait until gateway lab's status is one of the arguments (at most 3 minutes)
wait_lab() {
  local state deadline=$((SECONDS + 180))
  while :; do
    read -r state _ _ < <(lab_state)
    for want in "$@"; do [ "$state" = "$want" ] && return 0; done
    [ $SECONDS -lt $deadline ] || die "gateway lab is still $state, not ${*}; see: kubegate gateway describe lab"
    sleep 1
  done
}

say "kubegate dev up"
kubegate dev up

# install.yaml and gateway.yaml as in examples/, with the simulator's certificate pinned (its
# thumbprint is made per machine by `dev up`) and its address; the password is read from the
# file `dev up` made (password_file: the agent `dev agent` starts reads install.yaml too, and
# gets no password from any environment)
read -r address thumbprint < <(python -c '
from starters.dev import DevStack
stack = DevStack()
print(stack.settings.vcsim_address, stack.thumbprint() or "")')
[ -n "$thumbprint" ] || die "no simulator thumbprint in $home/vcsim.json (is the simulator up?)"
files=$home/demo
mkdir -p "$files"
echo "examples/install.yaml and examples/gateway.yaml for this simulator: $files/"
for name in install gateway; do
  sed -E -e "s/^(\s*thumbprint:)\s*null(\s*)/\1 \"$thumbprint\"\2/" \
    -e "s/^(\s*server:)\s*127\.0\.0\.1:8989(\s*)/\1 $address\2/" \
    -e "s/^(\s*)password_env:\s*KUBEGATE_VCSIM_PASSWORD\b.*$/\1password_file: ..\/vcsim-password/" \
    "examples/$name.yaml" >"$files/$name.yaml"
  grep -q "$thumbprint" "$files/$name.yaml" || die "could not pin the thumbprint in $files/$name.yaml"
  grep -q "password_file: ../vcsim-password" "$files/$name.yaml" \
    || die "could not point $files/$name.yaml at the simulator's password file"
done

# -- the gateway ---------------------------------------------------------------------------

# the pairing code on its way to the installer: a file only we can read, removed right after
code_file=$files/lab.pairing-code
trap 'rm -f "$code_file"' EXIT

create_and_install() {
  say "kubegate gateway create lab -o json   (the pairing code goes to a 0600 file, never an argument)"
  (
    umask 077
    kubegate gateway create lab -o json | python -c '
import json, sys
d = json.load(sys.stdin)
print(d["pairing_code"])
print("gateway {name}: {status}; installer OVA {installer_ova}".format(**d), file=sys.stderr)
' >"$code_file"
  )
  say "kubegate gateway install lab -f $files/install.yaml --pairing-code-file $code_file"
  kubegate gateway install lab -f "$files/install.yaml" --pairing-code-file "$code_file"
  rm -f "$code_file"  # the installer VM holds it now (a vApp property), until the agent pairs
}

start_agent_from_installer() {
  say "$agent_cmd lab --installer-vm $vm --vcenter $files/install.yaml   (pairs, then runs in the background)"
  dev_agent lab --installer-vm "$vm" --vcenter "$files/install.yaml"
}

read -r state paired ran < <(lab_state)
if [ "$state" = Running ]; then
  say "gateway lab is Running (kept from an earlier demo): starting its agent if it is not running"
  dev_agent lab
  approve_lab  # one paired before agents signed their results registers again: approve it
else
  if [ "$state" != None ] && [ "$state" != Deleted ]; then
    say "gateway lab is left from an earlier demo ($state, $paired): taking it on"
  fi
  # a paired agent starts from its key alone; its gateway's steps run on it once approved
  if [ "$paired" = paired ] && [ "$state" != Deleted ]; then
    dev_agent lab
    approve_lab
  fi
  case "$state" in
    Deleting) wait_lab Deleted ;;
    Provisioning | Upgrading) wait_lab Running Failed ;;
  esac
  read -r state paired ran < <(lab_state)
  if [ "$state" = Failed ] && [ "$ran" = new ]; then
    say "kubegate gateway reset lab --wait   (its configuration failed: configure it again)"
    kubegate gateway reset lab --wait >/dev/null
  elif [ "$state" = Failed ]; then
    say "kubegate gateway delete lab --wait --yes   (it failed after it ran: start over)"
    kubegate gateway delete lab --wait --yes >/dev/null
  fi
  read -r state paired ran < <(lab_state)
  if [ "$state" = Pending ] && [ "$paired" = unpaired ]; then
    # the installer may still hold its code (stopped before pairing); else start over
    if ! start_agent_from_installer; then
      say "the installer of lab is gone: kubegate gateway delete lab --wait --yes, and create it again"
      kubegate gateway delete lab --wait --yes >/dev/null
      state=None
    fi
  fi
  if [ "$state" = None ] || [ "$state" = Deleted ]; then
    create_and_install
    start_agent_from_installer
  fi
  read -r state paired ran < <(lab_state)
  if [ "$state" = Pending ] && [ "$paired" = paired ]; then
    say "kubegate gateway get lab   (paired, waiting for the operator's approval: Pending)"
    kubegate gateway get lab
    approve_lab
  fi
  if [ "$state" != Running ]; then
    say "kubegate gateway get lab   (paired and approved: Registered)"
    wait_lab Registered Running
    kubegate gateway get lab
    read -r state paired ran < <(lab_state)
  fi
  if [ "$state" != Running ]; then
    # --wait follows every step, then shows what `kubegate gateway describe lab` shows
    say "kubegate gateway configure lab -f $files/gateway.yaml --wait   (Web UI: $(link gateway/lab))"
    kubegate gateway configure lab -f "$files/gateway.yaml" --wait
    state=Configured
  fi
fi
if [ "$state" = Running ]; then
  say "kubegate gateway describe lab"
  kubegate gateway describe lab
fi

# -- a cluster through the gateway ----------------------------------------------------------

say "kubegate ippool create -f examples/ippool.yaml"
if kubegate ippool get lab-pool --gateway lab >/dev/null 2>&1; then
  echo "IP pool lab-pool of gateway lab exists already (kept from an earlier demo)"
else
  kubegate ippool create -f examples/ippool.yaml
fi

if kubegate cluster get demo >/dev/null 2>&1; then
  cluster=$(kubegate cluster get demo -o json | python -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  if [ "$cluster" != "Deleted" ]; then
    say "cluster demo is left from an earlier demo ($cluster): deleting it first"
    if [ "$cluster" = "Provisioning" ] || [ "$cluster" = "Queued" ]; then
      kubegate cluster abort demo --wait >/dev/null
    else kubegate cluster delete demo --wait --yes >/dev/null; fi
  fi
fi

say "kubegate cluster deploy -f examples/cluster.yaml --wait   (Web UI: $(link cluster/demo))"
kubegate cluster deploy -f examples/cluster.yaml --wait

say "kubegate cluster scale demo general --size 3"
kubegate cluster scale demo general --size 3

say "kubegate cluster add-pool demo -f examples/pool-highmem.yaml"
kubegate cluster add-pool demo -f examples/pool-highmem.yaml

say "kubegate cluster upgrade demo --kubernetes 1.31.0   (every node replaced, the control plane first, one at a time)"
kubegate cluster upgrade demo --kubernetes 1.31.0

say "kubegate cluster describe demo"
kubegate cluster describe demo

say "kubegate account list"
kubegate account list

say "kubegate ippool list"
kubegate ippool list

say "kubegate cluster delete demo --wait --yes"
kubegate cluster delete demo --wait --yes

say "kubegate ippool list   (every address of the cluster back in its pool)"
kubegate ippool list

say "kubegate gateway logs lab --output-file $home/lab-logs.tgz"
kubegate gateway logs lab --output-file "$home/lab-logs.tgz"

echo
echo "Every step above is in the Temporal Web UI ($ui):"
echo "  gateway lab   $(link gateway/lab)"
echo "  cluster demo  $(link cluster/demo)"
echo "Gateway lab keeps running (its agent too); a second 'make demo' reuses it."
echo "Demo took $((SECONDS - started)) s. Stop everything with: make down"
