"""``ciliary up --identity-replicas N``: the supervisor plans N identity processes, each its
own instance on the identity service's NATS user; bad counts are refused naming the flag;
``status`` names each replica by its instance."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ciliary import schema
from ciliary.cli import common
from ciliary.cli.app import build_parser
from ciliary.cli.instance import checked_cluster, service_label
from ciliary.supervisor import Supervisor, identity_replicas_error, service_processes


def test_one_identity_process_by_default() -> None:
    names = [name for _, name in service_processes(1)]
    assert names == ["identity", "servicelb", "policy", "flows", "mesh"]


def test_replicas_follow_identity_and_run_the_identity_service(tmp_path: Path) -> None:
    assert service_processes(3)[:3] == [("identity", "identity"), ("identity", "identity-2"),
                                       ("identity", "identity-3")]
    supervisor = Supervisor(data_dir=tmp_path, nodes=1, identity_replicas=2)
    supervisor.credentials = {"identity": tmp_path / "identity.json"}
    supervisor._plan_children()
    replica = next(c for c in supervisor.children if c.name == "identity-2")
    assert replica.argv[-2:] == ["-m", "services.identity"]
    assert replica.env["CILIARY_INSTANCE"] == "identity-2"
    assert replica.env["CILIARY_NATS_CREDS"] == str(tmp_path / "identity.json")
    assert replica.log_path.name == "identity-2.log"
    assert [c.name for c in supervisor.children].count("identity") == 1


@pytest.mark.parametrize("count", [0, -1, 6])
def test_bad_replica_counts_are_refused_naming_the_flag(count: int) -> None:
    assert identity_replicas_error(count)
    args = build_parser().parse_args(["up", "-d", "--identity-replicas", str(count)])
    with pytest.raises(common.CliError, match="--identity-replicas"):
        checked_cluster(args)


def test_the_flag_parses() -> None:
    args = build_parser().parse_args(["up", "-d", "--identity-replicas", "2"])
    assert isinstance(args, argparse.Namespace) and args.identity_replicas == 2
    assert identity_replicas_error(2) == ""


def report(service: str, instance: str, node: str = "") -> schema.HealthReport:
    return schema.HealthReport(service=service, instance=instance, pid=1, version="0", started=0.0,
                               healthy=True, node=node)


def test_status_names_each_replica_by_its_instance() -> None:
    reports = [report("identity", "identity"), report("identity", "identity-2"), report("policy", "policy"),
               report("node", "node-node-1", "node-1"), report("node", "node-node-2", "node-2")]
    assert [service_label(r, reports) for r in reports] == ["identity", "identity-2", "policy", "node", "node"]
