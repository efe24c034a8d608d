"""Entering a network namespace from one thread, and pyroute2's sockets in named
namespaces without forking the process.

pyroute2 opens a socket inside a named network namespace (``IPRoute(netns=...)``) by
forking a child that enters the namespace and passes the socket back. A fork of a
multi-threaded process runs every at-fork handler of every library in the child: the
OpenTelemetry SDK's start threads there, and a child of the node executor (or of the test
process) was seen crashing in them. Forking a large process per netlink socket is slow too.

``install()`` replaces ``pyroute2.netns.create_socket`` with ``create_socket`` below: a
short-lived thread enters the namespace (``setns(2)`` with ``CLONE_NEWNET`` changes only
the calling thread's namespace), creates the socket and exits. The socket stays in the
namespace it was created in. Nothing else of the process changes namespace.

Invariants:
- A namespace that does not exist yet, a ``fileno`` or no namespace at all go to pyroute2's
  own function unchanged (it may create the namespace); only the plain case is served here.
- ``run_in_netns`` and every socket served here use a new thread that ends after the call,
  so no thread is ever left in another namespace.
- ``install()`` is idempotent; ``installed()`` says whether it is active.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import netns as pyroute2_netns

CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
_ORIGINAL = pyroute2_netns.create_socket
T = TypeVar("T")


def namespace_path(netns: str) -> str:
    """The bind-mount path of a named namespace (an absolute path is taken as it is)."""
    return netns if netns.startswith("/") else os.path.join(pyroute2_netns.NETNS_RUN_DIR, netns)


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has joined network namespace ``name`` (a name
    under ``/var/run/netns`` or a path) and return its result. Sockets created by ``fn``
    stay in that namespace; the calling thread's namespace is never touched."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(namespace_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _LIBC.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    worker = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def create_socket(netns: str | None = None, family: int = socket.AF_INET,
                  socket_type: int = socket.SOCK_STREAM, proto: int = 0, fileno: int | None = None,
                  **options: Any) -> socket.socket:
    """``pyroute2.netns.create_socket`` without a fork for an existing named namespace."""
    if netns is None or fileno is not None or not os.path.exists(namespace_path(netns)):
        return _ORIGINAL(netns=netns, family=family, socket_type=socket_type, proto=proto,
                         fileno=fileno, **options)
    return run_in_netns(netns, lambda: socket.socket(family, socket_type, proto))


def install() -> None:
    pyroute2_netns.create_socket = create_socket


def installed() -> bool:
    return pyroute2_netns.create_socket is create_socket


__all__ = ["create_socket", "install", "installed", "namespace_path", "run_in_netns"]
