#!/usr/bin/env bash
# The shop story, end to end, with real packets on this machine. Leaves a running
# instance to explore. Every node and pod is a network namespace with no route out.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA_DIR="${1:-$ROOT/.demo}"
CILIARY="$ROOT/.venv/bin/ciliary"
PY="$ROOT/.venv/bin/python"
export CILIARY_DATA_DIR="$DATA_DIR"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS >= deadline )); then echo "timed out waiting for $what" >&2; exit 1; fi
        sleep 0.5
    done
}

pods_ready() {
    "$CILIARY" get pods -o json | "$PY" -c '
import json, sys
items = json.load(sys.stdin)["items"]
ready = [p for p in items if any(c["type"] == "Ready" and c["status"] == "True"
         for c in p.get("status", {}).get("conditions", []))]
sys.exit(0 if len(ready) == 4 else 1)'
}

payments_enforced() {
    "$CILIARY" endpoint list -o json | "$PY" -c '
import json, sys
rows = [r for n in json.load(sys.stdin) for r in n["rows"] if r["pod"] == "default/payments"]
sys.exit(0 if rows and rows[0]["ingress_enforcement"] else 1)'
}

mesh_ready() {
    "$CILIARY" get pods -n mesh -o json | "$PY" -c '
import json, sys
items = json.load(sys.stdin)["items"]
ready = [p for p in items if any(c["type"] == "Ready" and c["status"] == "True"
         for c in p.get("status", {}).get("conditions", []))]
sys.exit(0 if len(ready) == 2 else 1)'
}

call() {  # call FROM-POD HOST PORT
    if out=$("$CILIARY" exec "$1" -- "$PY" -m ciliary.workload connect "$2" "$3" --timeout 2 2>&1); then
        say "$1 -> $2:$3  answered: $out"
    else
        say "$1 -> $2:$3  no answer ($out)"
    fi
}

step "Stopping any earlier demo instance and clearing its state"
"$CILIARY" down
rm -rf "$DATA_DIR/nats" "$DATA_DIR/logs" "$DATA_DIR/nodes"

step "Starting ciliary: NATS, identity, servicelb, policy, flows, mesh and two node executors"
"$CILIARY" up -d --nodes 2

step "Applying the shop: frontend, checkout, payments, their services and policies,"
say "and a payment gateway in the outside world (203.0.113.10, a namespace on the sandbox underlay)"
"$CILIARY" apply -f "$ROOT/examples/shop"
wait_until 90 "four ready pods" pods_ready
wait_until 30 "the payments policy in the datapath" payments_enforced

step "What ciliary now knows"
"$CILIARY" get nodes
echo
"$CILIARY" get pods
echo
"$CILIARY" get services
echo
"$CILIARY" endpoint list

PAYMENTS_VIP=$("$CILIARY" get svc payments -o json | "$PY" -c 'import json,sys; s=json.load(sys.stdin); print(s.get("status",{}).get("clusterIP") or s["spec"]["clusterIP"])')

step "Real packets: checkout may call payments on 8080, frontend may not"
call checkout "$PAYMENTS_VIP" 8080
call frontend "$PAYMENTS_VIP" 8080

step "payments may only egress to the payment gateway's CIDR on 443"
call payments 203.0.113.10 443
call payments 203.0.113.10 8443
say "policy trace agrees, without sending a packet:"
"$CILIARY" policy trace --from default/payments --to 203.0.113.10 --port 8443/TCP | sed 's/^/   /'

step "DNS is visible: payments resolves its gateway through kube-dns"
DNS_VIP=$("$CILIARY" get svc kube-dns -n kube-system -o json | "$PY" -c 'import json,sys; s=json.load(sys.stdin); print(s.get("status",{}).get("clusterIP") or s["spec"]["clusterIP"])')
say "payments -> kube-dns ($DNS_VIP): $("$CILIARY" exec payments -- "$PY" -m ciliary.workload resolve "$DNS_VIP" payment-gateway.example 2>&1)"
sleep 1
"$CILIARY" observe --protocol dns --pod default/payments --last 2

step "The service is load-balanced in eBPF, no iptables: the lb map of every node"
"$CILIARY" bpf lb list

step "What the datapath saw: the drop, as Hubble would show it"
sleep 1
say "frontend -> payments, dropped at payments' ingress:"
"$CILIARY" observe --verdict DROPPED --from-pod default/frontend --to-pod default/payments --last 2
say "payments -> the world on 8443, dropped at payments' egress:"
"$CILIARY" observe --verdict DROPPED --from-pod default/payments --last 2
say "checkout -> payments, forwarded:"
"$CILIARY" observe --from-pod default/checkout --to-pod default/payments --verdict FORWARDED --last 3
ALLOWED_BY=$("$CILIARY" observe --type policy-verdict --from-pod default/checkout --to-pod default/payments --verdict FORWARDED --last 1 -o json \
  | "$PY" -c 'import json,sys; f=json.loads(sys.stdin.readline())["flow"]; print(", ".join(p["kind"]+" "+p["namespace"]+"/"+p["name"] for p in f.get("ingress_allowed_by", [])) or "?")')
say "   the policy verdict names the rule that let it in: $ALLOWED_BY"

step "Istio co-deployment: Envoy sidecars in checkout and payments (namespace mesh)"
"$CILIARY" apply -f "$ROOT/examples/istio"
wait_until 90 "the sidecar pods" mesh_ready
MESH_VIP=$("$CILIARY" get svc payments -n mesh -o json | "$PY" -c 'import json,sys; s=json.load(sys.stdin); print(s.get("status",{}).get("clusterIP") or s["spec"]["clusterIP"])')
TRACE_ID=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
HTTP_CALL='import http.client,sys
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5)
c.request("GET", "/pay", headers={"traceparent": "00-" + sys.argv[2] + "-" + "1" * 16 + "-01"})
print(c.getresponse().status)'
wait_until 30 "an answer through the sidecars" "$CILIARY" exec -n mesh checkout -- "$PY" -c "$HTTP_CALL" "$MESH_VIP" "$TRACE_ID"
say "checkout -> payments ($MESH_VIP:8080) through both Envoys, trace $TRACE_ID"
sleep 3
say "one request across the layers: Envoy's spans joined to the datapath's flows"
"$CILIARY" trace show "$TRACE_ID"
say "the flows carry the trace id (Hubble's trace_context):"
"$CILIARY" observe --trace-id "$TRACE_ID" --last 4
say "and the debug order, walked in one command:"
"$CILIARY" diagnose mesh/checkout mesh/payments --port 8080 || true

step "Every service, its health and what it watches"
"$CILIARY" status

UI_URL=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ui_url",""))' "$DATA_DIR/instance.json")

cat <<EOT

The demo instance keeps running. The service map (live, forwarded green, dropped red):
  $UI_URL
Explore it:
  export CILIARY_DATA_DIR=$DATA_DIR
  $CILIARY exec frontend -- python3 -m ciliary.workload connect $PAYMENTS_VIP 8080
  $CILIARY observe --follow                      # live flows (Ctrl-C to stop)
  $CILIARY bpf policy get payments               # the policy map entries of payments
  $CILIARY bpf ct list                           # connection tracking
  $CILIARY get pods -o json                      # objects with status
  $CILIARY delete cnp payments-ingress           # and watch frontend get through
Logs of every process: $DATA_DIR/logs/
Stop it with:
  $CILIARY down --data-dir $DATA_DIR
EOT
