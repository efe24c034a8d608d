"""DNS message decoding for flows: the shared wire parser of ``ciliary.dnswire``.

The decoder lives in the shared library (the identity service needs it for toFQDNs);
this module keeps the names the flows service and its tools import.
"""

from __future__ import annotations

from ciliary.dnswire import (
    QTYPES,
    RCODE_NAMES,
    TTL_NONE,
    DNSMessage,
    DNSRecord,
    build_query,
    build_response,
    encode_name,
    parse_dns,
    type_name,
)

__all__ = [
    "QTYPES",
    "RCODE_NAMES",
    "TTL_NONE",
    "DNSMessage",
    "DNSRecord",
    "build_query",
    "build_response",
    "encode_name",
    "parse_dns",
    "type_name",
]
