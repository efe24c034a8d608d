"""The ``ciliary`` command line (console script ``ciliary = "ciliary.cli:main"``).

Invariants:
- ``main`` (``ciliary.cli.app``) parses and dispatches one command; each command group
  is one module of this package, sharing only ``ciliary.cli.common``.
- The CLI talks to services over the bus only; it never imports a service package.
- Every command starts without loading aiohttp: nats-py imports it only for websocket
  URLs, which the CLI never uses (about a third of the CLI's import time). A module that
  imports aiohttp later still gets it.
"""

import sys

if "aiohttp" not in sys.modules:
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # nats-py: "no websocket transport"
    import nats.aio.transport  # noqa: F401

    del sys.modules["aiohttp"]

from ciliary.cli.app import main  # noqa: E402

__all__ = ["main"]
