"""``ciliary connectivity test``: deploy test workloads into ``ciliary-test``, probe, judge, clean up.

Invariants:
- The scenarios, what they deploy and how a probe is judged are ``ciliary.connectivity``
  (pure); this module is the I/O around it: the resource store for deploying and
  deleting, the status and ``services`` buckets and the node executors' endpoint view
  for readiness, the flows service for the flows that prove a result, and one
  ``python -m ciliary.workload`` process per probe inside the client pod's network
  namespace (and cgroup, as ``ciliary exec`` does).
- It only ever writes or deletes objects in ``connectivity.NAMESPACE``. Cleanup deletes
  every object of that namespace and the Namespace itself, and waits until no endpoint
  of it is left on any node; it runs after the tests, after a failure and after Ctrl-C
  (SIGINT) or SIGTERM.
- Progress goes to stderr, one line per step and per test; results go to stdout as an
  aligned table (with each test's proof flows in ``hubble observe``'s compact format) or
  one JSON object (``-o json``). Exit code 1 when any test failed, 0 otherwise (skips
  included), 130 after Ctrl-C.
- Never imports a service package or another command module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

from ciliary import connectivity as C
from ciliary import hubble, output, schema
from ciliary.bus import Bus, BusError, NoReply
from ciliary.cli import common, flowrender
from ciliary.resources import KINDS, resource_from_manifest
from ciliary.store import ResourceStore, StoredObject

DEFAULT_TIMEOUT = 15.0  # seconds per test
DEPLOY_TIMEOUT = 90.0  # seconds for the workloads to be ready and the policies in force
CLEANUP_TIMEOUT = 30.0  # seconds to wait for the test endpoints to leave every node
PROBE_TIMEOUT = 2.0  # seconds one connection attempt may take
FLOW_WAIT = 2.0  # seconds to wait for the flows of one probe to reach the flows service
POLL = 0.25
QUIET_S = 2.0  # no endpoint of the namespace seen on any node for this long: cleaned up


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``connectivity test`` to the ``ciliary`` parser."""
    p = subparsers.add_parser("connectivity", parents=[common_parent],
                              help="end-to-end connectivity checks in a dedicated namespace")
    sub = p.add_subparsers(dest="connectivity_command", required=True)
    t = sub.add_parser("test", parents=[common_parent],
                       help=f"deploy test workloads into {C.NAMESPACE}, check connectivity and policy, clean up")
    t.add_argument("--test", action="append", default=[], metavar="PATTERN",
                   help="run only tests whose name matches this glob (repeatable, comma-separated; !glob excludes)")
    t.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds each test may take to pass (default {DEFAULT_TIMEOUT:g})")
    t.add_argument("--list", action="store_true", help="list the tests and exit")
    t.add_argument("-o", "--output", choices=["table", "json"], default="table")
    t.set_defaults(func=cmd_connectivity_test)


def cmd_connectivity_test(args: argparse.Namespace) -> int:
    try:
        scenarios = C.select(args.test)
    except ValueError as err:
        raise common.CliError(str(err)) from err
    if args.list:
        print(output.table(["TEST", "DESCRIPTION"], [[s.name, s.description] for s in scenarios]))
        return 0
    if args.timeout <= 0:
        raise common.CliError("--timeout must be positive")
    state = common.running_instance(args.data_dir_path)

    async def work(bus: Bus) -> list[C.Result]:
        return await Run(bus, state.cluster, scenarios, timeout=args.timeout).main()

    results = common.run_with_bus(args, work)
    if args.output == "json":
        print(output.to_json(results_json(results, state.cluster)))
    else:
        print(render_results(results))
    return C.exit_code(results)


# ---------------------------------------------------------------- rendering


def result_row(r: C.Result) -> list[str]:
    return [r.name, r.status, f"{r.duration:.2f}s" if r.status != C.SKIP else "-", r.reason]


def render_results(results: Sequence[C.Result]) -> str:
    """The aligned result table, each test's proof flows, and the summary line."""
    lines = [output.table(["TEST", "RESULT", "TIME", "DETAIL"], [result_row(r) for r in results])]
    for r in results:
        if r.flows:
            lines.append(f"\n{r.name} ({r.status}):")
            lines += [f"  {flowrender.format_compact(f, node_name=True)}" for f in r.flows]
    counts = C.summary(results)
    lines.append(f"\n{counts[C.PASS]} passed, {counts[C.FAIL]} failed, {counts[C.SKIP]} skipped")
    return "\n".join(lines)


