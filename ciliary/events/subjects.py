"""Topics and subjects of the public event API, and the ``CILIARY_EVENTS`` setting (pure).

Invariants:
- Every subject is ``ciliary.events.<topic>.<cluster>[.<node>]`` (the templates are in
  ``ciliary.schema.names``); ``<topic>`` is one of
  ``TOPICS``, so ``ciliary.events.<topic>.>`` selects a topic and ``ciliary.events.>``
  everything. Tokens never contain a dot: a node or cluster name's dots become ``_`` and
  an empty token is ``_``.
- ``VERSION`` is the version of every change payload (its ``"version"`` field); an
  incompatible change adds new subjects beside these, it never changes their payloads.
- ``parse_setting`` never raises: a bad value gives the default (``interest``) and the
  problem, naming the variable and the bad part.
"""

from __future__ import annotations

from dataclasses import dataclass

from ciliary.schema import names

VERSION = 1
PREFIX = names.SUBJECT_EVENTS_ALL.removesuffix(".>")
FLOWS, POLICY, IDENTITIES, ENDPOINTS, SERVICES = "flows", "policy", "identities", "endpoints", "services"
TOPICS = (FLOWS, POLICY, IDENTITIES, ENDPOINTS, SERVICES)
# the service that publishes each topic (the writer of the bucket it comes from)
SERVICE_TOPICS: dict[str, tuple[str, ...]] = {
    "flows": (FLOWS,), "identity": (IDENTITIES, ENDPOINTS), "policy": (POLICY,), "servicelb": (SERVICES,),
}

SUBJECT_ALL = names.SUBJECT_EVENTS_ALL
SUBJECT_INTEREST = names.SUBJECT_EVENTS_INTEREST  # JSON lease request (``interest.parse_request``)

ENV_EVENTS = "CILIARY_EVENTS"
MODE_OFF, MODE_INTEREST, MODE_ALWAYS = "off", "interest", "always"


def token(name: str) -> str:
    """A name as one subject token: ``.`` ``*`` ``>`` and blanks become ``_``; empty is ``_``."""
    if not name:
        return "_"
    return "".join("_" if c in ".*> \t\r\n" else c for c in name)


def subject(topic: str, cluster: str, node: str | None = None) -> str:
    """``ciliary.events.<topic>.<cluster>`` (``.<node>`` for per-node topics)."""
    if node is None:
        return names.SUBJECT_EVENTS.format(topic=topic, cluster=token(cluster))
    return names.SUBJECT_EVENTS_NODE.format(topic=topic, cluster=token(cluster), node=token(node))


def topic_of(subject_name: str) -> str:
    """The topic token of an event subject (``""`` for a subject outside the API)."""
    parts = subject_name.split(".")
    return parts[2] if len(parts) > 3 and f"{parts[0]}.{parts[1]}" == PREFIX else ""


def publish_patterns(service: str, cluster: str) -> tuple[str, ...]:
    """The subjects ``service`` publishes events on, as NATS permission patterns (it also
    subscribes to ``SUBJECT_INTEREST``); a read-only consumer needs to subscribe to
    ``SUBJECT_ALL`` and publish to ``SUBJECT_INTEREST``."""
    return tuple(p for topic in SERVICE_TOPICS.get(service, ())
                 for p in (subject(topic, cluster), subject(topic, cluster) + ".>"))


@dataclass(frozen=True)
class EventsSetting:
    """What ``CILIARY_EVENTS`` says: topics always published, and whether leases count."""

    always: frozenset[str] = frozenset()
    leases: bool = True


def parse_setting(text: str) -> tuple[EventsSetting, str]:
    """``off`` | ``interest`` (default) | ``always`` | a comma list of topics published
    always (the others on interest) -> (setting, problem or ``""``)."""
    value = text.strip().lower()
    if value in ("", MODE_INTEREST):
        return EventsSetting(), ""
    if value == MODE_OFF:
        return EventsSetting(leases=False), ""
    if value == MODE_ALWAYS:
        return EventsSetting(always=frozenset(TOPICS)), ""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOPICS]
    if unknown or not names:
        return EventsSetting(), (
            f"{ENV_EVENTS}={text!r}: unknown topic {', '.join(map(repr, unknown)) or '(none)'}; expected "
            f"{MODE_OFF}, {MODE_INTEREST}, {MODE_ALWAYS} or a comma list of {', '.join(TOPICS)}; "
            f"using {MODE_INTEREST}")
    return EventsSetting(always=frozenset(names)), ""
