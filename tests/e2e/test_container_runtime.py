"""A real container runtime as the CNI client: podman (Debian's, CNI backend) runs
containers from a local root filesystem (no image is pulled) inside a namespace that
plays a host, and gets their network from the ciliary-cni and conflist the host-mode
executor installed. The containers become endpoints with identities, are reached
through a ClusterIP, are governed by policy, and removal (CNI DEL) frees everything."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from pyroute2 import IPRoute

from .hoststack import HostStack, root_links

SERVER = ("import socketserver\n"
          "class Echo(socketserver.StreamRequestHandler):\n"
          "    def handle(self):\n"
          "        self.wfile.write(b'hello ' + self.rfile.readline())\n"
          "socketserver.TCPServer(('0.0.0.0', 8080), Echo).serve_forever()\n")
CLIENT = ("import socket, sys\n"
          "try:\n"
          "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)\n"
          "    s.sendall(b'client\\n')\n"
          "    print(s.recv(100).decode().strip())\n"
          "except OSError as err:\n"
          "    print('failed:', err)\n")

OBJECTS = """apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: host1, containers: [{{name: web, image: local}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{nodeName: host1, containers: [{{name: client, image: local}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}}}]
"""

WEB_FROM_NOBODY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-nobody, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: nobody}}]
"""


class Podman:
    """podman as root, its state under ``workdir``, network from the host's CNI dirs,
    run inside the host namespace (``nsenter --net``)."""

    def __init__(self, workdir: Path, host_netns: str, conf_dir: Path, bin_dir: Path) -> None:
        self.workdir = workdir
        self.host_netns = host_netns
        workdir.mkdir(parents=True)
        self.runroot = tempfile.mkdtemp(prefix="ciliary-pm-")  # podman wants it short (< 50 chars)
        self.conf = workdir / "containers.conf"
        self.conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
            "[network]\n"
            f'network_backend = "cni"\ncni_plugin_dirs = ["{bin_dir}"]\nnetwork_config_dir = "{conf_dir}"\n')
        self.rootfs = workdir / "rootfs"  # a local root filesystem: the host's /usr, read-only
        for d in ("usr", "etc", "proc", "sys", "dev", "tmp", "run"):
            (self.rootfs / d).mkdir(parents=True)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            (self.rootfs / link).symlink_to(target)

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.host_netns}", "podman", "--root", str(self.workdir / "root"),
             "--runroot", self.runroot, "--storage-driver", "vfs", *args],
            capture_output=True, text=True, env={**os.environ, "CONTAINERS_CONF": str(self.conf)}, timeout=60)
        if check:
            assert result.returncode == 0, f"podman {' '.join(args[:4])}: {result.stdout}{result.stderr}"
        return result

    def run(self, name: str, *command: str, detach: bool = True) -> subprocess.CompletedProcess[str]:
        return self("run", *(["-d"] if detach else ["--rm"]), "--name", name, "--network", "ciliary",
                    "-v", "/usr:/usr:ro", "--rootfs", str(self.rootfs), "/usr/bin/python3", "-c", *command)

    def ip(self, name: str) -> str:
        networks = json.loads(self("inspect", name, "--format", "{{json .NetworkSettings.Networks}}").stdout)
        return networks["ciliary"]["IPAddress"]


def test_podman_containers_get_ciliary_networking_through_cni(cluster_name: str, tmp_path: Path) -> None:
    assert shutil.which("podman") and shutil.which("runc") and shutil.which("conmon"), \
        "podman, runc and conmon are needed (scripts/setup.sh installs them)"
    cluster_id = 100 + secrets.randbelow(100)
    before_links = root_links()
    stack = HostStack(cluster_name, cluster_id, tmp_path)
    podman: Podman | None = None
    try:
        host = stack.host("host1")
        stack.start_nats("host1")
        for service in ("identity", "servicelb", "policy"):
            stack.start_service(service, "host1")
        conf_dir = stack.start_node("host1")
        stack.wait_conflist("host1")
        podman = Podman(tmp_path / "podman", host, conf_dir, stack.cni_dirs("host1")[1])
        networks = json.loads(podman("network", "inspect", "ciliary").stdout)
        assert networks[0]["driver"] == "ciliary-cni"

        podman.run("web", SERVER)
        web_ip = podman.ip("web")
        assert web_ip.startswith(json.loads((conf_dir / "05-ciliary.conflist").read_text())
                                 ["plugins"][0]["ipam"]["subnet"].rsplit(".", 2)[0])
        runtime_netns = {n for n in _netns() if n.startswith("netns-")}
        assert runtime_netns, "podman made the container's namespace"

        stack.ciliary("apply", "-f", "-", stdin=OBJECTS.format(ip=web_ip))

        def endpoint(ip: str) -> dict | None:
            return next((e for e in stack.endpoints() if e["ipv4"] == ip), None)

        stack.wait(lambda: (endpoint(web_ip) or {}).get("identity", 0) > 255, 30, "web has an identity")
        assert endpoint(web_ip)["pod"] == "default/web"

        def cluster_ip() -> str:
            svc = json.loads(stack.ciliary("get", "svc", "web", "-o", "json").stdout)
            return svc.get("status", {}).get("clusterIP") or svc["spec"].get("clusterIP", "")

        stack.wait(cluster_ip, 20, "web has a ClusterIP")
        vip = cluster_ip()

        def client_says() -> str:
            return podman.run("client", CLIENT, vip, "80", detach=False).stdout.strip()

        stack.wait(lambda: client_says() == "hello client", 60, f"client reaches web through {vip}:80")

        stack.ciliary("apply", "-f", "-", stdin=WEB_FROM_NOBODY)
        stack.wait(lambda: client_says().startswith("failed"), 60, "policy drops client -> web")

        # removal: CNI DEL frees the endpoint, the host veth, the address and the namespace
        host_ifs = {e["interface"] for e in stack.endpoints()}
        podman("rm", "-f", "-t", "0", "web")
        stack.wait(lambda: endpoint(web_ip) is None, 15, "web's endpoint removed")
        with IPRoute(netns=host) as ipr:
            assert not any(ipr.link_lookup(ifname=name) for name in host_ifs)
        assert not list((tmp_path / "host1" / "ipam").rglob(web_ip))
        assert not runtime_netns & set(_netns())
        assert json.loads(podman("ps", "-a", "--format", "json").stdout or "[]") == []
    finally:
        if podman is not None:
            podman("rm", "-a", "-f", "-t", "0", check=False)
            shutil.rmtree(podman.runroot, ignore_errors=True)
        stack.close()
    assert root_links() == before_links, "nothing was created in the root namespace"


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
