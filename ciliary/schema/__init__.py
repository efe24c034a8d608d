"""Every value that crosses the bus: KV bucket values and subject payloads.

One module per domain; this package re-exports all of their public names, so callers
write ``schema.<Name>`` whatever module defines it:
- ``wire``: the ``Record`` base and the msgpack/JSON encodings;
- ``names``: every bucket, stream and subject name, cluster defaults, service names;
- ``resources``: source objects and their status; ``health``: service health reports;
- ``identity``: identity numbering (reserved identities, bit layout) and the
  ``identities``/``ipcache`` records; ``servicelb``: load-balancer frontends;
- ``policy``: per-identity policy entries, status and trace; ``flows``: raw events,
  Hubble flows and queries; ``node``: endpoint registration and debug views; ``mesh``:
  ClusterMesh exports, remotes and imported state.

Invariants:
- Each bucket, stream and subject name is a constant defined in ``names`` and nowhere
  else; a KV bucket has exactly one writing service (``BUCKET_WRITERS``).
- Every payload is a frozen ``msgspec.Struct`` (a ``Record``); on the wire it is msgpack,
  for humans it is JSON. Field names, order, defaults and struct options are the wire
  format: changing them changes what other processes decode.
- Every identity- or flow-bearing record carries the cluster name and cluster ID so that
  ClusterMesh can merge records of several clusters without rewriting them.
- No two domain modules define the same public name.
- ``schema.msgspec`` is the msgspec module the records are built on (its errors, its
  JSON decoder).
"""

from __future__ import annotations

import msgspec as msgspec  # callers reach its errors and JSON decoder as ``schema.msgspec``

from .flows import *  # noqa: F403
from .health import *  # noqa: F403
from .identity import *  # noqa: F403
from .l7 import *  # noqa: F403
from .mesh import *  # noqa: F403
from .names import *  # noqa: F403
from .node import *  # noqa: F403
from .policy import *  # noqa: F403
from .resources import *  # noqa: F403
from .servicelb import *  # noqa: F403
from .wire import *  # noqa: F403
