"""Where the flows service's OTLP receiver listens for sidecars: one Unix socket per cluster.

Invariants:
- The path is ``CILIARY_OTLP_SOCKET`` when set, else ``/run/ciliary/otlp/<cluster>.sock``:
  short (Unix socket paths are limited to 107 bytes), distinct per cluster (instances on
  one machine have distinct cluster names) and reachable from every network namespace,
  since a Unix socket lives in the file system, not in a network namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_OTLP_SOCKET = "CILIARY_OTLP_SOCKET"
SOCKET_DIR = Path("/run/ciliary/otlp")


def otlp_socket_path(cluster: str, env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    return env.get(ENV_OTLP_SOCKET) or str(SOCKET_DIR / f"{cluster}.sock")
