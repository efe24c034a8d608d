"""The ``ciliary`` command: the top-level parser and the dispatch of one command.

Invariants:
- Each command group lives in its own module (``objects``, ``instance``, ``service``,
  ``observe``, ``node``, ``policy``, ``identity``, ``connectivity``, ``sysdump``, ``preflight``,
  ``clustermesh``, ``trace``, ``diagnose``) and adds its sub-commands through
  ``add_commands(subparsers, common_parent)``; every sub-command takes ``--data-dir``.
- ``main`` turns every failure into one ``error: <message>`` line and exit code 1
  (``CliError``, ``ManifestError``, ``UnknownKindError``, ``BusError``, anything unexpected), 2 for bad
  arguments, 130 for Ctrl-C — never a traceback.
- With an OTLP endpoint in the environment the command exports its spans as
  ``ciliary-cli`` and flushes them before it exits.
- Command modules import ``ciliary.cli.common`` and lower layers only, never this module
  nor each other.
"""

from __future__ import annotations

import argparse
import os
import sys

from ciliary import config, telemetry
from ciliary.bus import BusError
from ciliary.cli import (
    clustermesh,
    common,
    connectivity,
    diagnose,
    identity,
    instance,
    natskeys,
    node,
    objects,
    observe,
    policy,
    preflight,
    service,
    sysdump,
    trace,
)
from ciliary.resources import ManifestError, UnknownKindError

COMMAND_GROUPS = (objects, instance, service, observe, node, policy, identity, connectivity, sysdump,
                  preflight, clustermesh, trace, diagnose, natskeys)


class Parser(argparse.ArgumentParser):
    """Bad arguments: the usage, one ``error:`` line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        common.print_error(message)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common_parent = Parser(add_help=False)
    common_parent.add_argument(
        "--data-dir", default=argparse.SUPPRESS, help=f"instance state directory (env {config.ENV_DATA_DIR}; default {config.default_data_dir()})"
    )
    parser = Parser(prog="ciliary", description="ciliary: an eBPF Kubernetes networking data plane", parents=[common_parent])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_commands(sub, common_parent)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    for arg in argv if argv is not None else sys.argv[1:]:
        if "\x00" in arg:  # no operating system passes one in a command line; no path holds one
            parser.error(f"argument {arg!r} contains a NUL byte")
    args = parser.parse_args(argv)
    args.data_dir_path = config.resolve_data_dir(getattr(args, "data_dir", None))
    try:
        os.stat(args.data_dir_path)
    except FileNotFoundError:
        pass  # made by `up`; other commands say no instance runs there
    except OSError as err:  # a name too long, a file where a directory is wanted ...
        parser.error(f"--data-dir {str(args.data_dir_path)[:120]}: {err.strerror or err}")
    # exports only with an OTLP endpoint in the environment
    telemetry.setup_tracing("cli", export_timeout=telemetry.CLI_EXPORT_TIMEOUT)
    try:
        code = args.func(args)
    except (ManifestError, UnknownKindError, common.CliError, BusError) as err:
        common.print_error(str(err))
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        code = 0
    except Exception as err:  # last resort: a clear line, never a traceback
        common.print_error(f"unexpected {type(err).__name__}: {err}")
        code = 1
    telemetry.shutdown_tracing()  # a short-lived process: its spans leave before it does
    sys.exit(code)
