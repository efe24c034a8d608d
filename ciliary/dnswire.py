"""DNS wire format: decoding of (possibly truncated) UDP/53 payloads, and builders.

Shared by the flows service (Hubble-style DNS summaries) and the identity service
(toFQDNs: names → IPs from snooped responses). Pure code, no I/O.

Invariants:
- ``parse_dns`` never raises: garbage, a header cut short or an unparseable question
  return ``None``; a message cut inside the answer section returns what was complete
  before the cut (``truncated`` set).
- Names are fully qualified with a trailing dot (``example.com.``) like Hubble's
  ``query``/``cnames``; types use the RFC/IANA mnemonics (``A``, ``AAAA``, ``CNAME``).
- ``records`` lists every complete answer record in wire order with its owner name,
  type, TTL and value (address text for A/AAAA, target name for CNAME, "" otherwise);
  ``ips``/``cnames``/``ttl`` are summaries of the same records. ``address_ttls`` follows
  the CNAME chain from the query name and returns only addresses owned by a name of that
  chain.
- Name decompression follows pointers backwards only and at most 64 labels deep, so
  hostile input cannot loop.
"""


from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
    28: "AAAA", 33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG",
    47: "NSEC", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY", 257: "CAA",
}

# Hubble's DNS metrics / summaries name rcodes like this.
RCODE_NAMES = {
    0: "No Error",
    1: "Format Error",
    2: "Server Failure",
    3: "Non-Existent Domain",
    4: "Not Implemented",
    5: "Query Refused",
}

# The rcode mnemonics of RFC 1035 / dig ("NXDOMAIN"), as the CLI and the test workload print them.
RCODE_MNEMONICS = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

TTL_NONE = 0xFFFFFFFF  # Cilium reports this TTL for a response without answers


def type_name(code: int) -> str:
    return QTYPES.get(code, f"TYPE{code}")


@dataclass(frozen=True)
class DNSRecord:
    """One answer record: owner name, type mnemonic, TTL (seconds) and value."""

    name: str
    type: str
    ttl: int
    value: str = ""


@dataclass
class DNSMessage:
    id: int
    response: bool
    rcode: int
    query: str = ""
    qtypes: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    cnames: list[str] = field(default_factory=list)
    rrtypes: list[str] = field(default_factory=list)
    ttl: int = TTL_NONE
    truncated: bool = False
    records: list[DNSRecord] = field(default_factory=list)

    def cname_chain(self) -> tuple[dict[str, int], dict[str, str]]:
        """The names reached from the query name through CNAME records (lower case, the
        query name included) with the lowest TTL on the way to each, and the name each
        was reached from. Records may come in any order."""
        if not self.query:
            return {}, {}
        chain = {self.query.lower(): TTL_NONE}
        parent: dict[str, str] = {}
        changed = True
        while changed:  # chains are short
            changed = False
            for rec in self.records:
                owner = rec.name.lower()
                if rec.type == "CNAME" and owner in chain:
                    target = rec.value.lower()
                    ttl = min(chain[owner], rec.ttl)
                    if chain.get(target, TTL_NONE + 1) > ttl:
                        chain[target] = ttl
                        parent.setdefault(target, owner)
                        changed = True
        return chain, parent

    def address_ttls(self) -> dict[str, int]:
        """Address -> TTL of the A/AAAA records reached from the query name through its
        CNAME chain (the lowest TTL along the way, as a resolver caches it)."""
        chain, _ = self.cname_chain()
        out: dict[str, int] = {}
        for rec in self.records:
            owner = rec.name.lower()
            if rec.type in ("A", "AAAA") and owner in chain:
                ttl = min(chain[owner], rec.ttl)
                out[rec.value] = min(out.get(rec.value, ttl), ttl)
        return out


class _Cut(Exception):
    """The payload ended in the middle of a field."""


