"""The ``ciliary`` command line (console script ``ciliary = "ciliary.cli:main"``).

Invariants:
- ``main`` (``ciliary.cli.app``) parses and dispatches one command; each command group
  is one module of this package, sharing only ``ciliary.cli.common``.
- The CLI talks to services over the bus only; it never imports a service package.
- Commands start without loading aiohttp: while the command modules are imported, it is
  marked absent, so nats-py leaves out its websocket transport (the only part that needs
  it; the CLI never uses websocket URLs). That is about a third of the CLI's import time.
  A module that imports aiohttp later still gets it.
"""

import sys

_MARK_AIOHTTP_ABSENT = "aiohttp" not in sys.modules
if _MARK_AIOHTTP_ABSENT:
    sys.modules["aiohttp"] = None  # type: ignore[assignment]

from ciliary.cli.app import main  # noqa: E402

if _MARK_AIOHTTP_ABSENT:
    del sys.modules["aiohttp"]

__all__ = ["main"]
