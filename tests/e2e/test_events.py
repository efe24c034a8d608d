"""The event API and the served /metrics on a real 2-node instance (real datapath).

A plain nats-py subscriber (``examples/events_subscriber.py``, with the read-only observer
credential when the bus has credentials) receives the flows of an allowed and a denied
connection as exactly the lines ``ciliary observe -o json`` prints for them; the served
``/metrics`` carries every node's map pressure and passes ``promtool check metrics``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from ciliary import config

from .podnet import wait_for
from .test_flows import REPO, Stack, make_stack, shop  # noqa: F401 - make_stack is a fixture

SUBSCRIBER = REPO / "examples" / "events_subscriber.py"


def subscriber(stack: Stack, out: Path) -> subprocess.Popen[bytes]:
    state = config.read_instance(stack.data_dir)
    assert state is not None
    args = [sys.executable, str(SUBSCRIBER), "--url", state.nats_url, "--topics", "flows", "--ttl", "30"]
    creds = stack.data_dir / "nats-creds" / "observer.json"
    if creds.exists():
        args += ["--creds", str(creds)]
    return subprocess.Popen(args, stdout=out.open("wb"), stderr=subprocess.STDOUT, cwd="/")


def events(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    return [r["event"] for r in lines if r.get("subject", "").startswith("ciliary.events.flows.")]


def test_flow_events_are_the_observe_lines_and_metrics_pass_promtool(make_stack, tmp_path: Path) -> None:  # noqa: F811
    stack = make_stack()
    pods = shop(stack)
    payments_ip = pods["default/payments"]["podIP"]
    out = tmp_path / "events.jsonl"
    proc = subscriber(stack, out)
    try:
        wait_for(lambda: "subscribed" in out.read_text(), 20, "the subscriber connected")

        def both_verdicts() -> list[dict] | None:
            for client in ("default/checkout", "default/frontend"):  # allowed, then denied by policy
                stack.in_pod(pods[client], sys.executable, "-m", "ciliary.workload", "connect", payments_ip,
                             "8080", "--timeout", "0.5")
            seen = events(out)
            verdicts = {(e["flow"].get("source", {}).get("pod_name"), e["flow"]["verdict"]) for e in seen}
            return seen if {("checkout", "FORWARDED"), ("frontend", "DROPPED")} <= verdicts else None

        seen = wait_for(both_verdicts, 30, "allowed and denied flows on ciliary.events.flows")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    observed = {line["flow"]["uuid"]: line for line in stack.observe("--last", "2000")}
    missing = [e["flow"]["uuid"] for e in seen if e["flow"]["uuid"] not in observed]
    assert not missing, f"flow events that observe does not show: {missing[:3]}"
    assert all(observed[e["flow"]["uuid"]] == e for e in seen)
    assert {e["node_name"] for e in seen} == {f"{stack.cluster}/node-1", f"{stack.cluster}/node-2"}

    state = config.read_instance(stack.data_dir)
    assert state is not None and state.metrics_url
    metrics_url = state.metrics_url

    def metrics_with_both_nodes_pressure() -> str:
        with urllib.request.urlopen(metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return text if all(f'ciliary_bpf_map_pressure{{map_name="ciliary_policy",node="{n}"}}' in text
                           for n in ("node-1", "node-2")) else ""

    text = wait_for(metrics_with_both_nodes_pressure, 30, "both nodes' map pressure in /metrics", interval=0.5)
    for node in ("node-1", "node-2"):
        assert f'ciliary_bpf_map_pressure{{map_name="ciliary_policy",node="{node}"}}' in text
        assert f'ciliary_endpoint{{node="{node}"}}' in text
    assert 'hubble_policy_verdicts_total{action="dropped",direction="ingress",match="none"}' in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup.sh"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
