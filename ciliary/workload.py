"""A tiny test workload for pods: TCP/UDP responders and a client, plain sockets only.

Invariants: ``serve`` answers every TCP connection and every UDP datagram with
``<name> <peer-ip>\\n`` (an HTTP/1.0 response when the request looks like HTTP), so a client
can tell which backend answered and what source address it saw. No DNS lookups are made
(a pod namespace has no resolver), and nothing blocks on anything but its sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys


class _UdpResponder(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(f"{self.name} {addr[0]}\n".encode(), addr)


async def serve(name: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
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
    print(f"{name}: serving tcp {tcp_ports} udp {udp_ports}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers), asyncio.Event().wait())


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
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--udp", action="store_true")
    c.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            asyncio.run(serve(args.name, args.tcp, args.udp))
        except KeyboardInterrupt:
            pass
        return
    try:
        print(connect(args.host, args.port, udp=args.udp, timeout=args.timeout))
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