def _name(data: bytes, pos: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name at ``pos``; returns (name, position after it)."""
    labels: list[str] = []
    end = -1
    hops = 0
    while True:
        if pos >= len(data):
            raise _Cut
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise _Cut
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= pos:
                raise ValueError("forward compression pointer")
            pos = target
            hops += 1
            if hops > 64:
                raise ValueError("compression loop")
            continue
        if length & 0xC0:
            raise ValueError("reserved label type")
        pos += 1
        if length == 0:
            break
        if pos + length > len(data):
            raise _Cut
        labels.append(data[pos : pos + length].decode("ascii", "backslashreplace"))
        pos += length
        if len(labels) > 127:
            raise ValueError("name too long")
    return (".".join(labels) + "."), (end if end >= 0 else pos)


def parse_dns(payload: bytes) -> DNSMessage | None:
    """Decode a DNS query or response; ``None`` when not even the question is readable."""
    try:
        return _parse(bytes(payload))
    except Exception:  # noqa: BLE001 - the contract is "never raise on garbage"
        return None


def _parse(data: bytes) -> DNSMessage | None:
    if len(data) < 12:
        return None
    ident, flags, qdcount, ancount, _nscount, _arcount = struct.unpack_from("!HHHHHH", data)
    opcode = (flags >> 11) & 0xF
    if opcode != 0 or qdcount == 0 or qdcount > 16:
        return None
    msg = DNSMessage(id=ident, response=bool(flags & 0x8000), rcode=flags & 0xF)
    pos = 12
    try:
        for i in range(qdcount):
            name, pos = _name(data, pos)
            if pos + 4 > len(data):
                raise _Cut
            qtype, _qclass = struct.unpack_from("!HH", data, pos)
            pos += 4
            if i == 0:
                msg.query = name
            msg.qtypes.append(type_name(qtype))
    except (_Cut, ValueError):
        return None
    if not msg.response:
        msg.ttl = 0
        return msg
    try:
        for _ in range(ancount):
            owner, pos = _name(data, pos)
            if pos + 10 > len(data):
                raise _Cut
            rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            pos += 10
            if pos + rdlen > len(data):
                raise _Cut
            rdata_at = pos
            pos += rdlen
            if rtype == 1 and rdlen == 4:
                value = str(ipaddress.IPv4Address(data[rdata_at:pos]))
                msg.ips.append(value)
            elif rtype == 28 and rdlen == 16:
                value = str(ipaddress.IPv6Address(data[rdata_at:pos]))
                msg.ips.append(value)
            elif rtype == 5:
                value, _ = _name(data, rdata_at)
                msg.cnames.append(value)
            else:
                msg.rrtypes.append(type_name(rtype))
                msg.records.append(DNSRecord(owner, type_name(rtype), ttl))
                continue
            msg.records.append(DNSRecord(owner, type_name(rtype), ttl, value))
            msg.rrtypes.append(type_name(rtype))
            msg.ttl = min(msg.ttl, ttl)
    except _Cut:
        msg.truncated = True
    except ValueError:
        msg.truncated = True
    return msg


# ---------------------------------------------------------------- builders (tests, tools)


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\0"


def build_query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    """A standard recursive query (RD set), as a stub resolver sends it."""
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, 1)


def build_response(
    name: str,
    qtype: int,
    answers: list[tuple[int, int, bytes]] | list[tuple[int, int, bytes, str]],
    *,
    rcode: int = 0,
    ident: int = 0x1234,
) -> bytes:
    """A response echoing the question; answers are (type, ttl, rdata) with the owner a
    pointer to the question, or (type, ttl, rdata, owner name) with the owner spelled out."""
    flags = 0x8180 | (rcode & 0xF)
    header = struct.pack("!HHHHHH", ident, flags, 1, len(answers), 0, 0)
    body = encode_name(name) + struct.pack("!HH", qtype, 1)
    for answer in answers:
        rtype, ttl, rdata = answer[0], answer[1], answer[2]
        owner = encode_name(answer[3]) if len(answer) > 3 else b"\xc0\x0c"  # type: ignore[misc]
        body += owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata
    return header + body


def a_record(ip: str) -> bytes:
    """RDATA of an A record."""
    return ipaddress.IPv4Address(ip).packed
