"""The servicelb service's settings from the environment, as a ``model.Config``.

Invariants:
- A bad value (a service CIDR that is not IPv4, a Maglev table size that is not a prime
  Cilium accepts, a node port range that is not LOW-HIGH) is logged naming the variable
  and the default is used. Nothing here stops the service.
"""

from __future__ import annotations

import logging
import os

from services.servicelb import allocator, maglev, model

log = logging.getLogger(__name__)

ENV_SERVICE_CIDR = "CILIARY_SERVICE_CIDR"
ENV_MAGLEV_TABLE_SIZE = "CILIARY_MAGLEV_TABLE_SIZE"
ENV_DERIVE_SLICES = "CILIARY_SERVICELB_DERIVE_SLICES"
ENV_NODE_PORT_RANGE = "CILIARY_NODE_PORT_RANGE"


def config_from_env(cluster: str, cluster_id: int, env: dict[str, str] | None = None) -> model.Config:
    """Settings from the environment; a bad value is logged and the default used."""
    env = dict(os.environ) if env is None else env
    cfg = model.Config(cluster=cluster, cluster_id=cluster_id)
    cidr = env.get(ENV_SERVICE_CIDR, cfg.service_cidr)
    try:
        allocator.ip_pool("check", cidr)
    except ValueError as err:
        log.error("%s=%r is not an IPv4 CIDR (%s); using %s", ENV_SERVICE_CIDR, cidr, err, cfg.service_cidr)
        cidr = cfg.service_cidr
    size = cfg.maglev_table_size
    try:
        size = maglev.check_table_size(int(env.get(ENV_MAGLEV_TABLE_SIZE, size)))
    except ValueError as err:
        log.error("%s: %s; using %d", ENV_MAGLEV_TABLE_SIZE, err, cfg.maglev_table_size)
        size = cfg.maglev_table_size
    derive = env.get(ENV_DERIVE_SLICES, "1").strip().lower() not in ("0", "false", "no", "off")
    port_range = cfg.node_port_range
    raw = env.get(ENV_NODE_PORT_RANGE, "")
    if raw:
        try:
            lo, hi = (int(x) for x in raw.split("-", 1))
            if not 0 < lo < hi <= 65535:
                raise ValueError(raw)
            port_range = (lo, hi)
        except ValueError:
            log.error("%s=%r is not LOW-HIGH; using %d-%d", ENV_NODE_PORT_RANGE, raw, *port_range)
    return model.Config(cluster=cluster, cluster_id=cluster_id, service_cidr=cidr,
                        maglev_table_size=size, derive_slices=derive, node_port_range=port_range)