def results_json(results: Sequence[C.Result], cluster: str) -> dict[str, Any]:
    counts = C.summary(results)
    return {
        "cluster": cluster,
        "namespace": C.NAMESPACE,
        "ok": C.exit_code(results) == 0,
        "passed": counts[C.PASS], "failed": counts[C.FAIL], "skipped": counts[C.SKIP],
        "tests": [{
            "name": r.name, "status": r.status, "reason": r.reason,
            "duration_seconds": round(r.duration, 3), "destination": r.destination,
            "flows": [hubble.flow_dict(f) for f in r.flows],
        } for r in results],
    }


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the run


class NotReady(Exception):
    """The test workloads did not become ready in time."""


class Run:
    """One ``connectivity test`` run against the instance behind ``bus``."""

    def __init__(self, bus: Bus, cluster: str, scenarios: Sequence[C.Scenario], *, timeout: float) -> None:
        self.bus = bus
        self.store = ResourceStore(bus)
        self.cluster = cluster
        self.scenarios = list(scenarios)
        self.timeout = timeout
        self.client: dict[str, Any] = {}  # status of the client pod
        self.addresses = C.Addresses()
        self.flows_notice = ""
        self.terminated = False

    async def main(self) -> list[C.Result]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            self.terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        deployed = False
        try:
            env = await self.environment()
            say(f"connectivity test: cluster {self.cluster}, nodes {', '.join(env.nodes) or 'none'}, "
                f"cluster DNS {env.cluster_dns or 'none'}")
            skips = {s.name: C.skip_reason(s, env) for s in self.scenarios}
            runnable = [s for s in self.scenarios if not skips[s.name]]
            results: dict[str, C.Result] = {n: C.Result(n, C.SKIP, why) for n, why in skips.items() if why}
            if runnable:
                if not env.nodes:
                    raise common.CliError("no node is Ready: nothing to deploy the test workloads on")
                deployed = True
                try:
                    await self.deploy(runnable, env)
                except NotReady as err:
                    results.update({s.name: C.Result(s.name, C.FAIL, f"not deployed: {err}") for s in runnable})
                    runnable = []
            for index, scenario in enumerate(self.scenarios, start=1):
                if scenario.name in results:
                    say(f"[{index}/{len(self.scenarios)}] {scenario.name}: {results[scenario.name].status} "
                        f"({results[scenario.name].reason})")
                    continue
                result = await self.run_one(scenario)
                results[scenario.name] = result
                say(f"[{index}/{len(self.scenarios)}] {scenario.name}: {result.status} ({result.duration:.2f}s) "
                    f"{result.reason}")
            if self.flows_notice:
                say(f"notice: {self.flows_notice}")
            return [results[s.name] for s in self.scenarios]
        except asyncio.CancelledError:
            say("interrupted: stopping the tests")
            if self.terminated:
                raise common.CliError(f"terminated (SIGTERM); namespace {C.NAMESPACE} cleaned up") from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            if deployed:
                await asyncio.shield(self.cleanup())

    # ---------------------------------------------------------------- the instance

    async def environment(self) -> C.Environment:
        nodes = await self.store.list("Node")
        ready: dict[str, str] = {}
        for node in nodes:
            status = node.status or {}
            if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])):
                continue
            ips = [a.get("address", "") for a in status.get("addresses", []) if a.get("type") == "InternalIP"]
            ready[node.record.name] = ips[0] if ips else ""
        dns = await self.store.get("Service", "kube-system", "kube-dns")
        dns_ip = _cluster_ip(dns) if dns is not None else ""
        return C.Environment(nodes=tuple(sorted(ready)), node_ips=ready, cluster_dns=dns_ip)

    # ---------------------------------------------------------------- deploy

    async def deploy(self, scenarios: Sequence[C.Scenario], env: C.Environment) -> None:
        objects = C.manifests(scenarios, env)
        say(f"deploying into namespace {C.NAMESPACE}: " + ", ".join(
            f"{m['kind']} {m['metadata']['name']}" for m in objects[1:]))
        await self.store.apply([resource_from_manifest(m, "connectivity test") for m in objects])
        deadline = time.monotonic() + DEPLOY_TIMEOUT
        workloads = C.needed_workloads(scenarios)
        pods = await self._wait(deadline, lambda: self._pods_ready(workloads), "pods ready")
        self.client = pods[C.CLIENT]
        self.addresses = C.Addresses(
            pods={name: status.get("podIP", "") for name, status in pods.items()},
            cluster_dns=env.cluster_dns,
            node_ip=env.node_ips.get(env.node_for("second"), ""))
        if any(s.service for s in scenarios):
            backends = sum(1 for w in workloads if dict(w.labels).get("app") == C.SERVICE)
            cluster_ip, node_port = await self._wait(
                deadline, lambda: self._service_ready(backends), f"Service {C.SERVICE} with {backends} backends")
            self.addresses = C.Addresses(pods=self.addresses.pods, cluster_ip=cluster_ip, node_port=node_port,
                                         node_ip=self.addresses.node_ip, cluster_dns=env.cluster_dns)
        guarded = sorted({w for s in scenarios if s.policies for w in s.needs if w != C.CLIENT})
        if guarded:
            await self._wait(deadline, lambda: self._enforced(guarded, pods), "policies in force")
        say("test workloads ready")

    async def _wait(self, deadline: float, check: Any, what: str) -> Any:
        last = ""
        while True:
            value, missing = await check()
            if value is not None:
                return value
            if missing != last:
                say(f"waiting for {what}: {missing}")
                last = missing
            if time.monotonic() >= deadline:
                raise NotReady(f"no {what} after {DEPLOY_TIMEOUT:.0f}s ({missing})")
            await asyncio.sleep(POLL)

    async def _pods_ready(self, workloads: list[C.Workload]) -> tuple[dict[str, dict] | None, str]:
        by_name = {o.record.name: o.status or {} for o in await self.store.list("Pod", C.NAMESPACE)}
        ready: dict[str, dict] = {}
        waiting: list[str] = []
        for w in workloads:
            status = by_name.get(w.name, {})
            netns = status.get("ciliary", {}).get("netns", "")
            ok = (status.get("phase") == "Running"
                  and (status.get("podIP") or status.get("ciliary", {}).get("outsideWorld"))
                  and os.path.exists(f"/var/run/netns/{netns}")  # not the status of a pod gone
                  and any(c.get("type") == "Ready" and c.get("status") == "True"
                          for c in status.get("conditions", [])))
            if ok:
                ready[w.name] = status
            else:
                waiting.append(f"{w.name} ({status.get('phase', 'Pending')})")
        if waiting:
            return None, f"{len(ready)}/{len(workloads)} ready, waiting for {', '.join(waiting)}"
        return ready, ""

    async def _service_ready(self, backends: int) -> tuple[tuple[str, int] | None, str]:
        entries = await self.bus.kv_list(schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>")
        cluster_ip, node_port = "", 0
        for entry in entries.values():
            if entry.value is None:
                continue
            try:
                fe = schema.decode(entry.value, schema.LBFrontend)
            except Exception:  # a record this reader does not know: not ours
                continue
            if fe.namespace != C.NAMESPACE or fe.name != C.SERVICE or len(fe.slots) < backends:
                continue
            if fe.type == "ClusterIP":
                cluster_ip = fe.address
            elif fe.type == "NodePort" and fe.address == self.addresses.node_ip:
                node_port = fe.port
        if cluster_ip and node_port:
            return (cluster_ip, node_port), ""
        return None, f"cluster IP {cluster_ip or 'pending'}, node port {node_port or 'pending'}"

    async def _enforced(self, pods: list[str], status: dict[str, dict]) -> tuple[bool | None, str]:
        waiting = []
        for pod in pods:
            node = status[pod].get("ciliary", {}).get("node", "")
            rows = await self._endpoint_rows(node)
            row = next((r for r in rows if r.get("pod") == f"{C.NAMESPACE}/{pod}"), None)
            if row is None or not row.get("ingress_enforcement"):
                waiting.append(pod)
        return (True, "") if not waiting else (None, f"ingress enforcement on {', '.join(waiting)}")

    async def _endpoint_rows(self, node: str) -> list[dict[str, Any]]:
        return await self._endpoint_view(node) or []

    async def _endpoint_view(self, node: str) -> list[dict[str, Any]] | None:
        """The node's endpoint view; None when it did not answer."""
        subject = schema.SUBJECT_NODE_DEBUG.format(cluster=self.cluster, node=node)
        try:
            reply = await self.bus.request(subject, schema.NodeDebugRequest(view="endpoints"),
                                           schema.NodeDebugReply, timeout=common.REQUEST_TIMEOUT)
        except BusError:
            return None
        return reply.rows if reply.ok else None

    # ---------------------------------------------------------------- one test

    async def run_one(self, scenario: C.Scenario) -> C.Result:
        started = time.monotonic()
        deadline = started + self.timeout
        host, port = C.probe_destination(scenario.probe, self.addresses)
        destination = f"{host}:{port}" if host else ""
        while True:
            since = time.time_ns()
            left = max(0.5, deadline - time.monotonic())
            outcome = await self.probe(scenario, min(PROBE_TIMEOUT, left))
            status, reason, flows = await self.settle(scenario, outcome, since, deadline)
            if status == C.PASS or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        return C.Result(scenario.name, status, reason, time.monotonic() - started, destination,
                        C.proof_flows(scenario, flows))

    async def probe(self, scenario: C.Scenario, timeout: float) -> C.Outcome:
        host, _ = C.probe_destination(scenario.probe, self.addresses)
        if not host:
            return C.Outcome(False, error="the destination has no address")
        argv = ["ip", "netns", "exec", self.client["ciliary"]["netns"],
                sys.executable, "-m", "ciliary.workload", *C.probe_args(scenario.probe, self.addresses, timeout=timeout)]
        cgroup = self.client.get("ciliary", {}).get("cgroup", "")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, preexec_fn=(lambda: _join_cgroup(cgroup)) if cgroup else None)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout + 10)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace").strip()
        error = err.decode(errors="replace").strip().removeprefix("error: ")
        return C.Outcome(proc.returncode == 0 and bool(text), text, error)

    async def settle(self, scenario: C.Scenario, outcome: C.Outcome, since: int,
                     deadline: float) -> tuple[str, str, list[schema.Flow]]:
        """The judgement of one probe, after waiting (up to ``FLOW_WAIT``) for its flows."""
        until = min(time.monotonic() + FLOW_WAIT, max(deadline, time.monotonic() + 0.5))
        while True:
            flows = await self.flows_since(since)
            status, reason = C.judge(scenario, outcome, flows)
            done = bool(flows) and (status == C.PASS or not scenario.expect.policy)
            if done or time.monotonic() >= until:
                return status, reason, flows
            await asyncio.sleep(POLL)

    async def flows_since(self, since_ns: int) -> list[schema.Flow]:
        """Flows from or to the client since ``since_ns`` (the flows service's rings)."""
        pod = f"{C.NAMESPACE}/{C.CLIENT}"
        query = schema.FlowQuery(whitelist=[schema.FlowFilter(source_pod=[pod]),
                                            schema.FlowFilter(destination_pod=[pod])],
                                 since_ns=since_ns, number=200, rings_only=True)
        flows: list[schema.Flow] = []
        try:
            async with aclosing(self.bus.request_stream(schema.SUBJECT_FLOWS_QUERY, query,
                                                        timeout=common.REQUEST_TIMEOUT)) as replies:
                async for data in replies:
                    reply = schema.decode(data, schema.FlowQueryReply)
                    if not reply.ok:
                        self.flows_notice = f"the flows service refused the query: {reply.error}"
                        return []
                    flows += reply.flows
                    if not reply.more:
                        break
        except (NoReply, BusError) as err:
            self.flows_notice = f"no flows from the flows service ({err}); is it running? try: ciliary status"
            return []
        return flows

    # ---------------------------------------------------------------- cleanup

    async def cleanup(self) -> None:
        say(f"cleaning up namespace {C.NAMESPACE}")
        try:
            objects: list[StoredObject] = []
            for kind, info in KINDS.items():
                if info.namespaced:
                    objects += await self.store.list(kind, C.NAMESPACE)
            for obj in objects:
                await self.store.delete(obj.record.kind, C.NAMESPACE, obj.record.name)
            await self.store.delete("Namespace", "", C.NAMESPACE)
            deadline = time.monotonic() + CLEANUP_TIMEOUT
            # every node: a pod interrupted before its status named one may still be starting
            nodes = sorted({o.record.name for o in await self.store.list("Node")}
                           | {(o.status or {}).get("ciliary", {}).get("node", "") for o in objects
                              if o.record.kind == "Pod"} - {""})
            quiet = 0  # consecutive looks that found none: a pod still starting registers late
            while nodes:
                views = [await self._endpoint_view(n) for n in nodes]
                left = [r["pod"] for rows in views for r in rows or []
                        if str(r.get("pod", "")).startswith(f"{C.NAMESPACE}/")]
                quiet = quiet + 1 if not left else 0  # a node that does not answer has none to show
                if quiet * POLL >= QUIET_S:
                    break
                if time.monotonic() >= deadline:
                    say(f"notice: endpoints still being removed after {CLEANUP_TIMEOUT:.0f}s: {', '.join(left)}")
                    break
                await asyncio.sleep(POLL)
            say(f"removed {len(objects)} objects and namespace {C.NAMESPACE}")
        except BusError as err:
            say(f"error: cleanup of namespace {C.NAMESPACE} failed: {err}; "
                f"remove it with: ciliary delete ns {C.NAMESPACE} (and its objects)")


def _cluster_ip(service: StoredObject) -> str:
    status = service.status or {}
    spec = service.record.manifest.get("spec") or {}
    ip = status.get("clusterIP") or spec.get("clusterIP") or ""
    return "" if ip == "None" else ip


def _join_cgroup(cgroup: str) -> None:
    """In the probe's child process: join the pod's cgroup (socket-level load balancing
    as the pod's own processes get it); a cgroup that is gone is not an error."""
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass
