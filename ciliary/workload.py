"""A tiny test workload for pods: TCP/UDP responders and a client, plain sockets only.

Invariants: ``serve`` answers every TCP connection and every UDP datagram with
``<name> <peer-ip>\\n`` (an HTTP/1.0 response when the request looks like HTTP), so a client
can tell which backend answered and what source address it saw. No DNS lookups are made
(a pod namespace has no resolver), and nothing blocks on anything but its sockets.

``serve --dns PORT [--dns-record NAME=IPv4 ...]`` also answers DNS over UDP with the real
wire format: an A (or ANY) query for a name of the static map gets its address (TTL 30),
a known name asked for another type gets NOERROR without answers, anything else NXDOMAIN.
``resolve SERVER NAME [--port 53]`` sends one A query and prints ``NOERROR 10.0.0.1`` /
``NXDOMAIN`` (the rcode name, then the addresses).

For load-balancing tests:

- ``session --tcp PORT`` answers every line a client sends with ``<name> <peer-ip>`` and
  keeps the connection open until the client closes it, so one connection can exchange
  data for as long as it lives (a one-line client sees what ``serve`` would answer).
- ``loop HOST PORT`` opens one connection after another (``--interval`` apart, until
  ``--count`` attempts or ``--stop-file`` exists or ``--max-seconds`` passed), sends a
  line, reads the answer, and prints one JSON summary: answers per backend, failures
  with their errors, and per attempt ``[start, end, backend or null]`` (wall-clock
  seconds) so a test can check who answered when.
- ``hold HOST PORT`` opens one connection and, for every line read from stdin, sends
  it and prints the answer (flushed); EOF on stdin closes the connection. A failed
  exchange prints ``error: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import struct
import sys
import time

from ciliary.dnswire import RCODE_MNEMONICS  # stdlib-only, like this module


class _UdpResponder(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(f"{self.name} {addr[0]}\n".encode(), addr)


DNS_RCODES = RCODE_MNEMONICS
DNS_TTL = 30


def _dns_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def _dns_question(data: bytes) -> tuple[str, int, int] | None:
    """(lower-case name without trailing dot, qtype, end offset) of the first question."""
    pos, labels = 12, []
    while pos < len(data):
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 or pos + 1 + n > len(data):
            return None
        labels.append(data[pos + 1:pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    else:
        return None
    if pos + 4 > len(data):
        return None
    qtype = struct.unpack_from("!H", data, pos)[0]
    return ".".join(labels).lower(), qtype, pos + 4


def dns_answer(query: bytes, records: dict[str, str]) -> bytes | None:
    """The response to a DNS query from the static map ``records`` (name -> IPv4)."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", query, 0)
    if flags & 0x8000 or qdcount < 1:
        return None
    q = _dns_question(query)
    rd = flags & 0x0100
    if q is None:
        return struct.pack("!HHHHHH", ident, 0x8000 | rd | 1, 0, 0, 0, 0)  # FORMERR
    name, qtype, end = q
    question = query[12:end]
    address = records.get(name)
    if address is None:
        return struct.pack("!HHHHHH", ident, 0x8480 | rd | 3, 1, 0, 0, 0) + question
    answers = b""
    count = 0
    if qtype in (1, 255):
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, DNS_TTL, 4) + socket.inet_aton(address)
        count = 1
    return struct.pack("!HHHHHH", ident, 0x8480 | rd, 1, count, 0, 0) + question + answers


class _DnsResponder(asyncio.DatagramProtocol):
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        answer = dns_answer(data, self.records)
        if answer is not None:
            self.transport.sendto(answer, addr)


