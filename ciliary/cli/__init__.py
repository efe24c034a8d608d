"""The ``ciliary`` command line (console script ``ciliary = "ciliary.cli:main"``).

Invariants:
- ``main`` (``ciliary.cli.app``) parses and dispatches one command; each command group
  is one module of this package, sharing only ``ciliary.cli.common``.
- The CLI talks to services over the bus only; it never imports a service package.
"""

from ciliary.cli.app import main

__all__ = ["main"]
