#!/usr/bin/env bash
# The shop story, end to end, on this machine. Leaves a running instance to explore.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA_DIR="${1:-$ROOT/.demo}"
CILIARY="$ROOT/.venv/bin/ciliary"
export CILIARY_DATA_DIR="$DATA_DIR"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Stopping any earlier demo instance and clearing its state"
"$CILIARY" down
rm -rf "$DATA_DIR/nats" "$DATA_DIR/logs"

step "Starting ciliary: NATS + identity, servicelb, policy, flows, mesh and two node executors"
"$CILIARY" up -d --nodes 2

step "Applying the shop: frontend, checkout, payments, their services and policies"
"$CILIARY" apply -f "$ROOT/examples/shop"

step "What ciliary now knows"
"$CILIARY" get nodes
echo
"$CILIARY" get pods -A
echo
"$CILIARY" get services
echo
"$CILIARY" get ciliumnetworkpolicies
echo
"$CILIARY" get networkpolicies

step "Every service, its health and what it watches"
"$CILIARY" status

cat <<EOT

The demo instance keeps running. Explore it:
  export CILIARY_DATA_DIR=$DATA_DIR
  $CILIARY get pods -A -o json
  $CILIARY get cnp payments-ingress -o yaml
  $CILIARY status -o json
  $CILIARY apply -f examples/shop        # idempotent: everything 'unchanged'
Logs of every process: $DATA_DIR/logs/
Stop it with:
  $CILIARY down --data-dir $DATA_DIR
EOT