def resolve(server: str, name: str, *, port: int = 53, timeout: float = 2.0) -> tuple[str, list[str]]:
    """One A query over UDP: (rcode name, IPv4 addresses)."""
    ident = secrets.randbelow(0x10000)
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + _dns_name(name) + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((server, port))
        sock.send(query)
        while True:
            data = sock.recv(4096)
            if len(data) >= 12 and struct.unpack_from("!H", data, 0)[0] == ident:
                break
    flags, _qd, ancount = struct.unpack_from("!HHH", data, 2)
    rcode = flags & 0xF
    q = _dns_question(data)
    pos = q[2] if q else len(data)
    ips: list[str] = []
    for _ in range(ancount):
        if pos + 2 <= len(data) and data[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while pos < len(data) and data[pos]:
                pos += 1 + data[pos]
            pos += 1
        if pos + 10 > len(data):
            break
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if rtype == 1 and rdlen == 4:
            ips.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += rdlen
    return DNS_RCODES.get(rcode, str(rcode)), ips


async def serve(name: str, tcp_ports: list[int], udp_ports: list[int],
                dns_ports: list[int] | None = None, dns_records: dict[str, str] | None = None) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            first = await asyncio.wait_for(reader.read(4096), timeout=5)
        except (TimeoutError, ConnectionError):
            first = b""
        body = f"{name} {peer}\n".encode()
        if first[:4] in (b"GET ", b"POST", b"HEAD"):
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        else:
            writer.write(body)
        try:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            pass

    servers = [await asyncio.start_server(on_conn, "0.0.0.0", port, reuse_address=True) for port in tcp_ports]
    loop = asyncio.get_running_loop()
    for port in udp_ports:
        await loop.create_datagram_endpoint(lambda: _UdpResponder(name), local_addr=("0.0.0.0", port))
    records = {k.strip(".").lower(): v for k, v in (dns_records or {}).items()}
    for port in dns_ports or []:
        await loop.create_datagram_endpoint(lambda: _DnsResponder(records), local_addr=("0.0.0.0", port))
    print(f"{name}: serving tcp {tcp_ports} udp {udp_ports} dns {dns_ports or []}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers), asyncio.Event().wait())


async def session(name: str, tcp_ports: list[int]) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        answer = f"{name} {peer}\n".encode()
        try:
            while await reader.readline():
                writer.write(answer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(on_conn, "0.0.0.0", port, reuse_address=True) for port in tcp_ports]
    print(f"{name}: session tcp {tcp_ports}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def loop(host: str, port: int, *, interval: float, count: int, stop_file: str, max_seconds: float,
         timeout: float) -> dict[str, object]:
    """Connect repeatedly; the summary described in the module docstring."""
    by_backend: dict[str, int] = {}
    errors: dict[str, int] = {}
    records: list[tuple[float, float, str | None]] = []
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and (not count or len(records) < count):
        if stop_file and os.path.exists(stop_file):
            break
        started = time.time()
        try:
            answer = connect(host, port, timeout=timeout)
            backend: str | None = answer.split()[0] if answer else None
            if backend is None:
                errors["empty answer"] = errors.get("empty answer", 0) + 1
        except OSError as err:
            backend = None
            text = f"{type(err).__name__}: {err}"
            errors[text] = errors.get(text, 0) + 1
        records.append((round(started, 4), round(time.time(), 4), backend))
        if backend is not None:
            by_backend[backend] = by_backend.get(backend, 0) + 1
        if interval:
            time.sleep(interval)
    failed = sum(1 for r in records if r[2] is None)
    return {"attempts": len(records), "ok": len(records) - failed, "failed": failed,
            "by_backend": by_backend, "errors": errors, "records": records}


def hold(host: str, port: int, *, timeout: float) -> None:
    """One long-lived connection driven by stdin lines (see the module docstring)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        for line in sys.stdin:
            sock.sendall((line.rstrip("\n") + "\n").encode())
            answer = reader.readline()
            if not answer:
                raise ConnectionError("connection closed by the peer")
            print(answer.decode(errors="replace").strip(), flush=True)


def connect(host: str, port: int, *, udp: bool = False, timeout: float = 2.0, payload: bytes = b"ping\n") -> str:
    """One request; returns the answer line. Raises OSError/TimeoutError on failure."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(payload)
        data = sock.recv(4096)
    return data.decode(errors="replace").strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ciliary.workload")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", default=socket.gethostname())
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    s.add_argument("--dns", type=int, action="append", default=[], help="answer DNS on this UDP port")
    s.add_argument("--dns-record", action="append", default=[], metavar="NAME=IPV4",
                   help="an A record of the DNS responder's static map")
    r = sub.add_parser("resolve")
    r.add_argument("server")
    r.add_argument("name")
    r.add_argument("--port", type=int, default=53)
    r.add_argument("--timeout", type=float, default=2.0)
    se = sub.add_parser("session")
    se.add_argument("--name", default=socket.gethostname())
    se.add_argument("--tcp", type=int, action="append", default=[])
    lo = sub.add_parser("loop")
    lo.add_argument("host")
    lo.add_argument("port", type=int)
    lo.add_argument("--interval", type=float, default=0.02, help="seconds between attempts")
    lo.add_argument("--count", type=int, default=0, help="stop after this many attempts (0: no limit)")
    lo.add_argument("--stop-file", default="", help="stop once this file exists")
    lo.add_argument("--max-seconds", type=float, default=60.0)
    lo.add_argument("--timeout", type=float, default=2.0)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--timeout", type=float, default=5.0)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--udp", action="store_true")
    c.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            records = dict(item.split("=", 1) for item in args.dns_record)
            asyncio.run(serve(args.name, args.tcp, args.udp, args.dns, records))
        except KeyboardInterrupt:
            pass
        return
    if args.command == "session":
        try:
            asyncio.run(session(args.name, args.tcp))
        except KeyboardInterrupt:
            pass
        return
    if args.command == "loop":
        print(json.dumps(loop(args.host, args.port, interval=args.interval, count=args.count,
                              stop_file=args.stop_file, max_seconds=args.max_seconds, timeout=args.timeout)))
        return
    if args.command == "hold":
        try:
            hold(args.host, args.port, timeout=args.timeout)
        except OSError as err:
            print(f"error: {err}", flush=True)
            sys.exit(1)
        return
    if args.command == "resolve":
        try:
            rcode, ips = resolve(args.server, args.name, port=args.port, timeout=args.timeout)
        except OSError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        print(" ".join([rcode, *ips]))
        return
    try:
        print(connect(args.host, args.port, udp=args.udp, timeout=args.timeout))
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
