"""What the node puts on its host for a container runtime: the ``ciliary-cni`` plugin and
its network configuration.

The installed plugin is a small bash program, not Python: a node has no ciliary
interpreter. It hands the CNI call (its ``CNI_*`` environment and the configuration on
stdin) to the node executor over loopback TCP (``cnirelay``), which runs it in the
host's namespace and answers with the exit code and the JSON the runtime expects —
as Cilium's plugin hands its calls to the agent.

Invariants:
- ``install_plugin`` writes the plugin atomically (temporary file, then rename), mode
  0755; a runtime never executes a half-written plugin. Idempotent.
- The conflist is written (atomically) by the executor once its datapath is loaded, so
  a runtime finds a network configuration only when endpoints can be served; teardown
  removes it. It names the cluster, node, pod subnet, IPAM directory and NATS URL the
  executor itself uses, and ``"mode": "host"``.
- Pure except the two file writers and ``remove``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ciliary import atomicfile

PLUGIN = "ciliary-cni"
CONFLIST = "05-ciliary.conflist"
DEFAULT_RELAY_PORT = 9878
DEFAULT_IPAM_DIR = "/var/lib/ciliary/ipam"

_SCRIPT = r"""#!/bin/bash
# ciliary-cni: CNI plugin of ciliary. Hands the call to the node executor on this host
# (127.0.0.1:@PORT@) and prints its answer; installed by the ciliary-node DaemonSet.
export LC_ALL=C
conf=$(cat)
fail() {
    printf '{"cniVersion":"1.0.0","code":11,"msg":"ciliary-cni: %s"}\n' "$1"
    exit 1
}
for value in "${CNI_COMMAND:-}" "${CNI_CONTAINERID:-}" "${CNI_NETNS:-}" "${CNI_IFNAME:-}" "${CNI_ARGS:-}" "${CNI_PATH:-}"; do
    case "$value" in *$'\n'*) fail "a CNI_* variable holds a newline" ;; esac
done
exec 3<>/dev/tcp/127.0.0.1/@PORT@ 2>/dev/null || fail "the ciliary node executor does not answer on 127.0.0.1:@PORT@"
printf 'CNI_COMMAND=%s\nCNI_CONTAINERID=%s\nCNI_NETNS=%s\nCNI_IFNAME=%s\nCNI_ARGS=%s\nCNI_PATH=%s\nLENGTH=%d\n\n%s' \
    "${CNI_COMMAND:-}" "${CNI_CONTAINERID:-}" "${CNI_NETNS:-}" "${CNI_IFNAME:-}" "${CNI_ARGS:-}" \
    "${CNI_PATH:-}" "${#conf}" "$conf" >&3
IFS= read -r code <&3 || fail "the ciliary node executor closed the connection"
cat <&3
exec 3<&-
exit "${code:-1}"
"""


def plugin_script(port: int = DEFAULT_RELAY_PORT) -> str:
    return _SCRIPT.replace("@PORT@", str(int(port)))


def conflist(*, cluster: str, node: str, subnet: str, nats_url: str, nats_creds: str = "",
             ipam_dir: str = DEFAULT_IPAM_DIR, name: str = "ciliary") -> dict[str, Any]:
    """The network configuration list a runtime reads (CNI 1.0)."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": PLUGIN,
            "mode": "host",
            "cluster": cluster,
            "node": node,
            "natsUrl": nats_url,
            **({"natsCreds": nats_creds} if nats_creds else {}),
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": ipam_dir},
        }],
    }


def _write_atomically(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomicfile.write_atomically(path, text.encode(), mode)


def install_plugin(bin_dir: str | Path, port: int = DEFAULT_RELAY_PORT) -> Path:
    path = Path(bin_dir) / PLUGIN
    _write_atomically(path, plugin_script(port), 0o755)
    return path


def write_conflist(conf_dir: str | Path, document: dict[str, Any]) -> Path:
    path = Path(conf_dir) / CONFLIST
    _write_atomically(path, json.dumps(document, indent=2) + "\n", 0o644)
    return path


def remove(conf_dir: str | Path | None = None, bin_dir: str | Path | None = None) -> None:
    """Remove the conflist and/or the plugin (uninstall); missing files are fine."""
    if conf_dir is not None:
        (Path(conf_dir) / CONFLIST).unlink(missing_ok=True)
    if bin_dir is not None:
        (Path(bin_dir) / PLUGIN).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """The DaemonSet's init container: ``python -m services.node.cniinstall --bin-dir DIR``."""
    parser = argparse.ArgumentParser(prog="python -m services.node.cniinstall")
    parser.add_argument("--bin-dir", required=True, help="the runtime's CNI plugin directory")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CILIARY_CNI_RELAY_PORT") or DEFAULT_RELAY_PORT))
    parser.add_argument("--uninstall", action="store_true", help="remove the plugin instead")
    args = parser.parse_args(argv)
    if args.uninstall:
        remove(bin_dir=args.bin_dir)
        print(f"removed {Path(args.bin_dir) / PLUGIN}")
        return 0
    print(f"installed {install_plugin(args.bin_dir, args.port)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
