"""The bridge's settings, from the environment (as every service takes them).

Invariants:
- Pure: `settings_from_env(env, cluster, instance)` reads only the mapping it is given; a
  value that does not parse is named in `BridgeSettings.problems` and its default used,
  never an exception.
- ``kubeconfig`` empty means in-cluster configuration (the service account of a pod).
- The lease timings keep ``retry_period < renew_deadline < lease_duration``: a leader that
  could not renew for ``renew_deadline`` stops writing before any other replica may take
  the lease over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_KUBECONFIG = "CILIARY_KUBECONFIG"
ENV_CONTEXT = "CILIARY_KUBE_CONTEXT"
ENV_LEASE_NAMESPACE = "CILIARY_KUBE_LEASE_NAMESPACE"
ENV_LEASE_NAME = "CILIARY_KUBE_LEASE_NAME"
ENV_LEASE_DURATION = "CILIARY_KUBE_LEASE_DURATION"
ENV_RENEW_DEADLINE = "CILIARY_KUBE_RENEW_DEADLINE"
ENV_RETRY_PERIOD = "CILIARY_KUBE_RETRY_PERIOD"
ENV_PAGE_SIZE = "CILIARY_KUBE_PAGE_SIZE"
ENV_WATCH_TIMEOUT = "CILIARY_KUBE_WATCH_TIMEOUT"


@dataclass(frozen=True)
class BridgeSettings:
    kubeconfig: str = ""
    context: str = ""
    identity: str = ""  # holder identity in the Lease
    lease_namespace: str = "kube-system"
    lease_name: str = "ciliary-kubebridge"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    page_size: int = 500
    watch_timeout: int = 300  # seconds the API server keeps one watch open
    problems: tuple[str, ...] = field(default=())


def _number(env: Mapping[str, str], name: str, default: float, problems: list[str],
            *, minimum: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{name}={text!r} is not a number; using {default:g}")
        return default
    if value < minimum:
        problems.append(f"{name}={text!r} is below {minimum:g}; using {default:g}")
        return default
    return value


def settings_from_env(env: Mapping[str, str], cluster: str, instance: str) -> BridgeSettings:
    problems: list[str] = []
    base = BridgeSettings()
    duration = _number(env, ENV_LEASE_DURATION, base.lease_duration, problems, minimum=1)
    renew = _number(env, ENV_RENEW_DEADLINE, base.renew_deadline, problems, minimum=0.5)
    retry = _number(env, ENV_RETRY_PERIOD, base.retry_period, problems, minimum=0.1)
    if not retry < renew < duration:
        problems.append(f"lease timings need retry < renew deadline < duration "
                        f"(got {retry:g} < {renew:g} < {duration:g}); using the defaults")
        duration, renew, retry = base.lease_duration, base.renew_deadline, base.retry_period
    return BridgeSettings(
        kubeconfig=env.get(ENV_KUBECONFIG, "").strip(),
        context=env.get(ENV_CONTEXT, "").strip(),
        identity=instance,
        lease_namespace=env.get(ENV_LEASE_NAMESPACE, "").strip() or base.lease_namespace,
        lease_name=env.get(ENV_LEASE_NAME, "").strip() or f"ciliary-kubebridge-{cluster}",
        lease_duration=duration,
        renew_deadline=renew,
        retry_period=retry,
        page_size=int(_number(env, ENV_PAGE_SIZE, base.page_size, problems, minimum=1)),
        watch_timeout=int(_number(env, ENV_WATCH_TIMEOUT, base.watch_timeout, problems,
                                  minimum=1)),
        problems=tuple(problems),
    )
