"""Pure syntax checks for Kubernetes names, label keys/values, ports and addresses.

Invariants:
- Each ``check_*`` returns ``None`` when the value is valid, else a message that names the
  rule that was broken (wording modelled on Kubernetes' apimachinery validation).
- Nothing here knows about objects or field paths.
"""

from __future__ import annotations

import ipaddress
import re

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_IANA_SVC_NAME = re.compile(r"^[-a-z0-9]+$")
_C_SOURCE = re.compile(r"^[a-z][a-z0-9-]*$")

LABEL_MAX = 63
SUBDOMAIN_MAX = 253
SVC_NAME_MAX = 15


def _quote(value: str) -> str:
    return repr(value)


def check_dns1123_label(value: str) -> str | None:
    if len(value) > LABEL_MAX:
        return f"must be no more than {LABEL_MAX} characters, got {len(value)}"
    if not _DNS1123_LABEL.match(value):
        return (
            f"invalid name {_quote(value)}: a lowercase RFC 1123 label must consist of lower "
            "case alphanumeric characters or '-', and must start and end with an alphanumeric "
            "character"
        )
    return None


def check_dns1035_label(value: str) -> str | None:
    if len(value) > LABEL_MAX:
        return f"must be no more than {LABEL_MAX} characters, got {len(value)}"
    if not _DNS1035_LABEL.match(value):
        return (
            f"invalid name {_quote(value)}: a DNS-1035 label must consist of lower case "
            "alphanumeric characters or '-', start with an alphabetic character, and end with "
            "an alphanumeric character"
        )
    return None


def check_dns1123_subdomain(value: str) -> str | None:
    if len(value) > SUBDOMAIN_MAX:
        return f"must be no more than {SUBDOMAIN_MAX} characters, got {len(value)}"
    if not _DNS1123_SUBDOMAIN.match(value):
        return (
            f"invalid name {_quote(value)}: a lowercase RFC 1123 subdomain must consist of lower "
            "case alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character"
        )
    return None


def check_qualified_name(key: str, *, shown: str | None = None) -> str | None:
    """A label or annotation key: ``[prefix/]name``, prefix a DNS subdomain, name ≤ 63.

    `shown` is the key as the user wrote it, for the message (defaults to `key`).
    """
    prefix, sep, name = key.rpartition("/")
    key = key if shown is None else shown
    if sep:
        if not prefix:
            return f"invalid key {_quote(key)}: prefix part must be non-empty"
        if check_dns1123_subdomain(prefix) is not None:
            return f"invalid key {_quote(key)}: prefix part must be a lowercase DNS subdomain"
    if not name:
        return f"invalid key {_quote(key)}: name part must be non-empty"
    if len(name) > LABEL_MAX:
        return f"invalid key {_quote(key)}: name part must be no more than {LABEL_MAX} characters"
    if not _QUALIFIED_NAME.match(name):
        return (
            f"invalid key {_quote(key)}: name part must consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def check_selector_key(key: str, *, allow_source: bool) -> str | None:
    """A selector key; with `allow_source`, a Cilium ``source:`` prefix is accepted."""
    if allow_source and ":" in key:
        source, _, rest = key.partition(":")
        if not _C_SOURCE.match(source):
            return f"invalid key {_quote(key)}: label source {_quote(source)} is not valid"
        return check_qualified_name(rest, shown=key)
    return check_qualified_name(key)


def check_label_value(value: str) -> str | None:
    if len(value) > LABEL_MAX:
        return f"invalid label value {_quote(value)}: must be no more than {LABEL_MAX} characters"
    if not _LABEL_VALUE.match(value):
        return (
            f"invalid label value {_quote(value)}: must be empty or consist of alphanumeric "
            "characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def check_port_name(value: str) -> str | None:
    """IANA_SVC_NAME: ≤ 15 chars, lowercase alphanumerics and '-', at least one letter."""
    problem = None
    if not value or len(value) > SVC_NAME_MAX:
        problem = f"must be 1-{SVC_NAME_MAX} characters"
    elif not _IANA_SVC_NAME.match(value):
        problem = "must contain only lowercase alphanumeric characters or '-'"
    elif not any(c.isalpha() for c in value):
        problem = "must contain at least one letter"
    elif "--" in value:
        problem = "must not contain consecutive hyphens"
    elif value.startswith("-") or value.endswith("-"):
        problem = "must not begin or end with a hyphen"
    if problem:
        return f"invalid port name {_quote(value)}: {problem}"
    return None


def check_port_number(value: int, *, allow_zero: bool = False) -> str | None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        return f"must be between {low} and 65535, got {value}"
    return None


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


# A dotted-quad IPv4 address exactly as ``ipaddress`` accepts it (no leading zeros, each
# octet 0-255): the common case, checked without building an address object.
_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                   r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def check_ip(value: str, *, family: int | None = None) -> str | None:
    if family != 6 and _IPV4.fullmatch(value):
        return None
    ip = parse_ip(value)
    if ip is None:
        return f"must be a valid IP address, got {_quote(value)}"
    if family is not None and ip.version != family:
        return f"must be an IPv{family} address, got {_quote(value)}"
    return None


def parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A ``prefix/len`` CIDR (host bits allowed, as Kubernetes does); ``None`` if invalid."""
    if "/" not in value:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def check_cidr(value: str) -> str | None:
    if parse_cidr(value) is None:
        return f"must be a valid CIDR (e.g. 10.0.0.0/8 or fd00::/64), got {_quote(value)}"
    return None


def check_except_within(cidr: str, excepts: list[str], *, strict: bool) -> list[tuple[int, str]]:
    """Problems for ``except`` entries: each must parse and lie inside `cidr`.

    With `strict`, an entry equal to `cidr` is also rejected (Kubernetes ipBlock requires a
    strict subset; Cilium only requires containment).
    """
    outer = parse_cidr(cidr)
    problems: list[tuple[int, str]] = []
    for i, text in enumerate(excepts):
        inner = parse_cidr(text)
        if inner is None:
            problems.append((i, check_cidr(text) or "invalid CIDR"))
        elif outer is None:
            continue
        elif inner.version != outer.version or not inner.subnet_of(outer):  # type: ignore[arg-type]
            problems.append((i, f"{text} is not within {cidr}"))
        elif strict and inner == outer:
            problems.append((i, f"must be a strict subset of {cidr}"))
    return problems
