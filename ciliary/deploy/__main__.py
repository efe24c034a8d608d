"""``python -m ciliary.deploy render [--values FILE] [--out DIR] [--check]`` and
``python -m ciliary.deploy credentials --nodes N1,N2 --out DIR [--values FILE]``.

``render`` renders the Kubernetes manifests from a values file; ``--check`` writes nothing
and exits 1 naming the files that differ from ``--out``. ``credentials`` writes a fresh
NATS credential for every user of the installation (``<user>.json``, 0600) and the
server's ``auth.conf`` (and, clustered, ``cluster.conf``: the route password and the
route URLs) into ``--out`` (never into the manifests) and prints the kubectl
commands that load them into the Secrets the manifests mount. A bad values file or
argument is one error line naming the field, exit code 2.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path

from ciliary import natscreds
from ciliary.deploy import credentials
from ciliary.deploy.manifests import route_addresses
from ciliary.deploy.render import differences, render_files, write
from ciliary.deploy.values import Values, ValuesError, load_values

ROOT = Path(__file__).resolve().parents[2]
# a node name becomes a NATS subject token and a Secret key: no dots, no wildcards
_NODE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the manifests from a values file")
    render.add_argument("--values", default=str(ROOT / "deploy" / "values.yaml"))
    render.add_argument("--out", default=str(ROOT / "deploy" / "manifests"))
    render.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    creds = sub.add_parser("credentials", help="write the NATS credentials of an installation")
    creds.add_argument("--values", default=str(ROOT / "deploy" / "values.yaml"))
    creds.add_argument("--nodes", required=True, help="comma-separated Kubernetes node names")
    creds.add_argument("--out", required=True, help="a directory outside the repository")
    args = parser.parse_args(argv)
    try:
        values = load_values(Path(args.values).read_text(), args.values)
    except (OSError, ValuesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "credentials":
        return _credentials(values, args.nodes, Path(args.out))
    files = render_files(values)
    out = Path(args.out)
    if args.check:
        changed = differences(files, out)
        for name in changed:
            print(f"{out / name}: differs from a fresh render", file=sys.stderr)
        return 1 if changed else 0
    for path in write(files, out):
        print(path)
    return 0


def _write_private(path: Path, text: str) -> None:
    natscreds.write_private(path, text.encode())


def _credentials(values: Values, nodes_arg: str, out: Path) -> int:
    nodes = [n for n in nodes_arg.split(",") if n]
    bad = [n for n in nodes if not _NODE_RE.match(n)]
    if not nodes or bad:
        print(f"error: --nodes: {', '.join(map(repr, bad)) if bad else 'no node'}: a node name is a token of "
              "ciliary's NATS subjects: lowercase letters, digits and '-' (no dots)", file=sys.stderr)
        return 2
    users = credentials.deploy_users(values.cluster.name, nodes)
    paths = natscreds.write_instance_credentials(out, out / credentials.AUTH_FILE, users)
    for user, path in paths.items():
        print(f"{user:<16} {path}")
    print(f"{'(server)':<16} {out / credentials.AUTH_FILE}")
    if values.nats.replicas > 1:
        _write_private(out / credentials.CLUSTER_FILE, credentials.cluster_authorization(
            secrets.token_urlsafe(32), route_addresses(values)))
        print(f"{'(routes)':<16} {out / credentials.CLUSTER_FILE}")
    print("\nLoad them into the cluster (creates or replaces the Secrets):")
    for line in credentials.kubectl_commands(str(out), values.namespace, nodes, values.nats.replicas):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
