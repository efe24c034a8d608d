"""The policy service's settings from the environment, as ``ResolveOptions``.

Invariants:
- A bad number is logged naming the variable and its default is used; flags are true for
  1/true/yes/on (any case) and false otherwise. Nothing here stops the service.
"""

from __future__ import annotations

import os

from ciliary import config

from .resolve import DEFAULT_MAX_ENTRIES, ResolveOptions

ENV_AUDIT = "CILIARY_POLICY_AUDIT_MODE"
ENV_MAX_ENTRIES = "CILIARY_POLICY_MAX_ENTRIES"
ENV_ALL_CLUSTERS = "CILIARY_POLICY_ALL_CLUSTERS"
ENV_ALLOW_LOCALHOST = "CILIARY_POLICY_ALLOW_LOCALHOST"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def options_from_env(cluster: str, cluster_id: int) -> ResolveOptions:
    return ResolveOptions(
        cluster_name=cluster,
        cluster_id=cluster_id,
        max_entries=int(config.env_number(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES, integer=True, minimum=0)),
        audit_mode=_flag(ENV_AUDIT),
        local_cluster_only=not _flag(ENV_ALL_CLUSTERS),
        allow_localhost=os.environ.get(ENV_ALLOW_LOCALHOST, "always").lower() != "policy",
    )
