"""Sockets inside pod namespaces for e2e tests: echo servers, clients, ping.

Invariant: every socket is created by a thread that joined the pod's network
namespace (``netns.run_in_netns``); the test process itself never changes
namespace and never talks to an address outside the test's namespaces.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time

from services.node import netns as N

PIN_ROOT = "/sys/fs/bpf/ciliary"
# Small maps keep per-test load fast; the layouts are the same as the defaults.
SMALL_MAPS = dict(ipcache=4096, lxc=1024, policy=1024, ct=65536, lb=1024, metrics=256,
                  events_pages=64)

class EchoServer:
    """TCP or UDP echo server whose socket lives in a pod namespace."""

    def __init__(self, netns: str, port: int, udp: bool = False, reply_prefix: bytes = b""):
        self.udp = udp
        self.prefix = reply_prefix
        self.peers: list[tuple[str, int]] = []
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            if not udp:
                s.listen(64)
            s.settimeout(0.1)
            return s

        self.sock = N.run_in_netns(netns, make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.udp:
                    data, addr = self.sock.recvfrom(2048)
                    self.peers.append(addr)
                    self.sock.sendto(self.prefix + data, addr)
                else:
                    conn, addr = self.sock.accept()
                    self.peers.append(addr)
                    threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            except TimeoutError:
                continue
            except OSError:
                return

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while not self._stop.is_set():
                    data = conn.recv(2048)
                    if not data:
                        return
                    conn.sendall(self.prefix + data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)


def tcp_connect(netns: str, ip: str, port: int, timeout: float = 2.0) -> socket.socket:
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
    except BaseException:
        s.close()
        raise
    return s


def tcp_roundtrip(netns: str, ip: str, port: int, payload: bytes = b"ping",
                  timeout: float = 2.0) -> bytes:
    with tcp_connect(netns, ip, port, timeout) as s:
        s.sendall(payload)
        return s.recv(2048)


def tcp_echoes(netns: str, ip: str, port: int, timeout: float = 2.0) -> bool:
    """True when a TCP round trip from ``netns`` to the echo server at ``ip:port`` comes back
    as sent; False when the connection is refused, dropped or reset."""
    try:
        return tcp_roundtrip(netns, ip, port, b"ping", timeout) == b"ping"
    except OSError:
        return False


def udp_roundtrip(netns: str, ip: str, port: int, payload: bytes = b"ping",
                  timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with s:
        s.settimeout(timeout)
        s.sendto(payload, (ip, port))
        return s.recvfrom(2048)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_request(netns: str, ip: str, icmp_type: int, reply_type: int, timeout: float = 2.0,
                 extra: bytes = b"ciliary") -> bool:
    """One ICMP request of ``icmp_type`` (id/sequence header) over a raw socket in ``netns``;
    True when a ``reply_type`` message with the same id arrives from ``ip``."""
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                    socket.IPPROTO_ICMP))
    ident = secrets.randbits(16)
    with s:
        s.settimeout(timeout)
        body = struct.pack("!BBHHH", icmp_type, 0, 0, ident, 1) + extra
        body = body[:2] + struct.pack("!H", _icmp_checksum(body)) + body[4:]
        s.sendto(body, (ip, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, addr = s.recvfrom(2048)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid = struct.unpack("!BBHH", data[ihl:ihl + 6])
            if typ == reply_type and rid == ident and addr[0] == ip:
                return True
    return False


def icmp_ping(netns: str, ip: str, timeout: float = 2.0) -> bool:
    """One ICMP echo over a raw socket in ``netns``; True when the reply arrives."""
    return icmp_request(netns, ip, 8, 0, timeout)


def send_spoofed_udp(netns: str, src: str, dst: str, dport: int, payload: bytes = b"spoof") -> None:
    """Send one UDP datagram with a forged source address from ``netns`` (raw socket)."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                    socket.IPPROTO_RAW))
    with s:
        s.sendto(ip + udp, (dst, 0))


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.3):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")
