"""``ciliary service``: parser wiring and the cilium-dbg-shaped table (pure)."""

from __future__ import annotations

import argparse

from ciliary import schema
from ciliary.cli.service import (
    add_commands,
    cmd_service_get,
    cmd_service_list,
    render_service_table,
)


def frontend(**kw: object) -> schema.LBFrontend:
    base: dict[str, object] = dict(
        namespace="default", name="web", type="ClusterIP", address="10.96.1.1", port=80,
        proto="TCP", service_id=1, rev_nat_id=1,
        backends=[schema.LBBackend(id=1, ip="10.0.1.5", port=8080, proto="TCP"),
                  schema.LBBackend(id=2, ip="10.0.1.6", port=8080, proto="TCP", state="terminating")],
        slots=[1],
    )
    base.update(kw)
    return schema.LBFrontend(**base)  # type: ignore[arg-type]


def test_table_has_the_cilium_dbg_shape() -> None:
    text = render_service_table([
        frontend(),
        frontend(type="NodePort", address="192.168.1.1", port=30086, service_id=2, rev_nat_id=2,
                 backends=[], slots=[]),
    ])
    assert text.splitlines() == [
        "ID   Frontend                Service Type   Backend",
        "1    10.96.1.1:80/TCP        ClusterIP      1 => 10.0.1.5:8080/TCP (active)",
        "                                            2 => 10.0.1.6:8080/TCP (terminating)",
        "2    192.168.1.1:30086/TCP   NodePort",
    ]


def test_local_policy_shows_the_node() -> None:
    fe = frontend(traffic_policy="Local", slots=[], slots_by_node={"node-1": [1]},
                  backends=[schema.LBBackend(id=1, ip="10.0.1.5", port=8080, proto="TCP", node="node-1")])
    assert "1 => 10.0.1.5:8080/TCP (active) @node-1" in render_service_table([fe])


def test_add_commands_wires_list_and_get() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="ciliary", parents=[common])
    add_commands(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args(["service", "list", "-o", "json"])
    assert args.func is cmd_service_list and args.output == "json"
    args = parser.parse_args(["service", "get", "web", "-n", "prod", "--data-dir", "/tmp/x"])
    assert args.func is cmd_service_get and (args.name, args.namespace, args.output) == ("web", "prod", "table")
    assert args.data_dir == "/tmp/x"
